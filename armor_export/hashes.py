"""File hashes, the integrity chain's last link: ``files.sha256`` (``sha256sum -c`` format) lists every file of an
engine folder (``atomic_dir`` of armor_export.fsutil writes it on commit); ``verify_hashes`` checks a folder against
it. Also the names of the files the chain treats specially: the ownership marker (armor_export.fsutil) and the
reports that verify adds to an engine folder after its export.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

MARKER = ".armor-export"  # the ownership marker (JSON; no .json suffix, so "*.json" globs of a folder never see it)
HASHES = "files.sha256"
REPORT_FILES = ("parity.json", "parity.md", "parity.png")  # written into an engine folder later, by verify


class IntegrityError(ValueError):
    """A file that does not match its recorded sha256, or a recorded file that is missing."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every file under ``folder`` as a sorted POSIX relative path, minus top-level names in ``exclude``."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude:
            out.append(rel)
    return sorted(out)


def write_hashes(folder: Path) -> None:
    """``files.sha256`` listing every file of ``folder`` (sha256sum format) but itself and the marker."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / rel)}  {rel}\n" for rel in folder_files(folder, (HASHES, MARKER))]
    (folder / HASHES).write_text("".join(lines))


def read_hashes(path: Path) -> dict[str, str]:
    out = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not m:
            raise IntegrityError(f"{path}: line {i} is not '<sha256>  <file>'")
        out[m.group(2)] = m.group(1)
    return out


def verify_hashes(folder: Path) -> int:
    """Check every file listed in ``folder/files.sha256``; unlisted files (other than the marker and
    verify's reports) are an error too. Returns the number of files checked."""
    folder = Path(folder)
    listing = folder / HASHES
    if not listing.is_file():
        raise IntegrityError(f"{listing}: missing, so the folder's files cannot be checked; it was not written "
                             f"(completely) by this armor-export: export it again")
    expected = read_hashes(listing)
    for rel, digest in expected.items():
        f = folder / rel
        if not f.is_file():
            raise IntegrityError(f"{f}: listed in {HASHES} but missing; export the folder again")
        if sha256_file(f) != digest:
            raise IntegrityError(f"{f}: sha256 does not match {listing}; the file is corrupt or was modified: "
                                 f"export the folder again")
    extra = [r for r in folder_files(folder, (HASHES, MARKER))
             if r not in expected and Path(r).name not in REPORT_FILES + (HASHES, MARKER)]
    if extra:
        raise IntegrityError(f"{folder / extra[0]}: not listed in {listing} (added after the export); "
                             f"remove it or export the folder again")
    return len(expected)
