"""Every family through every ONNX engine: tiny random models with their quirks on (benchmarks.synth.FAMILY_QUIRKS:
llama3 RoPE, q/k/v/o and MLP biases, sliding windows shorter than the sequences, alternating sliding layers,
GQA, head_dim != hidden/heads, untied lm_head, missing bos, q/k norms, fused Phi-3 projections, Gemma 2's
norm offset / embedding scale / soft-capping), pruned with ARMOR (2 iterations) -> artifact -> engines.

Reference: the artifact's PyTorch runtime in fp32 on CPU. Tolerances per dtype (engines.parity.TOLERANCES, and
stated here): fp32 ONNX logits >= 100 dB SQNR (measured 124-137 dB), top-1 = 1, greedy tokens identical through
the ORT KV graph and onnxruntime-genai; fp16 TensorRT ONNX run in ORT CPU >= 30 dB (the fp16 row). One artifact
and one "onnx" engine folder per family and variant (module-scoped), one parity sequence of 40 tokens (> every
window). The "fused" variant prunes with ``--fuse qkv,gate_up`` (one stacked layer and one shared B per q/k/v and
gate/up group; Phi-3's projections are fused in the model already, so its fused variant has no groups) and checks
the same parity through the fused graph (one B-product, one stacked S MatMul, one A-product and a Split per group)
against the fused PyTorch runtime. The unfused graphs' structure is pinned (``UNFUSED_DIGESTS``). The TensorRT-LLM
checkpoint of both variants loads back identically (fp32) and its ARMOR TensorRT-LLM modules, loaded the way
TensorRT-LLM loads them, reproduce the runtime module by module (a fused group: one module under the native name).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.synth import FAMILY_QUIRKS, family_artifact
from engines.base import ExportConfig

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")

FAMILIES = sorted(FAMILY_QUIRKS)
SEQ = 40  # > 2 x the longest window (12) + the greedy prompt
FP32_FLOOR_DB = 100.0
FUSE = ("qkv", "gate_up")
VARIANTS = [(f, v) for v in ("unfused", "fused") for f in FAMILIES]
# structure_digest of the unfused fp32 logits / KV graphs of every family's test model, as written before fused
# groups were lowered (commit 85c6d82; the model.onnx files were byte-identical after): the fused lowering must
# leave unfused graphs exactly as they were. A deliberate change of the graph updates these.
UNFUSED_DIGESTS = {
    "gemma2": ("5cc0143afcde5e74", "366b98e575dcd4e2"), "llama": ("51680d3bb0cccaa3", "672832133208ab29"),
    "mistral": ("c0619a06de21c463", "07560a7ca4920a6f"), "phi3": ("a511875c01d132cf", "84daf184114f21b8"),
    "qwen2": ("fbf70331ad69606e", "ec0518ad546575ae"), "qwen3": ("ae653d0a533f09bc", "181f56e788950647"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_text_dir):
    """(family, variant) -> (artifact, onnx engine folder, verify result, parity tokens); built on first use. The
    fused variant prunes the same tiny model folder as the unfused one."""
    from engines.onnx_engine import OnnxLowering

    root, cache = tmp_path_factory.mktemp("families"), {}

    def get(family: str, variant: str = "unfused"):
        if (family, variant) not in cache:
            fuse = FUSE if variant == "fused" else ()
            tag = f"{family}-fused" if fuse else family
            art = family_artifact(root, family, tiny_text_dir / "calib", fuse=fuse)
            low = OnnxLowering()
            eng = low.lower(art, root / f"{tag}-onnx", ExportConfig())
            g = torch.Generator().manual_seed(0)
            toks = tuple(tuple(r) for r in torch.randint(3, 300, (1, SEQ), generator=g).tolist())
            res = low.verify(art, eng, ExportConfig(report_dir=root / f"{tag}-report", parity_tokens=toks))
            cache[family, variant] = (art, eng, res, torch.tensor(toks))
        return cache[family, variant]

    return get


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_onnx_logits_kv_and_genai_match_pytorch(built, family, variant):
    art, eng, res, _ = built(family, variant)
    fig = res["figures"]
    assert res["passed"], {k: v for k, v in res["checks"].items() if not v}
    assert fig["logits SQNR"] >= FP32_FLOOR_DB and fig["top-1 agreement"] == 1.0, fig
    greedy = next(k for k in fig if k.startswith("greedy"))
    assert fig[greedy] == "identical" and "genai" in greedy
    tag = f"{family}-fused" if variant == "fused" else family
    doc = json.loads((art.parent / f"{tag}-report" / "parity.json").read_text())
    assert doc["meta"]["family"] == family and doc["meta"]["parity_tokens"]["seqlen"] == SEQ
    layers = json.loads((art / "manifest.json").read_text())["layers"]
    assert fig["per-layer SQNR (min over lowered linears)"] >= FP32_FLOOR_DB  # every member's slice of the Split
    assert doc["checks"][0]["detail"]["layers"] == len(layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_graph_structure(built, family):
    """Per decoder layer of the fused graph: one linear (3 MatMuls: B, S, A) per fused group and per unfused
    projection, QK^T and PV; a Split per q/k/v and gate/up; the group's S initializer is the members' S stacked
    (bit-exact), 2:4 along d_in and fed straight to its MatMul. Phi-3 (fused in the model): no groups, and the
    graph is the unfused one."""
    from armor_export.artifact import load_artifact
    from engines.onnx_checks import check_s_initializers, op_counts, structure_digest

    art_dir, eng, _, _ = built(family, "fused")
    art = load_artifact(art_dir)
    n = len({name.split(".")[2] for name in art.layers})  # decoder layers
    counts = op_counts(eng / "logits" / "model.onnx")
    groups = art.groups
    if family == "phi3":
        assert groups == {}
        assert structure_digest(eng / "logits" / "model.onnx") == structure_digest(
            built(family)[1] / "logits" / "model.onnx")
    else:
        assert sorted(g.rsplit(".", 1)[1] for g in groups) == ["gate_up_proj"] * n + ["qkv_proj"] * n
    # 4 linears per layer either way (Phi-3 natively, the others fused), + attention's 2 MatMuls; 2 Splits
    assert counts["MatMul"] == n * (4 * 3 + 2) and counts["Split"] == 2 * n, counts
    rep = check_s_initializers(eng / "logits" / "model.onnx")
    assert rep["passed"] and rep["count"] == 4 * n, rep["failures"]
    for g, members in groups.items():
        S = np.load(_initializer(eng / "logits", f"{g}.S"))
        want = torch.cat([art.layers[m].factors.S for m in members]).numpy()
        np.testing.assert_array_equal(S, want)
        assert rep["layers"][f"{g}.S"]["consumer"] == "MatMul" and rep["layers"][f"{g}.S"]["k_axis"] == 1
        B_t = np.load(_initializer(eng / "logits", f"{g}.B_t"))
        np.testing.assert_array_equal(B_t, art.layers[members[0]].factors.B_blocks.transpose(-1, -2).numpy())
        assert not any(f"{m}.S" in rep["layers"] for m in members)


def _initializer(folder, name):
    """One initializer of folder/model.onnx as an .npy file (external data read from disk)."""
    import io

    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / "model.onnx"))
    buf = io.BytesIO()
    np.save(buf, numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name)))
    buf.seek(0)
    return buf


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_graphs_are_unchanged(built, family):
    from engines.onnx_checks import structure_digest

    _, eng, _, _ = built(family)
    got = (structure_digest(eng / "logits" / "model.onnx")[:16], structure_digest(eng / "genai" / "model.onnx")[:16])
    assert got == UNFUSED_DIGESTS[family]


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_kv_form_prefill_then_chunk_past_the_window(built, family, variant):
    """The KV graph fed a 13-token prefill, then the rest with the past: logits equal PyTorch's everywhere."""
    from engines.runners import OrtRunner
    from engines.torch_module import load_armor_model

    art, eng, _, toks = built(family, variant)
    ids = toks[:1]
    model, _ = load_armor_model(art)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    r = OrtRunner(eng / "genai")
    past, (kvh, d), npdt = r.past_spec()
    feeds = {n: np.zeros((1, kvh, 0, d), npdt) for n in past}
    got, cut = [], 13
    for lo, hi in ((0, cut), (cut, SEQ)):
        feeds.update(input_ids=ids[:, lo:hi].numpy(), attention_mask=np.ones((1, hi), np.int64),
                     position_ids=np.arange(lo, hi)[None])
        out = r.run(feeds)
        got.append(torch.from_numpy(out["logits"]))
        feeds.update({n: out[n.replace("past_key_values.", "present.")] for n in past})
    from engines.parity import sqnr_db

    assert sqnr_db(ref, torch.cat(got, 1)) >= FP32_FLOOR_DB


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3", "gemma2"])
def test_window_is_shorter_than_the_test_sequence_and_matters(built, family):
    """Without the window PyTorch's logits change past it, so the parity above covers the window mask."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from armor_export.adapters import model_facts

    art, _, _, toks = built(family)
    src = art.parent / family
    facts = model_facts(AutoConfig.from_pretrained(src))
    w = max(x for x in facts.windows if x)
    assert w < SEQ
    outs = []
    for window in (w, 10 * SEQ):
        m = AutoModelForCausalLM.from_pretrained(src, sliding_window=window).eval()
        with torch.no_grad():
            outs.append(m(input_ids=toks[:1]).logits)
    assert torch.allclose(outs[0][:, :w], outs[1][:, :w], atol=1e-5)
    assert (outs[0][:, w + 1:] - outs[1][:, w + 1:]).abs().max() > 1e-3


def test_genai_config_token_fallbacks_and_window(built):
    art, eng, _, _ = built("qwen2")
    cfg = json.loads((eng / "genai" / "genai_config.json").read_text())
    assert json.loads((art / "config.json").read_text()).get("bos_token_id") is None
    assert cfg["model"]["bos_token_id"] == cfg["model"]["eos_token_id"] == 2  # bos falls back to eos
    assert cfg["model"]["decoder"]["sliding_window"] == {"window_size": 12, "slide_key_value_cache": False,
                                                         "slide_inputs": False}


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_tensorrt_onnx_written_and_checked(built, family, variant, tmp_path):
    """The TensorRT engine's fp16 ONNX: every S 2:4 along K and fed straight to its MatMul; run in ORT CPU.
    (Where TensorRT is installed the engines are built too; the GPU build and its parity are test_trt.py's.)
    Fused: one stacked S per group, so 4 S initializers per decoder layer instead of 7."""
    from engines import EngineUnavailable
    from engines.onnx_checks import check_s_initializers
    from engines.parity import TOLERANCES, error_stats
    from engines.runners import OrtRunner, logits_feeds
    from engines.tensorrt import TensorRTLowering
    from engines.torch_module import load_armor_model

    art, _, _, toks = built(family, variant)
    try:
        out = TensorRTLowering().lower(art, tmp_path / "trt", ExportConfig(dtype="fp16"))
    except EngineUnavailable:
        out = tmp_path / "trt"  # no TensorRT here: the checked ONNX is still written
    rep = check_s_initializers(out / "onnx" / "model.onnx")
    man = json.loads((art / "manifest.json").read_text())
    n_layers = len(man["layers"]) - sum(len(g["members"]) - 1 for g in man.get("groups", {}).values())
    assert rep["passed"] and rep["count"] == n_layers
    assert variant == "unfused" or family == "phi3" or n_layers == 4 * 2
    model, _ = load_armor_model(art)
    with torch.no_grad():
        ref = model(input_ids=toks[:1]).logits
    got = OrtRunner(out / "onnx").run(logits_feeds(toks[:1].numpy()))["logits"].astype(np.float32)
    assert error_stats(ref, torch.from_numpy(got))["sqnr_db"] >= TOLERANCES["fp16"]["logits_sqnr_db"]


def test_unsupported_feature_fails_before_any_work(tmp_path, capsys):
    """A feature the graph cannot express (dynamic RoPE): requires() names family, feature and engine; the
    one-shot CLI run exits 2 before pruning and writes nothing."""
    from transformers import AutoConfig

    from armor_export.adapters import UnsupportedFeature
    from armor_export.cli import main
    from engines import get_lowering

    d = tmp_path / "dyn"
    AutoConfig.for_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}).save_pretrained(d)
    for engine in ("onnx", "genai", "tensorrt"):
        with pytest.raises(UnsupportedFeature, match=rf"family 'llama' needs RoPE type 'dynamic'.*'{engine}' engine"):
            get_lowering(engine).requires(d, ExportConfig())
    rc = main(["--engine", "onnx", "--model", str(d), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "RoPE type 'dynamic'" in err and "'onnx' engine" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_trtllm_checkpoint_loads_back_or_is_refused(built, family, variant, tmp_path):
    """The TensorRT-LLM checkpoint of every family and variant loads back (engines.hf_checkpoint, no TensorRT-LLM)
    with logits identical to the artifact's runtime in fp32 (same operations on the same values: max |diff| == 0;
    fused: the fused runtime, one ArmorLinear per group). For the families TensorRT-LLM takes, the ARMOR module plan
    covers exactly the checkpoint's ARMOR tensors, and each fused group is one fused module under the native name
    (format 3; the unfused form stays format 2); the others (Phi-3, Gemma 2) are refused by requires() naming family
    and engine. Phi-3's fused variant has no groups (its model is fused already): format 2, refused as unfused."""
    from armor_export.adapters import UnsupportedFeature, model_facts
    from armor_export.artifact import load_artifact
    from engines import hf_checkpoint as hfc
    from engines import hf_checkpoint_checks as hfck
    from engines.parity import compare
    from engines.trtllm import REFUSED, TRTLLM_FAMILIES, TrtllmLowering, artifact_logits
    from engines.trtllm_linear import projection_plan
    from transformers import AutoConfig

    art, _, _, toks = built(family, variant)
    groups = load_artifact(art).groups
    assert bool(groups) == (variant == "fused" and family != "phi3")
    ck = hfc.write_checkpoint(art, tmp_path / "ck", dtype="fp32")
    assert hfck.schema_problems(ck, load_artifact(art)) == []
    armor = hfc.read_config(ck)["armor"]
    assert armor["format_version"] == (3 if groups else 2) and set(armor.get("groups", {})) == set(groups)
    got, _ = hfc.checkpoint_logits(ck, toks)
    ref = artifact_logits(art, toks, torch.float32)
    assert torch.equal(got, ref), compare(ref, got)
    low, cfg = TrtllmLowering(), ExportConfig()
    if family not in TRTLLM_FAMILIES:
        with pytest.raises(UnsupportedFeature, match=f"family '{family}'.*'trtllm' engine"):
            low.requires(art, cfg)
        assert family in REFUSED
        return
    low.requires(art, cfg)
    layers = armor["layers"]
    header = hfc.read_headers(ck)
    plan = projection_plan(model_facts(AutoConfig.from_pretrained(ck)), layers, armor.get("groups"))
    planned = {f"{p.name}.{k}": list(s) for parts in plan.values() for p in parts for k, s in p.shapes().items()}
    armor_t = {k: h["shape"] for k, h in header.items() if k.rsplit(".", 1)[0] in layers}
    dense_in_plan = {k: header[k]["shape"] for k in planned if k not in armor_t}
    assert {k: v for k, v in planned.items() if k in armor_t} == armor_t and set(armor_t) <= set(planned)
    assert all(planned[k] == v for k, v in dense_in_plan.items())  # dense parts of a fused module: real tensors
    for g, members in groups.items():  # one fused part, the group's members in the native order
        (part,) = plan[g]
        assert part.members == members and sum(part.split) == part.d_out == header[f"{g}.S"]["shape"][0]
    _trtllm_modules_match_the_checkpoint_runtime(ck, plan)


