"""Importing the packages is cheap: no TensorRT, TensorRT-LLM or onnxruntime, and CUDA is not initialised."""
from __future__ import annotations

import subprocess
import sys


def test_import_pulls_in_no_engine_library():
    code = (
        "import sys, armor_export, armor_export.cli, armor_export.pipeline, solver.methods, engines, engines.torch_module\n"
        "import torch\n"
        "bad = [m for m in ('tensorrt', 'tensorrt_llm', 'onnxruntime', 'onnxruntime_genai') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_cli_help_lists_the_stages():
    res = subprocess.run([sys.executable, "-m", "armor_export", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for word in ("prune", "eval", "export", "verify", "report", "run", "--engine"):
        assert word in res.stdout
