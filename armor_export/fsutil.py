"""Owned, locked, atomic outputs and file hashes: the one place where armor-export writes to disk.

* Every folder armor-export creates carries a marker file (``MARKER``). ``--overwrite`` replaces only
  a folder with that marker (or an empty one, or an output that predates markers); never
  a plain file, a foreign folder or an input of the same command.
* ``output_lock(out)`` holds an exclusive ``fcntl`` lock on ``.<name>.lock`` next to ``out`` for the whole
  command, so a second run into the same output fails at once. The kernel drops the lock when its
  process dies, so the file a ``kill -9`` leaves behind is recognised as stale and taken over.
* ``atomic_dir`` and ``atomic_write_text`` / ``atomic_write_bytes`` write to a hidden sibling
  temporary and rename it into place only when complete. A failure removes the temporary and any
  parent folders the call created; OS errors (disk full, read-only, no permission) become one clear
  ``OutputError`` naming the output. Temporaries of dead processes are removed by the next run.
* ``atomic_dir`` writes the folder's ``files.sha256`` on commit (armor_export.hashes).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from armor_export.hashes import MARKER, folder_files, write_hashes

TMP_TAG = ".armor-tmp-"
OWNER = "armor-export"
_ADVICE = {errno.ENOSPC: "free space on that filesystem or choose another --out",
           errno.EDQUOT: "free space (disk quota exceeded) or choose another --out",
           errno.EROFS: "the filesystem is read-only; choose another --out",
           errno.EACCES: "no permission to write there; choose another --out",
           errno.EPERM: "no permission to write there; choose another --out",
           errno.EFBIG: "the file is too large for that filesystem; choose another --out",
           errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --out"}


class OutputError(RuntimeError):
    """An output that cannot be written or must not be replaced; the message names it and says what to do."""


# ---------------------------------------------------------------- ownership

def write_marker(folder: Path, kind: str, **extra) -> None:
    from armor_export import __version__

    doc = {"written_by": OWNER, "kind": kind, "armor_export": __version__, "created_unix": int(time.time()), **extra}
    atomic_write_text(Path(folder) / MARKER, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_marker(folder: Path) -> dict | None:
    try:
        doc = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("written_by") == OWNER else None


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _legacy_output(folder: Path) -> bool:
    """An output written before markers existed also counts as armor-export's: a version-1 artifact, an
    engine folder (ONNX export record at the top or one level down, an ARMOR checkpoint config), or a
    one-shot run folder (holding such an artifact)."""
    for candidate in (folder, folder / "artifact"):
        man = _json(candidate / "manifest.json")
        if isinstance(man, dict) and man.get("format") == "armor-export/factors":
            return True
    if (folder / "onnx_export.json").is_file() or any(folder.glob("*/onnx_export.json")):
        return True
    cfg = _json(folder / "config.json")
    return isinstance(cfg, dict) and isinstance(cfg.get("armor"), dict)


def is_owned(folder: Path) -> bool:
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    return read_marker(folder) is not None or not any(folder.iterdir()) or _legacy_output(folder)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Path, *, overwrite: bool, inputs=(), flag: str = "--out") -> None:
    """Fail before any work when ``out`` cannot or must not be written (see the module docstring)."""
    out = Path(out)
    real = out.resolve()
    for inp in inputs:
        if inp is not None and Path(inp).exists() and _inside(Path(inp).resolve(), real):
            raise OutputError(f"{flag} {out} is (or contains) the input {inp} of this command; armor-export never "
                              f"replaces its own inputs: choose another {flag}")
    anc = real.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{flag} {out}: {anc} is a file, not a folder; choose another {flag}")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{flag} {out} is a file or link, not a folder armor-export wrote; armor-export does not "
                          f"replace it, even with --overwrite: move it away or choose another {flag}")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
        if not is_owned(out):
            raise OutputError(f"{flag} {out} is not empty and was not written by armor-export (no {MARKER}); "
                              f"--overwrite replaces only armor-export's own outputs: move it away or choose "
                              f"another {flag}")


def make_parents(folder: Path, flag: str = "--out") -> list[Path]:
    """``mkdir -p folder``; returns the folders it created (deepest last), for ``remove_created``."""
    folder = Path(folder)
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            remove_created(missing[::-1])
            raise as_output_error(e, d, flag) from None
    return missing[::-1]


def remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if still empty


def remove_tree(path: Path) -> None:
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def as_output_error(e: BaseException, where: Path, flag: str = "--out") -> OutputError:
    """An OS error (or safetensors' wrapping of one) while writing ``where`` as one clear message."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    why = os.strerror(code) if code else str(e)
    advice = _ADVICE.get(code, f"check {flag} and rerun")
    return OutputError(f"cannot write {where}: {why}; {advice}")


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _writing(e: BaseException, tmp: Path) -> bool:
    """An error of the body that is about the output (disk full, read-only, or a path in ``tmp``)."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    names = [getattr(e, "filename", None), getattr(e, "filename2", None)]
    return code in _FULL or any(n is not None and str(n).startswith(str(tmp)) for n in names)


def _is_write_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    return type(e).__name__ == "SafetensorError" and "os error" in str(e)


# ---------------------------------------------------------------- locks

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path, flag: str = "--out"):
    """Hold the exclusive lock of ``out`` for the body (see the module docstring)."""
    out = Path(out)
    created = make_parents(out.parent, flag)
    path = lock_path(out)
    try:
        fd = _acquire(path, out, flag)
    except BaseException:
        remove_created(created)
        raise
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # unlink before close: a waiter that grabs the old inode sees it is gone
        os.close(fd)
        remove_created(created)


def _acquire(path: Path, out: Path, flag: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise as_output_error(e, path.parent, flag) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd)
            os.close(fd)
            who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
            raise OutputError(f"{out} is being written by another armor-export run ({who}, lock {path}); wait for "
                              f"it to finish or choose another {flag}") from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"cannot lock {path}: {os.strerror(e.errno)}; the filesystem of {flag} {out} must "
                              f"support file locks") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (unlinked) it between our open and flock: retry
            os.close(fd)
            continue
        stale = _read_lock(fd)
        if stale:
            alive = stale.get("host") == socket.gethostname() and _pid_alive(int(stale.get("pid", -1)))
            state = "still running but no longer holds it" if alive else "no longer running"
            print(f"armor-export: took over the stale lock {path} of pid {stale.get('pid')} ({state})",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started_unix": int(time.time())}).encode(), 0)
        return fd


def _read_lock(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        doc = json.loads(data) if data else {}
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- atomic writes

def _tmp_pid(name: str) -> int | None:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def stale_temporaries(out: Path) -> list[Path]:
    """Temporaries of ``out`` left by processes that no longer run."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    found = out.parent.glob(f".{out.name}{TMP_TAG}*")
    return sorted(p for p in found if (pid := _tmp_pid(p.name)) is None or not _pid_alive(pid) or pid == os.getpid())


@contextlib.contextmanager
def atomic_dir(out: Path, *, overwrite: bool = False, kind: str = "output", hash_files: bool = True,
               inputs=(), flag: str = "--out"):
    """Yield a fresh temporary directory; on success write the marker (and ``files.sha256`` when
    ``hash_files``) into it and rename it to ``out``.

    ``out`` is checked first (``check_output``); a replaced ``out`` must be armor-export's. On any
    failure the temporary (and parents this call created) are removed and ``out`` is untouched."""
    out = Path(out)
    check_output(out, overwrite=overwrite, inputs=inputs, flag=flag)
    created = make_parents(out.parent, flag)
    for stale in stale_temporaries(out):
        remove_tree(stale)
    tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}"
    old = out.parent / f".{out.name}{TMP_TAG}old-{os.getpid()}"
    try:
        try:
            tmp.mkdir()
        except OSError as e:
            raise as_output_error(e, out, flag) from None
        yield tmp
        try:
            write_marker(tmp, kind)
            if hash_files:
                write_hashes(tmp)
            if out.exists() or out.is_symlink():
                check_output(out, overwrite=overwrite, flag=flag)  # it may have changed during the work
                os.replace(out, old)
                os.replace(tmp, out)
                remove_tree(old)
            else:
                os.replace(tmp, out)
        except BaseException as e:
            if _is_write_error(e):
                raise as_output_error(e, out, flag) from None
            raise
    except BaseException as e:
        remove_tree(tmp)
        if old.exists() and not out.exists():
            os.replace(old, out)  # the swap failed half-way: put the previous output back
        remove_created(created)
        if _is_write_error(e) and _writing(e, tmp):
            raise as_output_error(e, out, flag) from None
        raise


