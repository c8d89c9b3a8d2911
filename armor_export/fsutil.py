"""Atomic output directories and file hashes.

Every output (artifact, stats, engine folder) is written to a hidden sibling temporary directory
and renamed into place only when complete, so a crash never leaves a half-written result under
the final name. Leftover temporaries from a crashed run are recognised by their prefix.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

TMP_TAG = ".armor-tmp-"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stale_temporaries(out: Path) -> list[Path]:
    out = Path(out)
    if not out.parent.exists():
        return []
    return sorted(out.parent.glob(f".{out.name}{TMP_TAG}*"))


@contextlib.contextmanager
def atomic_dir(out: Path, *, overwrite: bool = False):
    """Yield a fresh temporary directory; on success rename it to ``out``.

    Refuses an existing ``out`` unless ``overwrite``. Stale temporaries of the same output (from a
    killed run) are removed first. On an exception the temporary is deleted and ``out`` untouched."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(out):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}{TMP_TAG}old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
