"""ONNX engine: graph structure, 2:4 bytes, parity with the PyTorch runtime, verify report.

Fast tests use the tiny ARMOR artifact with random non-identity A/B blocks and a bias (so every
subgraph of the lowering is exercised); SmolLM2 tests are marked slow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from armor_export.artifact import load_artifact
from benchmarks.synth import with_random_blocks
from engines.onnx_checks import check_s_initializers, is_24, op_counts
from engines.onnx_export import export_onnx
from engines.parity import error_stats
from engines.runners import OrtRunner, greedy_kv, logits_feeds

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def armor_art(tiny_artifact, tmp_path_factory) -> Path:
    return with_random_blocks(tiny_artifact, tmp_path_factory.mktemp("onnx") / "armor_ab", identity=False)


@pytest.fixture(scope="module")
def fp32_logits(armor_art, tmp_path_factory) -> Path:
    return export_onnx(armor_art, tmp_path_factory.mktemp("onnx") / "fp32", dtype="fp32", form="logits")


def torch_logits(artifact, ids):
    from engines.torch_module import load_armor_model

    model, _ = load_armor_model(artifact)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_fp32_logits_match_pytorch_with_dynamic_shapes(armor_art, fp32_logits):
    runner = OrtRunner(fp32_logits)
    for shape in [(2, 24), (3, 7), (1, 1)]:
        ids = torch.randint(3, 300, shape)
        ref = torch_logits(armor_art, ids)
        out = torch.from_numpy(runner.run(logits_feeds(ids.numpy()))["logits"])
        st = error_stats(ref, out)
        # same-dtype reimplementation (fp32): measured ~3e-7 abs, ~133 dB
        assert st["max_abs"] <= 1e-5 and st["sqnr_db"] >= 100, st


@pytest.mark.parametrize("dtype,floor_db", [("fp16", 40.0), ("bf16", 25.0)])
def test_half_precision_graph(armor_art, tmp_path, dtype, floor_db):
    import onnx

    path = export_onnx(armor_art, tmp_path / dtype, dtype=dtype)
    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    want = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    assert all(t.data_type == want for t in m.graph.initializer if t.name.endswith((".S", ".A_t", ".B_t")))
    assert check_s_initializers(path / "model.onnx")["passed"]
    ids = torch.randint(3, 300, (2, 16))
    try:
        runner = OrtRunner(path)
    except Exception as e:  # ORT CPU lacks some bf16 kernels; the graph itself was checked above
        pytest.skip(f"ONNX Runtime CPU cannot run the {dtype} graph: {str(e)[:120]}")
    out = torch.from_numpy(runner.run(logits_feeds(ids.numpy()))["logits"].astype(np.float32))
    st = error_stats(torch_logits(armor_art, ids), out)
    assert st["sqnr_db"] >= floor_db, st  # fp16 measured ~63 dB on this model


def test_op_types_per_linear(armor_art, fp32_logits, tiny_artifact, tmp_path):
    art = load_artifact(armor_art)
    n_layers = 2
    counts = op_counts(fp32_logits / "model.onnx")
    assert "Einsum" not in counts
    # per ARMOR linear: B blocks, S, A blocks; plus QK^T and PV per attention layer
    assert counts["MatMul"] == 3 * len(art.layers) + 2 * n_layers, counts
    ident = export_onnx(with_random_blocks(tiny_artifact, tmp_path / "ident", identity=True), tmp_path / "ident_onnx")
    c2 = op_counts(ident / "model.onnx")
    assert c2["MatMul"] == len(art.layers) + 2 * n_layers, c2  # identity A/B: no MatMul for them
    assert c2.get("Add", 0) == counts["Add"] - len(art.layers)  # no bias: no Add


def test_s_initializers_are_24_along_k_with_positive_zeros(armor_art, fp32_logits):
    import onnx
    from onnx import numpy_helper

    rep = check_s_initializers(fp32_logits / "model.onnx")
    art = load_artifact(armor_art)
    assert rep["passed"] and rep["count"] == len(art.layers), rep["failures"]
    m = onnx.load(str(fp32_logits / "model.onnx"))  # reads model.onnx.data from disk
    inits = {t.name: t for t in m.graph.initializer}
    for name, lf in art.layers.items():
        t = inits[f"{name}.S"]
        assert t.data_location == onnx.TensorProto.EXTERNAL or t.raw_data
        S = numpy_helper.to_array(t)
        assert S.shape == tuple(lf.factors.S.shape)  # [d_out, d_in]: K = d_in = axis 1
        assert is_24(S, 1)[0]
        zeros = S == 0
        assert not np.signbit(S[zeros]).any()
        np.testing.assert_array_equal(S, lf.factors.S.numpy())  # storage round trip: exact
        assert rep["layers"][f"{name}.S"]["consumer"] == "MatMul" and rep["layers"][f"{name}.S"]["k_axis"] == 1


def test_s_check_maps_one_tensor_at_a_time(fp32_logits, monkeypatch):
    """The 2:4 read-back releases each S's mmap of model.onnx.data before the next: its pages count as resident
    memory, so holding every map made the exporter's peak grow with the model (1.3 GB per Llama-3-8B layer)."""
    import engines.onnx_checks as oc

    data = str((fp32_logits / "model.onnx.data").resolve())
    live, real = [], oc.is_24

    def counting(arr, axis):
        with open("/proc/self/maps") as f:
            live.append(sum(data in line for line in f))
        return real(arr, axis)

    monkeypatch.setattr(oc, "is_24", counting)
    rep = oc.check_s_initializers(fp32_logits / "model.onnx")
    assert rep["passed"] and len(live) == rep["count"] > 1
    assert max(live) == 1, live  # before the release: 1, 2, ..., count


