"""Smoke runs of the throughput benchmarks on CPU: tiny shapes, few iterations, schema checks.

The layer benchmark must check every variant for correctness before timing it; the end-to-end
benchmark runs dense vs ARMOR on the tiny artifact (PyTorch always; ONNX Runtime when the ONNX
exporter and onnxruntime are importable, otherwise it records a skip with a reason). The GPU-only
paths (semi-structured backends, Triton) share these functions and are gated by the ``gpu`` marker.
"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_layer, shapes


def test_shape_suites_and_limit():
    s = shapes.get_suite("qwen2.5-14b")
    assert [r[0] for r in s.layers()] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert shapes.overhead(128, 5120, 13824) == pytest.approx(0.0343, abs=1e-4)
    assert shapes.limit(128, 5120, 13824) == pytest.approx(1.872, abs=1e-3)
    for suite in shapes.SUITES.values():  # the default block size divides every shape
        assert all(d_in % suite.block_size == 0 and d_out % suite.block_size == 0 for _, d_in, d_out in suite.layers())
    with pytest.raises(ValueError, match="unknown shape suite"):
        shapes.get_suite("gpt-5")


def test_layer_smoke_schema_and_correctness(tmp_path):
    out = tmp_path / "layer.json"
    res = bench_layer.main(["--smoke", "--layers", "q,down", "--blockdiag", "torch,triton", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["schema"] == bench_layer.SCHEMA and on_disk["schema_version"] == 1
    assert {"device", "torch", "date_utc"} <= set(on_disk["env"])
    rows = on_disk["results"]
    variants = {(r["variant"], r["backend"]) for r in rows}
    assert variants == {("dense", "dense"), ("2:4", "dense-storage"), ("armor", "dense-storage"),
                        ("armor-triton", "dense-storage")}
    assert len(rows) == 2 * 2 * 2 * 4  # layers x dtypes x M x variants
    for r in rows:  # every variant was checked, and passed, before timing
        assert r["correct"] is not None and r["correct"]["passed"], r
        assert r["median_ms"] > 0 and r["runs"] >= 3 and r["rotating_inputs"] >= 1
    for s in on_disk["summary"]:
        assert {"speedup_24", "speedup_armor", "armor_frac_of_24", "limit", "overhead"} <= set(s)
        assert s["limit"] == pytest.approx(1 / (0.5 + s["overhead"]))
    assert out.with_suffix(".png").is_file()
    assert res["summary"] == on_disk["summary"]


def test_layer_fused_group_against_its_members(tmp_path):
    res = bench_layer.main(["--smoke", "--layers", "qkv,q,k,v", "--dtype", "fp32", "--out", str(tmp_path / "f.json"),
                            "--plot", "none"])
    qkv = [r for r in res["results"] if r["layer"] == "qkv"]
    assert qkv and all(r["d_out"] == 64 + 2 * 32 and r["correct"]["passed"] for r in qkv)  # tiny: h 64, kv 32
    assert {(f["group"], f["M"]) for f in res["fused"]} == {("qkv", 1), ("qkv", 8)}
    for f in res["fused"]:
        parts = sum(s["armor_ms"] for s in res["summary"] if s["M"] == f["M"] and s["layer"] in ("q", "k", "v"))
        assert f["parts_armor_ms"] == pytest.approx(parts) and f["fused_over_parts"] > 0
    assert bench_layer.main(["--smoke", "--layers", "qkv", "--dtype", "fp32", "--out", str(tmp_path / "g.json"),
                             "--plot", "none"])["fused"] == []  # no members timed: nothing to compare


def test_layer_check_catches_a_wrong_variant():
    S, A, B = bench_layer.make_factors(32, 16, 8, seed=0)
    x = torch.randn(4, 32)
    wrong = lambda v: v @ S.T  # noqa: E731  (plain 2:4 output checked against the ARMOR weight)
    from solver.blockdiag import product

    assert not bench_layer.check(wrong, x, product(A, S, B), "fp32")["passed"]
    assert bench_layer.check(wrong, x, S, "fp32")["passed"]


@pytest.mark.gpu
def test_layer_gpu_backends_quick(tmp_path):
    res = bench_layer.main(["--suite", "smollm2-135m", "--layers", "gate", "--m", "16,128", "--dtype", "fp16",
                            "--iters", "5", "--out", str(tmp_path / "g.json"), "--plot", "none"])
    assert all(r["correct"]["passed"] for r in res["results"] if r["correct"] is not None)


def test_blockdiag_impls_match_the_module_on_cpu():
    from engines.blockdiag_triton import armor_forward, block_diag_apply, describe
    from engines.torch_module import ArmorLinear
    from solver.blockdiag import apply_input_side

    S, A, B = bench_layer.make_factors(48, 32, 16, seed=1)
    x = torch.randn(2, 5, 48)
    assert describe("cpu") == "torch-fallback"
    torch.testing.assert_close(block_diag_apply(x, B), apply_input_side(x, B), rtol=0, atol=0)
    m = ArmorLinear(S, A, B, torch.randn(32))
    with torch.inference_mode():
        torch.testing.assert_close(armor_forward(m, x), m(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown block-diagonal"):
        block_diag_apply(x, B, impl="cuda-magic")


@pytest.mark.gpu
def test_blockdiag_triton_matches_torch_on_gpu():
    from engines.blockdiag_triton import block_diag_apply, triton_usable

    if not triton_usable("cuda"):
        pytest.skip("triton is not installed")
    for T, b in ((1, 32), (77, 64), (300, 128)):
        blocks = torch.randn(6, b, b, device="cuda", dtype=torch.float16) / b ** 0.5
        x = torch.randn(T, 6 * b, device="cuda", dtype=torch.float16)
        ref = block_diag_apply(x.float(), blocks.float(), impl="torch")
        torch.testing.assert_close(block_diag_apply(x, blocks).float(), ref, rtol=2e-2, atol=2e-2)


def test_e2e_smoke_tiny_artifact(tiny_artifact, tmp_path):
    from benchmarks import bench_e2e

    out = tmp_path / "e2e.json"
    threads = torch.get_num_threads()
    try:  # one thread: tiny ops on a shared 2-core machine stall in OpenMP barriers otherwise
        res = bench_e2e.main(["--artifact", str(tiny_artifact), "--prefill", "1x16,2x16", "--ort-prefill", "1x16",
                              "--decode-prompt", "8", "--decode-tokens", "4", "--iters", "2", "--threads", "1",
                              "--ort-cache", str(tmp_path / "ort"), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    on_disk = json.loads(out.read_text())
    assert on_disk["schema"] == bench_e2e.SCHEMA and on_disk["schema_version"] == 1
    phases = {(s["engine"], s["phase"]) for s in on_disk["summary"]}
    assert {("torch", "prefill 1x16"), ("torch", "prefill 2x16"), ("torch", "decode b1")} <= phases
    if "ort" in on_disk["skipped"]:  # optional engine: a skip must say why
        assert on_disk["skipped"]["ort"]
    else:
        assert {("ort-cpu", "prefill 1x16"), ("ort-cpu", "decode b1")} <= phases
    for r in on_disk["results"]:
        assert r["tokens_per_s"] > 0 and r["median_ms"] > 0
    # dense = A.S.B in nn.Linear computes the same function: greedy tokens agree
    assert on_disk["greedy_token_agreement"]["torch"] == 1.0
    assert res["summary"] == on_disk["summary"]


def test_densify_matches_armor(tiny_artifact):
    from benchmarks.bench_e2e import densify
    from engines.torch_module import ArmorLinear, load_armor_model

    armor, _ = load_armor_model(tiny_artifact)
    dense, _ = load_armor_model(tiny_artifact)
    densify(dense)
    assert not any(isinstance(m, ArmorLinear) for m in dense.modules())
    ids = torch.randint(3, 300, (1, 12))
    with torch.inference_mode():
        torch.testing.assert_close(dense(ids).logits, armor(ids).logits, rtol=1e-4, atol=1e-4)


def test_solver_speed_smoke_reference_reaches_the_same_loss():
    from benchmarks.solver_speed import main

    res = main(["--smoke", "--iters", "2", "--check-iters", "4", "--threads", "1"])
    assert [r["shape"] for r in res["shapes"]] == ["q/o", "k/v", "gate/up", "down"]
    for r in res["shapes"]:
        # the reference (autograd, 16 products) and ours (analytic, 6) take the same step: fp32 rounding only
        assert r["rel_diff"] < 1e-4, r
        assert r["ours_loss"] < r["loss_start"]
        assert r["ref_ms"] > 0 and r["ours_ms"] > 0 and r["preset_ms"] >= r["ours_ms"] * 0.5
    assert res["whole_model"]["sparse_rounds"] >= 1 and res["whole_model"]["projected_s"] > 0


def test_refit_ablation_smoke(tiny_model_dir, tiny_text_dir, tmp_path):
    """The refit ablation on the tiny model: the refit never raises a baseline's output loss; JSON written."""
    import json

    from benchmarks.refit_ablation import main

    out = tmp_path / "abl.json"
    res = main(["--model", str(tiny_model_dir), "--methods", "nowag,sparsegpt", "--block-size", "8", "--calib-text",
                str(tiny_text_dir / "calib"), "--calib-samples", "4", "--calib-seqlen", "32", "--eval-text",
                str(tiny_text_dir / "eval"), "--eval-windows", "2", "--eval-seqlen", "32", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    for r in res["runs"]:
        assert r["mean_output_loss_after"] < r["mean_output_loss_before"], r["method"]
        assert r["ppl_before"] > 0 and r["ppl_after"] > 0


def test_onnx_speed_variants_take_turns(tiny_artifact):
    from benchmarks import onnx_speed

    order = []
    onnx_speed.interleaved_medians({"x": lambda: order.append("x"), "y": lambda: order.append("y")}, reps=2, warmup=1)
    assert order == ["x", "y"] * 3  # one warm-up round, then the variants take turns
    assert [v[0] for v in onnx_speed.variants([tiny_artifact, tiny_artifact], ["u", "f"])] == ["dense", "u", "f"]
    for bad in (["dense", "x"], ["x", "x"], ["x"]):
        with pytest.raises(SystemExit):
            onnx_speed.variants([tiny_artifact, tiny_artifact], bad)


@pytest.mark.slow
def test_onnx_speed_times_several_artifacts(tiny_artifact, tmp_path):
    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_speed
    from benchmarks.synth import with_random_blocks

    ab = with_random_blocks(tiny_artifact, tmp_path / "ab", identity=False)
    res = onnx_speed.main(["--artifact", str(tiny_artifact), "--artifact", str(ab), "--name", "plain", "--name", "ab",
                           "--work", str(tmp_path / "w"), "--threads", "1", "--reps", "2", "--decode-steps", "2",
                           "--seq", "16", "--past", "8"])
    assert set(res["artifacts"]) == {"dense", "plain", "ab"}
    for k in ("dense", "plain", "ab"):
        assert res[f"{k}_prefill_cpu_ms"] > 0 and res[f"{k}_decode_cpu_ms"] > 0 and res[f"{k}_bytes"] > 0
    assert res["ab_bytes"] > res["plain_bytes"]  # the A/B blocks are in the graph
    assert "ab_prefill_cpu_overhead_pct" in res and "dense_prefill_cpu_overhead_pct" not in res


def test_onnx_layouts_compute_the_same_function(tmp_path):
    """benchmarks.onnx_layouts: every layout of the block products is the exporter's function (fp32 sums in
    another order only), timed and written to the JSON; an unknown layout is a usage error."""
    from benchmarks import onnx_layouts

    out = tmp_path / "layouts.json"
    assert onnx_layouts.main(["--linears", "2", "--tokens", "3,5", "--reps", "1,1", "--rounds", "1",
                              "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for row in res["runs"].values():
        assert set(row) == set(onnx_layouts.LAYOUTS) and all(r["ms"] > 0 for r in row.values())
        for lay in ("bcast", "einsum", "fmajor"):
            assert row[lay]["max_abs_diff_vs_armor"] < 1e-4, (lay, row[lay])
    with pytest.raises(SystemExit) as e:
        onnx_layouts.main(["--layouts", "dense,conv"])
    assert e.value.code == 2
