"""The ARMOR module for TensorRT-LLM's PyTorch backend, checked against the calls TensorRT-LLM makes.

TensorRT-LLM cannot be installed here (no GPU); tests that need it are marked ``trtllm`` and skip with
the reason. ``NATIVE_CALLS`` lists, from the TensorRT-LLM source named in ``engines/trtllm_model.py``,
every method, keyword and attribute the native model code calls or reads on the linears the ARMOR module
replaces; each is exercised on the module here.
"""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines.trtllm_linear import ArmorTrtllmLinear, Part, QUANT_PROBES, projection_plan

# how objects travel to worker processes (the LLM API's workers get the model-class table pickled the same way)
WORKER_PICKLER = "from multiprocessing.reduction import ForkingPickler as P"

ROOT = Path(__file__).resolve().parents[2]

# (where in TensorRT-LLM, the call) - read from the files and commits named in engines/trtllm_model.py
NATIVE_CALLS = [
    ("modeling_utils.DecoderModelForCausalLM.__post_init__", "module.create_weights()"),
    ("attention.Attention.create_weights", "self.o_proj.create_weights()"),
    ("attention.Attention.create_weights", "o_proj.has_fp8_qdq / has_nvfp4 / has_fp8_block_scales / "
                                           "has_fp8_rowwise / has_w4a8_nvfp4_fp8"),
    ("attention.Attention._use_quantize_output", "o_proj.has_nvfp4, o_proj.force_dynamic_quantization, "
                                                 "hasattr(o_proj, 'pre_quant_scale')"),
    ("attention.Attention.forward", "qkv = self.qkv_proj(hidden_states)"),
    ("attention._helix_cp_output_projection", "o_proj(x, all_reduce_params=..., lora_params=..., layer_idx=...)"),
    ("gated_mlp.GatedMLP.forward", "h1 = self.gate_up_proj(x)"),
    ("gated_mlp.GatedMLP.forward", "down_proj(h2, all_reduce_params=..., layer_idx=...)"),
    ("gated_mlp.GatedMLP.forward_lora", "down_proj(h2, all_reduce_params=..., lora_params=..., layer_idx=...)"),
    ("gated_mlp.GatedMLP._apply_activation", "down_proj.has_fp8_qdq / has_w4a8_nvfp4_fp8"),
    ("modeling_utils._load_weights_impl", "module.load_weights(weights=[q, k, v] | [gate, up] | [one])"),
    ("checkpoints/hf/weight_mapper._duplicate_kv_weights", "module.quant_config.quant_mode.has_nvfp4()"),
    ("pyexecutor/model_loader", "module.post_load_weights(); getattr(module, '_weights_removed', False)"),
]

B = 8


def _part(name, d_out, d_in, bias=True):
    return Part(name, d_out, d_in, True, B, True, True, bias)


def _weights(part: Part, g: torch.Generator) -> dict:
    out = {}
    for key, shape in part.shapes().items():
        t = torch.randn(shape, generator=g)
        if key in ("A", "B"):
            t = torch.eye(B) + 0.05 * t
        out[key] = t
    if "S" in out:
        from solver.sparsity import mask_24

        out["S"] = out["S"] * mask_24(out["S"].abs())
    return out


def _reference(part: Part, w: dict, x: torch.Tensor) -> torch.Tensor:
    from engines.torch_module import ArmorLinear

    if not part.armor:
        return torch.nn.functional.linear(x, w["weight"], w.get("bias"))
    return ArmorLinear(w["S"], w.get("A"), w.get("B"), w.get("bias"))(x)


class _QuantMode:
    def has_nvfp4(self):
        return False


class _NativeLike(torch.nn.Module):
    """What the ARMOR module copies from the native Linear it replaces (plain attributes)."""

    def __init__(self):
        super().__init__()
        self.tp_size, self.tp_rank, self.dtype = 1, 0, torch.float32
        self.quant_config = type("QuantConfig", (), {"quant_mode": _QuantMode()})()