def test_s_check_survives_a_view_held_elsewhere(fp32_logits, monkeypatch):
    """A view of an S still referenced (here kept by a wrapper, in practice a profiler's frame) cannot be unmapped:
    the check goes on and the map closes with the view."""
    import engines.onnx_checks as oc

    kept, real = [], oc.is_24
    monkeypatch.setattr(oc, "is_24", lambda arr, axis: (kept.append(arr), real(arr, axis))[1])
    rep = oc.check_s_initializers(fp32_logits / "model.onnx")
    assert rep["passed"] and len(kept) == rep["count"]


def test_negative_zero_is_normalised_and_checks_catch_bad_graphs(tmp_path):
    import onnx_ir as ir
    from onnx_ir import tape as ir_tape
    from onnx_ir.tensor_adapters import TorchTensor

    S = torch.tensor([[1.0, -0.0, 2.0, 0.0], [-0.0, 3.0, -0.0, 4.0], [5.0, 6.0, 7.0, 0.0]])  # last row not 2:4

    def build(name, reshape):
        t = ir_tape.Tape()
        x = ir.Value(name="x", shape=ir.Shape(["n", 4]), type=ir.TensorType(ir.DataType.FLOAT))
        s = t.initializer(TorchTensor(S, name="l.S"), name="l.S")
        if reshape:
            s = t.op("Reshape", [s, t.initializer(ir.tensor(np.array([3, 4], np.int64), name="shp"))])
        y = t.op("MatMul", [x, t.op("Transpose", [s], {"perm": [1, 0]})])
        y.name = "y"
        g = ir.Graph([x], [y], nodes=t.nodes, initializers=t.initializers, opset_imports={"": 20})
        ir.save(ir.Model(g, ir_version=10), tmp_path / name)
        return check_s_initializers(tmp_path / name)

    from types import SimpleNamespace

    from engines.onnx_graph import DecoderGraph

    stub = SimpleNamespace(tdtype=torch.float16, t=ir_tape.Tape())
    v = DecoderGraph.weight(stub, "l.S", S, plus_zero=True)  # the exporter's path for every S
    s16 = v.const_value.numpy()
    assert s16.dtype == np.float16 and not np.signbit(s16[s16 == 0]).any()
    bad = build("bad.onnx", reshape=False)
    assert not bad["passed"] and "groups of 4" in bad["failures"][0] and "-0.0" in bad["failures"][0]
    blocked = build("blocked.onnx", reshape=True)
    assert not blocked["passed"] and "Reshape between" in blocked["failures"][0]


