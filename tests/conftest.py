"""Shared fixtures: seeding, a tiny random Llama folder (with a small trained tokenizer), marker gates.

Markers: ``slow`` runs only with --run-slow (or ARMOR_RUN_SLOW=1); ``gpu`` needs CUDA; ``trt`` needs
the tensorrt package; ``trtllm`` needs tensorrt_llm. Every test file stays in the default collection.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from benchmarks.synth import make_tiny_model_dir, sample_text


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (real model, minutes)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("ARMOR_RUN_SLOW") == "1"
    gates = {
        "slow": (not run_slow, "slow test: pass --run-slow (or ARMOR_RUN_SLOW=1) to run it"),
        "gpu": (not torch.cuda.is_available(), "needs a CUDA device (none visible)"),
        "trt": (importlib.util.find_spec("tensorrt") is None,
                "needs the NVIDIA TensorRT Python package (pip install tensorrt on a machine with an NVIDIA GPU)"),
        "trtllm": (importlib.util.find_spec("tensorrt_llm") is None,
                   "needs TensorRT-LLM (pip install tensorrt-llm on a machine with an NVIDIA GPU)"),
    }
    for item in items:
        reasons = [reason for mark, (skip, reason) in gates.items() if skip and mark in item.keywords]
        if reasons:
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("text")
    text = sample_text()
    half = len(text) // 2
    (d / "calib").mkdir()
    (d / "eval").mkdir()
    (d / "calib" / "a.txt").write_text(text[:half])
    (d / "eval" / "b.txt").write_text(text[half:])
    return d


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tiny_text_dir, tmp_path_factory) -> Path:
    """An ARMOR artifact of the tiny model (few iterations, b=8), built once per session."""
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from solver.config import SolverConfig

    out = tmp_path_factory.mktemp("art") / "armor"
    cfg = SolverConfig(method="armor", block_size=8, iterations=20)
    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=8, seqlen=64)
    return pipeline.prune(str(tiny_model_dir), cfg, calib, out, progress=False)