@pytest.fixture()
def qkv():
    parts = (_part("l.q_proj", 32, 64), _part("l.k_proj", 16, 64), Part("l.v_proj", 16, 64, False, has_bias=True))
    g = torch.Generator().manual_seed(0)
    return ArmorTrtllmLinear(parts, like=_NativeLike()), [_weights(p, g) for p in parts]


def test_native_lifecycle_calls(qkv):
    mod, ws = qkv
    assert not list(mod.parameters())  # skip_create_weights_in_init: created in __post_init__
    mod.create_weights()
    mod.create_weights()  # idempotent (Attention.create_weights calls it again on o_proj)
    assert all(getattr(mod, probe) is False for probe in QUANT_PROBES)
    assert mod.force_dynamic_quantization is False and not hasattr(mod, "pre_quant_scale")
    assert mod.quant_config.quant_mode.has_nvfp4() is False  # carried from the native module
    assert getattr(mod, "_weights_removed", False) is False
    assert len(mod._parameters) > 0  # the native loaders only visit modules with direct parameters
    inspect.signature(mod.load_weights).bind(weights=ws)
    inspect.signature(mod.load_weights).bind(weights=ws, allow_partial_loading=True)
    mod.load_weights(weights=ws)
    mod.post_load_weights()
    assert mod.semi_structured_parts == 0  # CPU: S stays dense
    x = torch.randn(5, 64)
    ref = torch.cat([_reference(p, w, x) for p, w in zip(mod.parts, ws)], -1)
    for kwargs in ({}, {"all_reduce_params": None, "lora_params": None, "layer_idx": 3},
                   {"all_reduce_params": None, "layer_idx": 0}):
        inspect.signature(mod.forward).bind(x, **kwargs)
        torch.testing.assert_close(mod(x, **kwargs), ref, rtol=0, atol=0)  # fp32, same ops: identical
    assert mod(x).shape == (5, mod.out_features) == (5, 64)


def test_load_weights_says_what_is_missing(qkv):
    mod, ws = qkv
    del ws[1]["B"]
    with pytest.raises(KeyError, match=r"l\.k_proj\.B"):
        mod.load_weights(weights=ws)
    with pytest.raises(ValueError, match="2 weight dicts for 3 parts"):
        mod.load_weights(weights=ws[:2])
    mod.load_weights(weights=ws, allow_partial_loading=True)


def test_lora_delta_is_added(qkv):
    mod, ws = qkv
    mod.load_weights(weights=ws)
    seen = []

    class Lora(torch.nn.Module):
        def forward(self, x, lora_params, layer_idx):
            seen.append(layer_idx)
            return torch.ones(x.shape[0], mod.out_features)

    mod.lora = Lora()
    x = torch.randn(2, 64)
    torch.testing.assert_close(mod(x, lora_params={"x": 1}, layer_idx=7), mod(x) + 1)
    assert seen == [7]


def test_tensor_parallel_is_a_clear_error():
    from engines.trtllm_linear import TensorParallelUnsupported

    native = _NativeLike()
    native.tp_size = 2
    with pytest.raises(TensorParallelUnsupported, match="tensor_parallel_size=1"):
        ArmorTrtllmLinear((_part("l.o_proj", 64, 64),), like=native)


def test_module_imports_by_qualified_name_and_pickles(qkv, tmp_path):
    """A fresh process (as TensorRT-LLM's worker is) unpickles the classes by their qualified name and builds a
    working module from pickled parts; there, without TensorRT-LLM, importing the model module is one clear
    ImportError saying how to install it."""
    from multiprocessing.reduction import ForkingPickler

    mod, _ = qkv
    (tmp_path / "c.pkl").write_bytes(bytes(ForkingPickler.dumps((ArmorTrtllmLinear, Part, mod.parts))))
    code = (f"{WORKER_PICKLER}; import sys, importlib, torch; lin = importlib.import_module('engines.trtllm_linear')\n"
            "cls, part, parts = P.loads(open(sys.argv[1], 'rb').read())\n"
            "assert cls is lin.ArmorTrtllmLinear and part is lin.Part and P.loads(P.dumps(cls)) is cls\n"
            "m = cls(parts); m.create_weights(); print('tensorrt_llm' in sys.modules, m(torch.ones(2, 64)).shape[-1])\n"
            "try:\n    import engines.trtllm_model\n    print('imported')\n"
            "except ImportError as e:\n    print(type(e).__name__, 'pip install tensorrt-llm' in str(e))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.pkl")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = r.stdout.strip().splitlines()
    assert first == "False 64"
    if __import__("importlib.util").util.find_spec("tensorrt_llm") is None:
        assert second == "TrtllmUnavailable True"


