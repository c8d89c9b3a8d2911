"""Lowerings of an armor-export artifact to runnable forms, registered by name.

``get_lowering(name)`` imports the backend module lazily, so importing ``engines`` never pulls in
onnxruntime, TensorRT or TensorRT-LLM. Engines read only the artifact (``armor_export.artifact``)
and the format helpers in ``solver.sparsity`` / ``solver.blockdiag``.
"""
from __future__ import annotations

import importlib

# name -> (module, attribute); resolved only when asked for.
LOWERINGS = {
    "torch": ("engines.torch_module", "TorchLowering"),
    "onnx": ("engines.onnx_engine", "OnnxLowering"),
    "genai": ("engines.genai", "GenaiLowering"),
    "tensorrt": ("engines.tensorrt", "TensorRTLowering"),
    "trtllm": ("engines.trtllm", "TrtllmLowering"),
}


class EngineUnavailable(RuntimeError):
    """The engine's module or library is missing on this machine; the message says what to install."""


def get_lowering(name: str):
    if name not in LOWERINGS:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(LOWERINGS)}")
    module, attr = LOWERINGS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise EngineUnavailable(f"engine {name!r} is not implemented in this version of armor-export") from e
        raise EngineUnavailable(f"engine {name!r} needs the Python package {e.name!r}, which is not installed") from e
    return getattr(mod, attr)()


# Python modules an engine needs end to end (lower and verify), checked by ``check_available`` before any work.
NEEDS = {
    "onnx": ("onnx", "onnx_ir", "onnxruntime", "onnxruntime_genai"),
    "genai": ("onnx", "onnx_ir", "onnxruntime", "onnxruntime_genai"),
    "tensorrt": ("onnx", "onnx_ir"),  # TensorRT itself is checked after the ONNX is written (kept for trtexec)
    "trtllm": (),
    "torch": (),
}


def check_available(name: str) -> None:
    """Raise EngineUnavailable naming every missing module and what to install (nothing is imported)."""
    import importlib.util

    from armor_export.errors import install_hint

    if name not in LOWERINGS:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(LOWERINGS)}")
    missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineUnavailable(f"--engine {name} needs the Python package(s) {', '.join(missing)}, not installed: "
                                f"{install_hint(*missing)}")