def test_kv_form_greedy_matches_pytorch(armor_art, tmp_path):
    from engines.torch_module import load_armor_model

    kv = export_onnx(armor_art, tmp_path / "kv", form="kv")
    model, _ = load_armor_model(armor_art)
    prompt = [1, 40, 41, 42, 90, 17]
    x = torch.tensor([prompt])
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy_kv(OrtRunner(kv), prompt, 10) == ref


def test_dense_export_matches_source_model(tiny_artifact, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = export_onnx(tiny_artifact, tmp_path / "dense", dense=True)
    counts = op_counts(dense / "model.onnx")
    assert counts["MatMul"] == 14 + 4 and "Einsum" not in counts
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        ref = src(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    out = torch.from_numpy(OrtRunner(dense).run(logits_feeds(ids.numpy()))["logits"])
    assert error_stats(ref, out)["sqnr_db"] >= 100


def test_verify_report_pass_then_fail_on_corrupted_s(armor_art, fp32_logits, tiny_text_dir, tmp_path):
    import json
    import shutil

    import onnx
    from onnx import numpy_helper

    from armor_export.cli import parity_tokens
    from armor_export.config import EvalConfig
    from engines.base import ExportConfig
    from engines.onnx_engine import OnnxLowering

    toks = parity_tokens(armor_art, EvalConfig(text=str(tiny_text_dir / "eval"), windows=2, seqlen=32))
    good = OnnxLowering().verify(armor_art, fp32_logits, ExportConfig(report_dir=tmp_path / "good",
                                                                      parity_tokens=toks))
    assert good["passed"], good
    doc = json.loads((tmp_path / "good" / "parity.json").read_text())
    assert {c["name"].split(" (")[0] for c in doc["checks"]} >= {"logits SQNR", "top-1 agreement",
                                                                  "perplexity relative difference"}
    assert (tmp_path / "good" / "parity.md").read_text().count("PASS") >= 5
    assert "onnxruntime" in doc["meta"]["versions"]

    bad_dir = tmp_path / "corrupt"
    shutil.copytree(fp32_logits, bad_dir)
    m = onnx.load(str(bad_dir / "model.onnx"))
    t = next(t for t in m.graph.initializer if t.name.endswith("layers.1.mlp.down_proj.S"))
    arr = numpy_helper.to_array(t).copy()
    arr[arr == 0] = 0.05  # fills the pruned positions: no longer 2:4, and the layer output changes
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    (bad_dir / "model.onnx.data").unlink()
    onnx.save(m, str(bad_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    bad = OnnxLowering().verify(armor_art, bad_dir, ExportConfig(report_dir=tmp_path / "bad", parity_tokens=toks))
    assert not bad["passed"]
    failed = [k for k, ok in bad["checks"].items() if not ok]
    assert any(k.startswith("S initializers") for k in failed) and any("per-layer" in k for k in failed), failed
    assert "FAIL" in (tmp_path / "bad" / "parity.md").read_text()


@pytest.fixture(scope="module")
def smol_armor(tmp_path_factory):
    """NoWag artifact of the default model with random non-identity A/B (b=32) added."""
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from solver.config import SolverConfig

    d = tmp_path_factory.mktemp("smol")
    art = pipeline.prune(None, SolverConfig(method="nowag", block_size=32), CalibConfig(samples=4, seqlen=128),
                         d / "nowag", progress=False)
    return with_random_blocks(Path(art), d / "armor", identity=False, b=32)


@pytest.mark.slow
def test_smollm2_fp32_and_fp16_parity(smol_armor, tmp_path):
    ids = torch.randint(3, 40000, (1, 96))
    ref = torch_logits(smol_armor, ids)
    for dtype, floor in (("fp32", 60.0), ("fp16", 25.0)):
        path = export_onnx(smol_armor, tmp_path / dtype, dtype=dtype)
        out = torch.from_numpy(OrtRunner(path).run(logits_feeds(ids.numpy()))["logits"].astype(np.float32))
        st = error_stats(ref, out)
        assert st["sqnr_db"] >= floor, (dtype, st)
        if dtype == "fp32":
            assert (ref.argmax(-1) == out.argmax(-1)).float().mean() >= 0.99, st


def test_error_statistics_in_chunks_equal_the_whole_tensor_formulas():
    """verify compares [windows, T, vocab] logits; the statistics run over fp64 chunks (not fp64 copies of both
    tensors) and must equal the one-shot formulas."""
    import math

    from engines.parity import error_stats, perplexity

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 17, 101, generator=g)
    test = ref + 1e-3 * torch.randn(3, 17, 101, generator=g)
    ids = torch.randint(0, 101, (3, 17), generator=g)
    r, t = ref.double(), test.double()
    d = (r - t).abs()
    want = {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "max_rel": (d.max() / r.abs().max()).item(),
            "sqnr_db": 10 * math.log10(r.pow(2).sum().item() / (r - t).pow(2).sum().item())}
    for chunk in (7, 1000, 1 << 22):  # pieces that split windows and rows, and one piece
        got = error_stats(ref, test, chunk)
        assert got == pytest.approx(want, rel=1e-12), chunk
    assert error_stats(ref, ref, 7)["sqnr_db"] == math.inf
    nll = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, 101).double(), ids[:, 1:].reshape(-1))
    assert perplexity(ref, ids) == pytest.approx(math.exp(nll.item()), rel=1e-12)


def test_window_logits_fill_one_preallocated_tensor():
    """verify's logits (PyTorch and ORT) are written window by window into one tensor: equal to the
    concatenation, one call per window, and no window kept alive after it is copied."""
    import weakref

    from engines.parity import stack_windows

    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 7, generator=g)
    tokens = torch.randint(0, 50, (4, 9), generator=g)
    seen, alive = [], []

    def window(ids):
        assert ids.shape == (1, 9)
        out = table[ids].clone()
        seen.append(ids.clone())
        alive.append(weakref.ref(out))
        return out

    got = stack_windows(window, tokens)
    assert torch.equal(got, table[tokens]) and got.dtype == torch.float32
    assert [s[0].tolist() for s in seen] == tokens.tolist()
    assert all(r() is None for r in alive)


