"""Smoke test of the quality benchmark (benchmarks/quality.py --smoke) on a tiny random model.

Checks the JSON schema, that every number is finite, and that ARMOR's mean proxy loss is not above NoWag-P's
(ARMOR starts from NoWag-P and returns its best iterate). Never touches the ModelOpt venv.
"""
from __future__ import annotations

import json
import math

import pytest

RUN_KEYS = {"method", "label", "calibration", "block_size", "iterations", "perplexity", "mean_loss",
            "mean_loss_start", "param_overhead", "fallback_layers", "solve_seconds", "eval_seconds", "group"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from benchmarks.quality import main

    out = tmp_path_factory.mktemp("quality") / "quality.json"
    res = main(["--smoke", "--quiet", "--out", str(out), "--iterations", "6", "--block-sizes", "8,16",
                "--iter-sweep", "0,6", "--lr-sweep", "1e-4,3e-3", "--rounds-sweep", "1,2", "--eval-windows", "4"])
    return res, json.loads(out.read_text())


def test_schema(smoke):
    res, on_disk = smoke
    assert on_disk["schema"] == res["schema"] == "armor-export/quality/v1"
    for key in ("date_utc", "machine", "library_versions", "calibration", "evaluation", "armor_defaults", "dense",
                "runs", "gap_closed", "sweeps", "seconds_total"):
        assert key in on_disk, key
    assert on_disk["parts"] == ["dense", "main", "iters", "lr", "rounds", "blocks", "sequential"]
    assert on_disk["partial"] is False
    assert on_disk["modelopt"] is None
    assert set(on_disk["sweeps"]) == {"block_size", "iterations", "lr", "sparse_rounds", "calibration_mode"}
    assert on_disk["calibration"]["windows"] == 8 and on_disk["evaluation"]["windows"] == 4
    main_methods = [(r["method"], r["preset"]) for r in on_disk["runs"] if r["group"] == "main"]
    assert main_methods == [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("nowag", None),
                            ("armor", None), ("armor", "quality")]
    quality = [r for r in on_disk["runs"] if r["preset"] == "quality"][0]
    assert quality["objective"] == "diag" and quality["refit"] == "output" and quality["refit_shrink"] == 0.5
    assert quality["label"] == "ARMOR --preset quality"
    from solver.config import PRESETS
    # the run is the preset, every setting of it but those the flags give (--iterations; the smoke model's b);
    # the refit's shrinkage was once dropped on the way
    kept = {k: v for k, v in PRESETS["quality"].items() if k not in ("iterations", "block_size")}
    assert {k: quality[k] for k in kept} == kept and quality["iterations"] == 6
    # every run on every evaluation text: the smoke text and a registered out-of-domain corpus
    assert list(on_disk["evaluation"]["texts"]) == ["eval", "tech"]
    assert all(t["windows"] == 4 for t in on_disk["evaluation"]["texts"].values())
    for r in [on_disk["dense"], *on_disk["runs"]]:
        assert list(r["perplexities"]) == ["eval", "tech"] and r["perplexity"] == r["perplexities"]["eval"]
    assert set(quality["gap_closed_per_text"]) == {"eval", "tech"}
    assert {r["calibration"] for r in on_disk["sweeps"]["calibration_mode"]} == {"dense", "sequential"}
    assert [r["block_size"] for r in on_disk["sweeps"]["block_size"]] == [8, 16]
    assert [r["iterations"] for r in on_disk["sweeps"]["iterations"]] == [0, 6]
    assert [r["lr"] for r in on_disk["sweeps"]["lr"]] == [1e-4, 3e-3]
    assert [r["sparse_rounds"] for r in on_disk["sweeps"]["sparse_rounds"]] == [1, 2]
    defaults = on_disk["armor_defaults"]
    for r in on_disk["runs"]:
        if r["method"] == "armor":
            assert r["sparse_rounds"] in (1, 2, defaults["sparse_rounds"]) and r["lr"] in (1e-4, 3e-3, defaults["lr"])
    for r in on_disk["runs"]:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)