def test_projection_plan_follows_the_family_table():
    from transformers import AutoConfig

    from armor_export.adapters import model_facts

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100)
    info = lambda s: {"shape": s, "block_size": B, "has_A": True, "has_B": True, "has_bias": False}  # noqa: E731
    layers = {"model.layers.0.self_attn.q_proj": info([64, 64]), "model.layers.0.self_attn.v_proj": info([32, 64]),
              "model.layers.0.mlp.down_proj": info([64, 96])}
    plan = projection_plan(model_facts(cfg), layers)
    assert set(plan) == {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj"}  # o, gate_up dense
    q, k, v = plan["model.layers.0.self_attn.qkv_proj"]
    assert (q.armor, k.armor, v.armor) == (True, False, True)
    assert (k.d_out, k.d_in, k.name) == (32, 64, "model.layers.0.self_attn.k_proj")


@pytest.mark.trtllm
def test_model_classes_register_on_import_in_a_fresh_process():
    code = (f"{WORKER_PICKLER}; import engines.trtllm_model as m; "
            "from tensorrt_llm._torch.models.modeling_utils import MODEL_CLASS_MAPPING as M; "
            "from armor_export.adapters import FAMILIES; "
            "names = sorted(m.registered()); assert names, 'nothing registered'; "
            "assert all(M[n] is getattr(m, n) and P.loads(P.dumps(M[n])) is M[n] for n in names); "
            "assert set(names) <= {f.trtllm_architecture for f in FAMILIES.values()}; print(names)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ArmorLlamaForCausalLM" in r.stdout


def test_trtllm_modules_import_no_pipeline_and_form_no_cycle():
    """Every import, also inside functions: no armor_export.pipeline; no engine module imports one that
    (directly or not) imports it back."""
    import ast

    mods = ("trtllm", "trtllm_gpu_check", "trtllm_linear", "trtllm_model", "hf_checkpoint", "parity", "torch_module",
            "base")

    def imports(name: str) -> set[str]:
        tree = ast.parse((ROOT / "engines" / f"{name}.py").read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                out.add(node.module)
                if node.module == "engines":
                    out |= {f"engines.{a.name}" for a in node.names}
        return out

    graph = {m: {i.removeprefix("engines.") for i in imports(m) if i.startswith("engines.")} & set(mods)
             for m in mods}
    assert not any("armor_export.pipeline" in imports(m) for m in mods)

    def reaches(a: str, b: str, seen=()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph[a])

    assert not [m for m in mods if reaches(m, m)], graph


# ---- fused groups (``--fuse``): one ArmorTrtllmFusedLinear per native qkv_proj / gate_up_proj

# what the native loaders (v1 _load_weights_impl, v2 HfWeightMapper) do with a module, by its last name: a fused
# native name gets one dict per member, each the checkpoint tensors under the member's name; any other module one
# dict with the tensors under its own name (tensor parallel 1: the kv-head duplication leaves tensors as they are)
NATIVE_MEMBER_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
NATIVE_CALLS += [
    ("modeling_utils._load_weights_impl / hf.weight_mapper.HfWeightMapper.apply_callbacks",
     "qkv_proj.load_weights(weights=[under q_proj, under k_proj, under v_proj]); empty for a fused checkpoint"),
    ("engines.trtllm_model.ArmorModelMixin.load_weights (before the native load_weights)",
     "load_fused_weights: fused.load_weights(weights=[{S, A, B, bias} under the fused name])"),
]


def _under(prefix: str, weights) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix)}


def native_load(model: torch.nn.Module, weights) -> None:
    """The native loaders' visit: every module with direct parameters, fused native names by member."""
    for name, module in model.named_modules():
        if not module._parameters:
            continue
        parent, _, last = name.rpartition(".")
        if last in NATIVE_MEMBER_NAMES:
            module.load_weights(weights=[_under(f"{parent}.{m}", weights) for m in NATIVE_MEMBER_NAMES[last]])
        else:
            module.load_weights(weights=[_under(name, weights)])


class Consumable(dict):
    """The two things the loaders use of TensorRT-LLM's ConsumableWeightsDict: items() and mark_consumed(prefix)."""

    def mark_consumed(self, prefix: str) -> int:
        gone = [k for k in self if k.startswith(prefix + ".")]
        for k in gone:
            del self[k]
        return len(gone)


def _fused_setup(qkv_bias: bool = True):
    """A one-layer Llama-shaped skeleton (native-like modules at the native paths), the checkpoint's armor.layers /
    armor.groups for fused qkv and gate_up (+ o_proj, down_proj as ARMOR parts) and a checkpoint weight dict."""
    from transformers import AutoConfig

    from armor_export.adapters import model_facts
    from solver.sparsity import mask_24

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100)
    facts = model_facts(cfg)
    L = "model.layers.0"
    g = torch.Generator().manual_seed(3)
    shapes = {f"{L}.self_attn.qkv_proj": (128, 64), f"{L}.self_attn.o_proj": (64, 64),
              f"{L}.mlp.gate_up_proj": (192, 64), f"{L}.mlp.down_proj": (64, 96)}
    groups = {f"{L}.self_attn.qkv_proj": {"members": [f"{L}.self_attn.{m}_proj" for m in "qkv"], "split": [64, 32, 32]},
              f"{L}.mlp.gate_up_proj": {"members": [f"{L}.mlp.gate_proj", f"{L}.mlp.up_proj"], "split": [96, 96]}}
    layers, weights = {}, Consumable({"model.norm.weight": torch.ones(64)})
    for fqn, (d_out, d_in) in shapes.items():
        bias = qkv_bias and "qkv" in fqn
        layers[fqn] = {"shape": [d_out, d_in], "block_size": B, "has_A": True, "has_B": True, "has_bias": bias}
        S = torch.randn(d_out, d_in, generator=g)
        weights[f"{fqn}.S"] = S * mask_24(S.abs())
        weights[f"{fqn}.A"] = torch.eye(B) + 0.05 * torch.randn(d_out // B, B, B, generator=g)
        weights[f"{fqn}.B"] = torch.eye(B) + 0.05 * torch.randn(d_in // B, B, B, generator=g)
        if bias:
            weights[f"{fqn}.bias"] = torch.randn(d_out, generator=g)
    return facts, layers, groups, weights, native_skeleton(shapes)


def native_skeleton(paths) -> torch.nn.Module:
    """A module tree with a native-like linear (``_NativeLike``) at each of ``paths``, for ``armorize``."""
    model = torch.nn.Module()
    for path in paths:
        parent = model
        for part in path.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(path.rsplit(".", 1)[1], _NativeLike())
    return model


def _stacked_reference(weights: dict, fqn: str, x: torch.Tensor) -> torch.Tensor:
    from engines.torch_module import ArmorLinear

    get = (lambda k: weights.get(f"{fqn}.{k}"))
    return ArmorLinear(get("S"), get("A"), get("B"), get("bias"))(x)


def test_fused_group_through_the_native_lifecycle():
    """create_weights, the ARMOR model's fused step, the native loader visit (empty per-member dicts for the fused
    modules), post_load_weights, forward: each fused module is one A.S.B equal to the stacked ArmorLinear, and its
    split is each member's own A_j.S_j.B (+ bias_j), in the native order."""
    from engines.trtllm_linear import ArmorTrtllmFusedLinear, armorize, load_fused_weights, projection_plan
    from solver.factors import Factorization
    from solver.fused import split_factorization

    facts, layers, groups, weights, model = _fused_setup()
    plan = projection_plan(facts, layers, groups)
    armorize(model, plan, torch.float32)
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    gate_up = model.get_submodule("model.layers.0.mlp.gate_up_proj")
    assert isinstance(qkv, ArmorTrtllmFusedLinear) and isinstance(gate_up, ArmorTrtllmFusedLinear)
    assert type(model.get_submodule("model.layers.0.self_attn.o_proj")) is ArmorTrtllmLinear
    assert qkv.split == (64, 32, 32) and qkv.out_features == 128 and len(qkv.parts) == 1
    for m in model.modules():
        if isinstance(m, ArmorTrtllmLinear):
            m.create_weights()
            m.create_weights()
    assert all(getattr(qkv, probe) is False for probe in QUANT_PROBES) and len(qkv._parameters) == 4
    snapshot = dict(weights)
    names = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"]
    assert load_fused_weights(model, weights) == names
    assert not any(".qkv_proj." in k or ".gate_up_proj." in k for k in weights)  # consumed
    seen = []

    def recorded(load):
        def load_weights(weights, **kw):
            seen.append(weights)
            return load(weights=weights, **kw)
        return load_weights

    for mod in (qkv, gate_up):  # record what the native loader hands the fused modules: nothing of theirs
        mod.load_weights = recorded(mod.load_weights)
    native_load(model, weights)
    assert seen == [[{}, {}, {}], [{}, {}]]
    for m in model.modules():
        if isinstance(m, ArmorTrtllmLinear):
            m.post_load_weights()
    assert qkv.semi_structured_parts == 0  # CPU: S stays dense
    x = torch.randn(2, 5, 64)
    for mod, fqn in ((qkv, "model.layers.0.self_attn.qkv_proj"), (gate_up, "model.layers.0.mlp.gate_up_proj")):
        ref = _stacked_reference(snapshot, fqn, x)
        for kwargs in ({}, {"all_reduce_params": None, "lora_params": None, "layer_idx": 0}):
            torch.testing.assert_close(mod(x, **kwargs), ref, rtol=0, atol=0)  # same ops on the same tensors
        f = Factorization(snapshot[f"{fqn}.S"], snapshot[f"{fqn}.A"], snapshot[f"{fqn}.B"])
        sizes = groups[fqn]["split"]
        bias = snapshot.get(f"{fqn}.bias")
        for j, (fj, yj) in enumerate(zip(split_factorization(f, sizes), torch.split(mod(x), sizes, dim=-1))):
            bj = None if bias is None else torch.split(bias, sizes)[j]
            from engines.torch_module import ArmorLinear

            torch.testing.assert_close(yj, ArmorLinear(fj.S, fj.A_blocks, fj.B_blocks, bj)(x))


def test_fused_module_refuses_what_a_fused_checkpoint_cannot_be():
    from engines.trtllm_linear import armorize, load_fused_weights, projection_plan

    facts, layers, groups, weights, model = _fused_setup(qkv_bias=False)
    armorize(model, projection_plan(facts, layers, groups), torch.float32)
    for m in model.modules():  # the model's __post_init__
        if isinstance(m, ArmorTrtllmLinear):
            m.create_weights()
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    with pytest.raises(KeyError, match=r"qkv_proj: no .*qkv_proj\.S/A/B were given.*engines\.trtllm_model"):
        native_load(model, weights)  # the native loader alone: the fused tensors never arrive
    qkv.load_weights(weights=[{}, {}, {}], allow_partial_loading=True)
    member = {"S": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"stored once under .*qkv_proj.*re-export"):
        qkv.load_weights(weights=[member, {}, {}])
    with pytest.raises(KeyError, match=r"qkv_proj\.A"):
        qkv.load_weights(weights=[{"S": weights["model.layers.0.self_attn.qkv_proj.S"]}])
    load_fused_weights(model, weights)
    qkv.load_weights(weights=[{}, {}, {}])  # after the fused step: accepted
    bad = {g: {**r, "members": list(reversed(r["members"]))} for g, r in groups.items()}
    with pytest.raises(ValueError, match="not TensorRT-LLM's"):
        projection_plan(facts, layers, bad)


def test_fused_module_pickles_and_builds_in_a_fresh_process(tmp_path):
    from multiprocessing.reduction import ForkingPickler

    from engines.trtllm_linear import ArmorTrtllmFusedLinear, projection_plan

    facts, layers, groups, _, _ = _fused_setup()
    parts = projection_plan(facts, layers, groups)["model.layers.0.self_attn.qkv_proj"]
    (tmp_path / "c.pkl").write_bytes(bytes(ForkingPickler.dumps((ArmorTrtllmFusedLinear, parts))))
    code = (f"{WORKER_PICKLER}; import sys, torch\n"
            "cls, parts = P.loads(open(sys.argv[1], 'rb').read())\n"
            "m = cls(parts); m.create_weights(); print(m(torch.ones(2, 64)).shape[-1], m.split)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.pkl")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "128 (64, 32, 32)"


def test_armor_model_load_weights_calls_the_native_one_as_the_model_loader_would():
    """``load_fused_first`` (the ARMOR model classes' load_weights): fused modules loaded before the native
    load_weights runs; ``weight_mapper`` / ``allow_partial_loading`` passed exactly when the native signature names
    them (TensorRT-LLM releases differ); partial loading asked of a native loader without it is a clear error."""
    from engines.trtllm_linear import armorize, load_fused_first, projection_plan

    facts, layers, groups, weights, model = _fused_setup()
    armorize(model, projection_plan(facts, layers, groups), torch.float32)
    for m in model.modules():
        if isinstance(m, ArmorTrtllmLinear):
            m.create_weights()
    calls = []

    def v1(weights):
        calls.append("v1")
        native_load(model, weights)

    def v2(weights, weight_mapper=None):
        calls.append(("v2", weight_mapper))
        native_load(model, weights)

    def v3(weights, weight_mapper=None, allow_partial_loading=False):
        calls.append(("v3", weight_mapper, allow_partial_loading))
        native_load(model, weights)

    mapper = object()
    load_fused_first(model, v1, dict(weights), mapper)
    load_fused_first(model, v2, dict(weights), mapper)
    load_fused_first(model, v3, dict(weights), mapper, allow_partial_loading=True)
    assert calls == ["v1", ("v2", mapper), ("v3", mapper, True)]
    x = torch.randn(3, 64)
    qkv = "model.layers.0.self_attn.qkv_proj"
    torch.testing.assert_close(model.get_submodule(qkv)(x), _stacked_reference(weights, qkv, x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no partial loading"):
        load_fused_first(model, v2, dict(weights), mapper, allow_partial_loading=True)


@pytest.mark.gpu
def test_fused_module_runs_its_stacked_s_semi_structured_on_cuda():
    """On CUDA in fp16 the stacked S of a fused module becomes ONE semi-structured tensor; the output matches the
    dense fp32 stacked reference within fp16 error."""
    from engines.parity import sqnr_db
    from engines.trtllm_linear import ArmorTrtllmFusedLinear, Part
    from solver.sparsity import mask_24

    g = torch.Generator().manual_seed(0)
    members, split, d_in = ("l.q_proj", "l.k_proj", "l.v_proj"), (256, 128, 128), 256
    part = Part("l.qkv_proj", sum(split), d_in, True, B, True, True, True, members, split)
    S = torch.randn(sum(split), d_in, generator=g)
    w = {"S": S * mask_24(S.abs()), "A": torch.eye(B) + 0.05 * torch.randn(sum(split) // B, B, B, generator=g),
         "B": torch.eye(B) + 0.05 * torch.randn(d_in // B, B, B, generator=g), "bias": torch.randn(sum(split), generator=g)}
    mod = ArmorTrtllmFusedLinear((part,), dtype=torch.float16, like=_NativeLike())
    mod.create_weights()
    mod.to("cuda")
    mod.load_weights(weights=[{k: v.cuda() for k, v in w.items()}])
    mod.post_load_weights()
    assert mod.semi_structured_parts == 1
    x = torch.randn(64, d_in, generator=g)
    got = mod(x.cuda().half()).float().cpu()
    assert sqnr_db(_stacked_reference({f"l.qkv_proj.{k}": v for k, v in w.items()}, "l.qkv_proj", x), got) >= 30
