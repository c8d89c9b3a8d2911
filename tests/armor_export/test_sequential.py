"""Sequential calibration end to end: its artifact loads, evaluates and exports (tiny random Llama).

The sequential pass swaps ARMOR modules into the model while it calibrates later blocks; none of
their buffers may reach the artifact's base file, and the caller's model must be dense again.
"""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

from armor_export import pipeline, source
from armor_export.artifact import BASE_FILE, load_artifact
from armor_export.cli import main
from armor_export.config import CalibConfig
from solver.config import SolverConfig


def _base_keys(art) -> set[str]:
    with safe_open(str(art / BASE_FILE), "pt") as f:
        return set(f.keys())


def test_sequential_prune_leaves_the_callers_model_dense(tiny_model_dir, tiny_text_dir, tmp_path):
    loaded = source.load(str(tiny_model_dir))
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=2, seqlen=16, mode="sequential")
    art = pipeline.prune(str(tiny_model_dir), SolverConfig(method="nowag"), calib, tmp_path / "art",
                         progress=False, loaded=loaded)
    after = loaded.model.state_dict()
    assert set(after) == set(dense) and all(torch.equal(after[k], v) for k, v in dense.items())
    tied = {"lm_head.weight"}  # the tiny model ties lm_head to the embeddings
    assert _base_keys(art) == set(dense) - {k for k in dense if "_proj." in k} - tied
    assert load_artifact(art).manifest["calibration"]["mode"] == "sequential"


def test_one_shot_sequential_artifact_evaluates_and_exports(tiny_model_dir, tiny_text_dir, tmp_path, capsys):
    out, text = tmp_path / "run", ["--eval-text", str(tiny_text_dir / "eval"), "--eval-windows", "1",
                                   "--eval-seqlen", "16"]
    # the one-shot run: prune (sequential) -> evaluate -> export to TensorRT-LLM's checkpoint -> verify it
    assert main(["run", "--model", str(tiny_model_dir), "--calib-mode", "sequential", "--calib-text",
                 str(tiny_text_dir / "calib"), "--calib-samples", "2", "--calib-seqlen", "16", *text,
                 "--block-size", "8", "--iterations", "1", "--engine", "trtllm", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verify"]["passed"]
    art = out / "artifact"
    assert not [k for k in _base_keys(art) if k.endswith((".S", ".A_blocks", ".B_blocks")) or "_proj." in k]
    a = load_artifact(art)
    assert a.manifest["calibration"]["mode"] == "sequential" and len(a.layers) == 14
    assert all(lf.factors.A_blocks is not None for lf in a.layers.values())

    # the artifact on its own: eval and export through the CLI
    capsys.readouterr()
    assert main(["eval", "--artifact", str(art), *text]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert ppl == {k: v["perplexity"] for k, v in summary["pruned"].items()}
    assert main(["export", "--artifact", str(art), "--engine", "trtllm", "--dtype", "fp32", "--out",
                 str(tmp_path / "ck")]) == 0
    from engines.hf_checkpoint_checks import schema_problems

    assert schema_problems(tmp_path / "ck", a) == []
