"""Distributed solve: deterministic balanced assignment, and a real 2-rank torchrun (gloo, CPU)
whose artifact is bit-identical to the single-process one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from armor_export.shard import assign, chunks, layer_cost

REPO = Path(__file__).resolve().parents[2]


def test_assign_is_balanced_deterministic_and_complete():
    costs = {f"l{i}": c for i, c in enumerate([9, 7, 6, 5, 4, 4, 3, 1])}
    shards = assign(costs, 3)
    assert shards == assign(dict(costs), 3)
    assert sorted(n for s in shards for n in s) == sorted(costs)
    loads = [sum(costs[n] for n in s) for s in shards]
    assert max(loads) - min(loads) <= max(costs.values())
    assert shards[0][0] == "l0"  # the most expensive layer goes first, to rank 0
    assert assign(costs, 1) == [list(costs)]
    with pytest.raises(ValueError):
        assign(costs, 0)


def test_chunks_group_by_shape_and_cap_size():
    shapes = {"a": (4, 8), "b": (8, 8), "c": (4, 8), "d": (4, 8)}
    assert chunks(list(shapes), shapes, 2) == [["a", "c"], ["d"], ["b"]]


def test_chunks_hold_at_most_one_block_of_weights():
    from armor_export.shard import block_elements

    shapes = {f"l{i}.{p}": s for i in range(6) for p, s in (("q", (8, 8)), ("down", (8, 32)))}
    budget = block_elements(shapes, {n: int(n[1]) for n in shapes})
    assert budget == 8 * 8 + 8 * 32
    got = chunks(list(shapes), shapes, 64, budget)
    assert [len(c) for c in got] == [5, 1] + [1] * 6  # 5 q (320 <= 320 elements), the 6th, then one down each
    assert sorted(n for c in got for n in c) == sorted(shapes)
    assert all(sum(shapes[n][0] * shapes[n][1] for n in c) <= budget for c in got)
    assert chunks(["big"], {"big": (64, 64)}, 64, 10) == [["big"]]  # a layer larger than the budget: alone
    assert layer_cost(8, 16, 4) == 512 and layer_cost(8, 16, None) == 128


def same_artifact(a: Path, b: Path) -> None:
    """Factors bit for bit (whatever shards hold them), base tensors, and manifest layers minus timings."""
    from armor_export.artifact import load_artifact

    fa, fb = (dict(load_artifact(p).layers.tensors) for p in (a, b))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    ba, bb = load_file(str(a / "base.safetensors")), load_file(str(b / "base.safetensors"))
    assert sorted(ba) == sorted(bb) and all(torch.equal(ba[k], bb[k]) for k in ba)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        for entry in m["layers"].values():
            entry.pop("seconds")
            for k in [k for k in entry.get("notes", {}) if k.endswith("seconds")]:  # e.g. the refit's timing
                entry["notes"].pop(k)
    assert ma["layers"] == mb["layers"]
    assert ma["targets"] == mb["targets"] and ma["calibration"] == mb["calibration"]


def prune_args(model: Path, text: Path, out: Path, method: str = "armor", iterations: int = 10) -> list[str]:
    return ["prune", "--model", str(model), "--calib-text", str(text), "--calib-samples", "6", "--calib-seqlen",
            "48", "--method", method, "--block-size", "8", "--iterations", str(iterations), "--out", str(out)]


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def test_two_rank_torchrun_matches_single_process(tiny_model_dir, tiny_text_dir, tmp_path):
    text = tiny_text_dir / "calib"
    single, multi = tmp_path / "single", tmp_path / "multi"
    from armor_export.cli import main

    assert main(prune_args(tiny_model_dir, text, single)) == 0  # in process: same code path, no start-up cost
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "armor_export", *prune_args(tiny_model_dir, text, multi)],
                        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    same_artifact(single, multi)
    man = json.loads((multi / "manifest.json").read_text())
    assert man["execution"]["world_size"] == 2
    assert not (tmp_path / "multi.partial").exists()  # the store is removed once the artifact is written


def test_layer_by_layer_load_gives_the_same_artifact(tiny_model_dir, tiny_text_dir, tmp_path):
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from solver.config import SolverConfig

    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=4, seqlen=32)
    cfg = SolverConfig(method="nowag")
    full = pipeline.prune(str(tiny_model_dir), cfg, calib, tmp_path / "full", progress=False)
    lazy = pipeline.prune(str(tiny_model_dir), cfg, calib, tmp_path / "lazy", progress=False, layerwise=True)
    same_artifact(full, lazy)
    assert json.loads((lazy / "manifest.json").read_text())["execution"]["layer_by_layer"] is True
    with pytest.raises(ValueError, match="dense"):
        pipeline.prune(str(tiny_model_dir), cfg, CalibConfig(mode="sequential"), tmp_path / "x", layerwise=True)