def atomic_write_bytes(path: Path, data: bytes, flag: str = "--out") -> Path:
    """Write one file through a sibling temporary and a rename; errors name ``path``."""
    path = Path(path)
    created = make_parents(path.parent, flag)
    tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        remove_created(created)
        raise as_output_error(e, path, flag) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_created(created)
        raise
    return path


def atomic_write_text(path: Path, text: str, flag: str = "--out") -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), flag)


def atomic_write_file(path: Path, write, flag: str = "--out") -> Path:
    """Like ``atomic_write_bytes`` for a writer that needs a path (``write(tmp_path)``, e.g. safetensors)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_write_error(e):
            raise as_output_error(e, path, flag) from None
        raise
    return path


# ---------------------------------------------------------------- the one-shot run's folder

@contextlib.contextmanager
def run_folder(out: Path, *, overwrite: bool, inputs=(), flag: str = "--out"):
    """The one-shot run's folder: checked and locked first, created with the marker ``complete: false``,
    marked complete when the body returns. A failed run removes the folder if it created it and
    nothing was left in it; an incomplete run folder (a failed or killed run) may be reused without
    ``--overwrite``, so rerunning the same command resumes it."""
    out = Path(out)
    marker = read_marker(out) if out.is_dir() else None
    resumable = bool(marker) and marker.get("kind") == "run" and marker.get("complete") is False
    check_output(out, overwrite=overwrite or resumable, inputs=inputs, flag=flag)
    with output_lock(out, flag):
        existed = out.exists()
        try:
            out.mkdir(exist_ok=True)
            write_marker(out, "run", complete=False)
        except OSError as e:
            raise as_output_error(e, out, flag) from None
        try:
            yield out
        except BaseException:
            if not existed and not folder_files(out, (MARKER,)):
                remove_tree(out)
            raise
        write_marker(out, "run", complete=True)