def _trtllm_modules_match_the_checkpoint_runtime(ck, plan):
    """The ARMOR TensorRT-LLM modules of the plan, built on a native-like skeleton and loaded as TensorRT-LLM loads
    them (the ARMOR model's fused step, then the native per-module visit, test_trtllm_model.native_load), give, per
    native module, exactly the plain runtime's output: the fused module its group's one ArmorLinear, a parts module
    its members' outputs concatenated."""
    from safetensors.torch import load_file

    from engines import hf_checkpoint as hfc
    from engines.trtllm_linear import ArmorTrtllmFusedLinear, ArmorTrtllmLinear, armorize, load_fused_weights
    from tests.engines.test_trtllm_model import native_load, native_skeleton

    tensors = {}
    for f in sorted(set(hfc.weight_files(ck).values())):
        tensors.update(load_file(str(f)))
    skeleton = native_skeleton(plan)
    armorize(skeleton, plan, torch.float32)
    for m in skeleton.modules():
        if isinstance(m, ArmorTrtllmLinear):
            m.create_weights()
    fused = load_fused_weights(skeleton, tensors)
    native_load(skeleton, tensors)
    runtime, _, _ = hfc.load_checkpoint_model(ck)
    for path, parts in plan.items():
        mod = skeleton.get_submodule(path)
        mod.post_load_weights()
        xin = torch.randn(3, parts[0].d_in)
        if isinstance(mod, ArmorTrtllmFusedLinear):
            assert path in fused
            ref = runtime.get_submodule(path)(xin)
        else:
            ref = torch.cat([runtime.get_submodule(p.name)(xin) for p in parts], -1)
        assert torch.equal(mod(xin), ref), path