def test_numbers_finite(smoke):
    _, res = smoke
    assert _finite(res["dense"]["perplexity"])
    for r in res["runs"]:
        for k in ("perplexity", "mean_loss", "mean_loss_start", "param_overhead", "solve_seconds"):
            assert _finite(r[k]), (r["label"], r["calibration"], k, r[k])
        assert 0 <= r["mean_loss"] <= 1.5
        assert r["fallback_layers"] == 0
        if r["method"] == "armor":
            assert r["param_overhead"] > 0
        else:
            assert r["param_overhead"] == 0
    g = res["gap_closed"]
    assert g["best_baseline"] in ("magnitude", "wanda", "sparsegpt", "nowag")
    assert g["value"] is None or _finite(g["value"])


def test_armor_loss_not_above_nowag(smoke):
    _, res = smoke
    by = {(r["method"], r["calibration"], r["group"]): r for r in res["runs"] if r["preset"] is None}
    armor, nowag = by[("armor", "dense", "main")], by[("nowag", "dense", "main")]
    assert armor["mean_loss"] <= nowag["mean_loss"] + 1e-9
    assert armor["mean_loss_start"] == pytest.approx(nowag["mean_loss"], rel=1e-4)
    it0 = [r for r in res["sweeps"]["iterations"] if r["iterations"] == 0][0]
    assert it0["mean_loss"] == pytest.approx(nowag["mean_loss"], rel=1e-4)


def test_sequential_runs_score_the_pruned_model(smoke):
    """A sequential run is scored with its own pruned layers in the model (once it scored the dense model: the
    sequential solve puts the dense linears back, and the benchmark evaluated that copy)."""
    _, res = smoke
    dense = res["dense"]["perplexities"]
    for r in res["sweeps"]["calibration_mode"]:
        assert r["perplexities"] != dense, (r["label"], r["calibration"])


def test_block_hessian_objective_run(tmp_path):
    """--objective reaches ARMOR's runs: labelled, recorded, with the paper's proxy of the same factors beside."""
    from benchmarks.quality import main

    res = main(["--smoke", "--quiet", "--out", str(tmp_path / "q.json"), "--only", "main", "--main-methods",
                "nowag,armor", "--iterations", "6", "--eval-windows", "2", "--objective", "block-hessian"])
    by = {r["method"]: r for r in res["runs"]}
    arm = by["armor"]
    assert arm["objective"] == "block-hessian" and arm["label"] == "ARMOR block-hessian"
    assert by["nowag"]["objective"] is None and by["nowag"]["mean_diag_loss"] is None
    assert 0 < arm["mean_loss"] <= arm["mean_loss_start"] and _finite(arm["mean_diag_loss"])
    assert _finite(arm["perplexity"]) and res["calibration"]["stats"] == "full H"


def test_smoke_output_refit_run_records_its_refit(tmp_path):
    from benchmarks.quality import main

    res = main(["--smoke", "--quiet", "--out", str(tmp_path / "q.json"), "--only", "main", "--main-methods",
                "armor", "--iterations", "6", "--eval-windows", "2", "--objective", "block-hessian",
                "--refit", "output", "--refit-rounds", "2"])
    arm = res["runs"][0]
    assert arm["refit"] == "output" and arm["label"] == "ARMOR block-hessian output-refit 2 refit rounds"
    assert arm["refit_rounds"] == 2 and res["runs"][0]["reused"] is False
    assert 0 < arm["mean_loss"] <= arm["mean_loss_start"]  # output losses: the refit keeps the guarantee
    assert _finite(arm["perplexity"]) and res["calibration"]["stats"] == "full H"


def test_modelopt_launch_without_its_venv_says_how_to_make_it(tmp_path):
    from types import SimpleNamespace

    from benchmarks.modelopt_launch import run_modelopt

    bench = SimpleNamespace(args=SimpleNamespace(modelopt_python=str(tmp_path / "none" / "python")))
    res = run_modelopt(bench, tmp_path, {"dense": 1.0})
    assert "not found" in res["error"] and "benchmarks/modelopt_env.sh" in res["error"]


def test_method_spec_takes_every_preset_setting():
    from benchmarks.quality_table import RUN_KEYWORDS, method_spec
    from solver.config import PRESETS

    for name, preset in PRESETS.items():
        method, kw = method_spec(f"armor:{name}")
        assert method == "armor" and kw.pop("preset") == name
        assert kw == {RUN_KEYWORDS[k]: v for k, v in preset.items()}
