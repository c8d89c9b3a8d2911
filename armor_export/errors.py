"""One place that turns an exception into the one line a user sees (``cli.main`` calls it).

Every failure a user can cause (a bad flag, file, model, text, a full disk, a missing package or device) is
raised as a ValueError / RuntimeError / OSError / ImportError with a message naming the file, flag or layer
and what to do; ``user_message`` maps it to exit code 2 and that message on one line. Anything else is a bug:
exit code 1 and a line asking for ``--debug`` (or ``ARMOR_DEBUG=1``), which shows the traceback.
"""
from __future__ import annotations

import errno
import os

USER_ERROR, INTERNAL_ERROR = 2, 1
DEBUG_ENV = "ARMOR_DEBUG"
MAX_CHARS = 1500  # only foreign text (a library's exception) gets this long; ours names paths

# errno -> what to do about it (the OS's own words and the path come first)
OS_HINTS = {
    errno.ENOSPC: "free space on that filesystem or choose another --out",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another --out",
    errno.EACCES: "check the permissions or choose a folder you can write (--out)",
    errno.EPERM: "check the permissions or choose a folder you can write (--out)",
    errno.EROFS: "the filesystem is read-only; choose another --out",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "this is a folder where a file was expected",
    errno.ENOENT: "check the path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENAMETOOLONG: "choose a shorter path",
}
# the pip requirement (and extra of armor-export) that provides an optional module
PACKAGES = {"onnx": ("onnx", "onnx"), "onnx_ir": ("onnx-ir", "onnx"), "onnxscript": ("onnxscript", "onnx"),
            "onnxruntime": ("onnxruntime", "onnx"), "onnxruntime_genai": ("onnxruntime-genai", "genai"),
            "tensorrt": ("tensorrt", "trt"), "tensorrt_llm": ("tensorrt-llm", "trtllm"),
            "matplotlib": ("matplotlib", "plot"), "gguf": ("gguf", None)}


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    """The message on one line; a long one loses its middle, not its end (where what to do usually stands)."""
    text = " ".join(str(text).split())
    if len(text) <= MAX_CHARS:
        return text
    head = MAX_CHARS // 2
    return text[:head] + " ... " + text[len(text) - (MAX_CHARS - head - 5):]


def install_hint(*modules: str) -> str:
    """``pip install 'armor-export[extras]' (or pip install pkgs)`` for the modules' packages."""
    found = [PACKAGES.get(m.split(".")[0], (m.split(".")[0], None)) for m in modules]
    pips = " ".join(dict.fromkeys(pip for pip, _ in found))
    extras = ",".join(dict.fromkeys(extra for _, extra in found if extra))
    return f"pip install 'armor-export[{extras}]' (or pip install {pips})" if extras else f"pip install {pips}"


def _os_message(e: OSError) -> str:
    if e.errno is None or not e.strerror:  # raised by armor-export with its own message
        return str(e)
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    hint = OS_HINTS.get(e.errno)
    return f"{where + ': ' if where else ''}{e.strerror}" + (f"; {hint}" if hint else "")


def user_message(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that reached the CLI."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return USER_ERROR, one_line(f"out of memory ({e or type(e).__name__}); lower --calib-samples, "
                                    f"--calib-seqlen or --eval-seqlen, or use --layer-by-layer")
    if isinstance(e, ModuleNotFoundError) and e.name:
        return USER_ERROR, one_line(f"the Python package {e.name!r} is not installed: {install_hint(e.name)}")
    if isinstance(e, OSError):
        return USER_ERROR, one_line(_os_message(e))
    if isinstance(e, (ValueError, RuntimeError, ImportError)):
        return USER_ERROR, one_line(str(e) or type(e).__name__)
    return INTERNAL_ERROR, one_line(f"internal error ({type(e).__name__}: {e}); rerun with --debug (or "
                                    f"{DEBUG_ENV}=1) for the traceback and report it")