def test_logits_checks_of_windows_one_by_one_equal_the_whole_tensors():
    """verify feeds the engine's logits window by window (never whole beside the reference): the checks equal
    those of the whole tensors, and a missing window is an error, not a shorter comparison."""
    from engines.parity import TOLERANCES, compare, logits_checks, perplexity

    g = torch.Generator().manual_seed(1)
    ref = torch.randn(3, 11, 37, generator=g)
    got = ref + 0.05 * torch.randn(3, 11, 37, generator=g)
    ids = torch.randint(0, 37, (3, 11), generator=g)
    whole = logits_checks(ref, got, ids, TOLERANCES["fp16"])
    streamed = logits_checks(ref, (w[None] for w in got), ids, TOLERANCES["fp16"])
    st = compare(ref, got)
    assert whole[0].value == pytest.approx(st["sqnr_db"], rel=1e-12)
    assert whole[2].value == pytest.approx(st["top1_agreement"], rel=1e-12)
    p_ref, p_got = perplexity(ref, ids), perplexity(got, ids)
    assert whole[3].value == pytest.approx(abs(p_got - p_ref) / p_ref, rel=1e-9)
    for a, b in zip(whole, streamed):
        assert (a.name, a.passed) == (b.name, b.passed) and a.value == pytest.approx(b.value, rel=1e-12)
    with pytest.raises(ValueError, match="2 engine windows for 3"):
        logits_checks(ref, iter(got[:2]), ids, TOLERANCES["fp16"])
