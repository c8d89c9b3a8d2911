"""The ARMOR linears that stand in for TensorRT-LLM's ``Linear`` (pure PyTorch: imports without TensorRT-LLM).

TensorRT-LLM's PyTorch backend fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``
``Linear``; the native attention / MLP code splits its output ([q | k | v], [gate | up]). Two ARMOR modules
take a native module's place:
  ``ArmorTrtllmLinear``       the *parts* of a native module, each its own A.S.B (an unfused artifact: each
                              projection has its own input factor B), outputs concatenated in the fused order
  ``ArmorTrtllmFusedLinear``  a fused group of the artifact (``--fuse``: the members share one B) as ONE A.S.B:
                              one input-side block-diagonal product with the shared B, one GEMM with the stacked
                              S (2:4 semi-structured on CUDA fp16/bf16, dense otherwise, as for a part), one
                              output-side product with the block-diagonal A over the stacked output; its output is
                              already in the native fused order (the members are stacked q, k, v / gate, up)

Both follow the native ``Linear`` lifecycle (``tensorrt_llm/_torch/modules/linear.py``):
  create_weights()            allocate the parameters (called by the model's ``__post_init__`` and by
                              ``Attention.create_weights`` on ``o_proj``); idempotent
  load_weights(weights, **kw) parts: one dict per part, as the native loaders pass them: ``{"S", "A", "B",
                              "bias"}`` for an ARMOR part, ``{"weight", "bias"}`` for a part left dense.
                              fused: see below
  post_load_weights()         S as a 2:4 semi-structured tensor on CUDA (fp16/bf16, sm80+)
  forward(x, *, all_reduce_params=None, lora_params=None, layer_idx=None)
and answer the quantisation probes the native modules make (``has_fp8_qdq``, ``has_nvfp4``, ...) with
False. Tensors are direct ``nn.Parameter``s (``S0``, ``A0``, ``B0``, ``bias0``, ``weight1``, ...) so that
the native loaders, which only visit modules with parameters, call ``load_weights`` on them.

What the native loaders pass a fused module, read in NVIDIA/TensorRT-LLM
``tensorrt_llm/_torch/models/modeling_utils.py`` @ cb4c622cf5bb97009451f7f44609498a48a2b11d (``_load_weights_impl``,
v1, and ``_load_weights_impl_v2``), ``tensorrt_llm/_torch/models/checkpoints/hf/weight_mapper.py`` @
088aa36b002777f37d26241bcba56c86b132e5ee and @ f59aed070dabff4761d70e47c90fd761776c1bac (``HfWeightMapper``:
``map_weights`` / ``apply_callbacks`` / ``_duplicate_kv_weights``), ``checkpoints/base_weight_mapper.py`` @
0c8de69a1ca6213eebb20a51873890ff128666c2 (``filter_weights``), ``checkpoints/base_weight_loader.py`` @
0d93193ee668a2bb6daf5fb231039233a63e60a3 (``ConsumableWeightsDict``: ``items`` / ``mark_consumed``) and
``tensorrt_llm/_torch/pyexecutor/model_loader.py`` @ 004b733e0ed7c03c83dcfa7de48e8ee6e4fa58d0 (``_call_load_weights``
passes ``weight_mapper=`` / ``allow_partial_loading=`` only when the model's ``load_weights`` names them; then
``post_load_weights`` on every module): a module whose last name is ``qkv_proj`` / ``gate_up_proj`` is
ALWAYS given one dict per member, each filtered by the member's name (``...self_attn.q_proj``, ``k_proj``,
``v_proj``; ``...mlp.gate_proj``, ``up_proj``; a key matches when it starts with that prefix); k/v dicts go
through the kv-head duplication (only ``weight`` / ``bias`` keys are touched; at f59aed07 it reads
``weights['weight']``, which no ARMOR dict has, fused or not). A checkpoint holding the group under the fused
name therefore reaches a fused module as ``[{}, {}, {}]`` / ``[{}, {}]``: the fused tensors never arrive through
that path. So the ARMOR model class hands them over first: ``load_fused_weights(model, weights)`` (run by
``load_fused_first``, the ARMOR model classes' ``load_weights``, before the native one) gives each fused module
the one dict ``{"S", "A", "B", "bias"}`` under its own name (the layout the native loaders give a module whose
name is not fused: ``[filter_weights(name)]``) and marks those tensors consumed where the weights dict can; the
fused module then accepts the native per-member call with empty dicts as "already loaded" (and refuses
per-member tensors, which a fused checkpoint never holds, and an empty call before any load).

``projection_plan`` says, from the family table and the checkpoint's ``armor.groups``, which native module
stands for which Hugging Face projections; ``armorize`` swaps the native modules of a built model for ARMOR
ones. Tensor parallel size 1 only (the factors are not sharded).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from solver.blockdiag import apply_input_side, apply_output_side

# the native module (relative to a decoder layer) -> which family-table entry lists its HF parts
NATIVE_MODULES = (("self_attn.qkv_proj", "qkv"), ("self_attn.o_proj", "o_proj"),
                  ("mlp.gate_up_proj", "gate_up"), ("mlp.down_proj", "down_proj"))
# quantisation probes of TensorRT-LLM's Linear (all False here: ARMOR parts are not quantised)
QUANT_PROBES = ("has_any_quant", "has_fp8_qdq", "has_fp8_rowwise", "has_fp8_block_scales", "has_nvfp4",
                "has_weight_only_quant", "has_w4a16_awq", "has_w4a8_awq", "has_w4a8_nvfp4_fp8",
                "has_w4a8_mxfp4_fp8", "has_w4a8_mxfp4_mxfp8")
# attributes of the native Linear carried over to the ARMOR module (read by native code or loaders)
CARRIED = ("mapping", "tp_size", "tp_rank", "tp_mode", "quant_config", "weights_loading_config", "lora",
           "reduce_output", "gather_output", "force_dynamic_quantization", "use_custom_cublas_mm")


class TensorParallelUnsupported(ValueError):
    """ARMOR parts are not sharded: tensor parallel size must be 1."""


@dataclass(frozen=True)
class Part:
    """One Hugging Face projection inside a (possibly fused) native module."""
    name: str  # its fully qualified HF name, e.g. model.layers.0.self_attn.k_proj
    d_out: int
    d_in: int
    armor: bool  # True: A.S.B (S 2:4); False: left dense (weight)
    block_size: int | None = None
    has_A: bool = False
    has_B: bool = False
    has_bias: bool = False
    members: tuple[str, ...] = ()  # a fused group (name = the fused fqn): its members' fqns, in stacking order
    split: tuple[int, ...] = ()  # ... and their d_out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if not self.armor:
            out = {"weight": (self.d_out, self.d_in)}
        else:
            b = self.block_size
            out = {"S": (self.d_out, self.d_in)}
            if self.has_A:
                out["A"] = (self.d_out // b, b, b)
            if self.has_B:
                out["B"] = (self.d_in // b, b, b)
        if self.has_bias:
            out["bias"] = (self.d_out,)
        return out


class ArmorTrtllmLinear(nn.Module):
    def __init__(self, parts: tuple[Part, ...], *, dtype: torch.dtype | None = None, like: nn.Module | None = None,
                 skip_create_weights_in_init: bool = True):
        super().__init__()
        if not parts or len({p.d_in for p in parts}) != 1:
            raise ValueError(f"ArmorTrtllmLinear needs parts with one input size, got {parts}")
        self.parts = tuple(parts)
        self.in_features = parts[0].d_in
        self.out_features = sum(p.d_out for p in parts)
        self.dtype = dtype if dtype is not None else getattr(like, "dtype", None)
        self.mapping, self.tp_size, self.tp_rank, self.tp_mode = None, 1, 0, None
        self.quant_config = self.weights_loading_config = self.lora = None
        self.reduce_output, self.gather_output = True, False
        self.force_dynamic_quantization = self.use_custom_cublas_mm = False
        for attr in CARRIED:
            if like is not None and hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))
        if (self.tp_size or 1) > 1:
            raise TensorParallelUnsupported(
                f"ARMOR projection {parts[0].name}: tensor parallel size {self.tp_size} is not supported (the "
                "A/S/B factors are not sharded); serve this checkpoint with tensor_parallel_size=1")
        self._weights_created = self._loaded = False
        self._s_sparse: dict[int, torch.Tensor] = {}
        if not skip_create_weights_in_init:
            self.create_weights()

    # ---- the native lifecycle
    def create_weights(self) -> None:
        if self._weights_created:
            return
        dt = self.dtype or torch.get_default_dtype()
        for i, p in enumerate(self.parts):
            for key, shape in p.shapes().items():
                self.register_parameter(f"{key}{i}", nn.Parameter(torch.empty(shape, dtype=dt), requires_grad=False))
        self._weights_created = True

    def load_weights(self, weights: list[dict], allow_partial_loading: bool = False, **_: object) -> None:
        """``weights``: one dict per part, in part order (the native fused loaders' layout)."""
        self.create_weights()
        if len(weights) != len(self.parts):
            raise ValueError(f"ARMOR module {self.parts[0].name}: got {len(weights)} weight dicts for "
                             f"{len(self.parts)} parts ({[p.name for p in self.parts]})")
        with torch.no_grad():
            for i, (p, w) in enumerate(zip(self.parts, weights)):
                for key, shape in p.shapes().items():
                    if key not in w:
                        if allow_partial_loading:
                            continue
                        raise KeyError(f"ARMOR checkpoint lacks {p.name}.{key} (has {sorted(w)})")
                    src = w[key][:]  # [:] reads a safetensors slice
                    if tuple(src.shape) != shape:
                        raise ValueError(f"{p.name}.{key}: shape {tuple(src.shape)}, expected {shape}")
                    getattr(self, f"{key}{i}").data.copy_(src.to(self.dtype or src.dtype))
        self._s_sparse = {}
        self._loaded = True

    def post_load_weights(self) -> None:
        self._s_sparse = {}
        for i, p in enumerate(self.parts):
            S = getattr(self, f"S{i}", None) if p.armor else None
            if S is None or S.device.type != "cuda" or S.dtype not in (torch.float16, torch.bfloat16):
                continue
            try:
                self._s_sparse[i] = torch.sparse.to_sparse_semi_structured(S.data.contiguous())
            except (RuntimeError, ValueError, NotImplementedError):
                pass  # this GPU / shape has no 2:4 kernel: dense S

    @property
    def semi_structured_parts(self) -> int:
        return len(self._s_sparse)

    def forward(self, input: torch.Tensor, *, all_reduce_params=None, lora_params: dict | None = None,
                layer_idx: int | None = None) -> torch.Tensor:
        outs = [self._part(i, p, input) for i, p in enumerate(self.parts)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.lora is not None and lora_params:
            delta = self.lora(input, lora_params, layer_idx)
            if delta is not None:
                out = out + delta
        return out

    def _part(self, i: int, p: Part, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, f"bias{i}") if p.has_bias else None
        if not p.armor:
            return F.linear(x, getattr(self, f"weight{i}"), bias)
        if p.has_B:
            x = apply_input_side(x, getattr(self, f"B{i}"))
        if i in self._s_sparse:
            lead = x.shape[:-1]
            z = F.linear(x.reshape(-1, p.d_in), self._s_sparse[i]).reshape(*lead, p.d_out)
        else:
            z = F.linear(x, getattr(self, f"S{i}"))
        if p.has_A:
            z = apply_output_side(z, getattr(self, f"A{i}"))
        return z if bias is None else z + bias

    def extra_repr(self) -> str:
        return f"parts={[p.name.rsplit('.', 1)[-1] for p in self.parts]}, in={self.in_features}, out={self.out_features}"


class ArmorTrtllmFusedLinear(ArmorTrtllmLinear):
    """A fused group (``--fuse``) in the place of the native ``qkv_proj`` / ``gate_up_proj``: one part, the stacked
    layer (S [sum(split), d_in], A [sum(split)/b, b, b], the shared B [d_in/b, b, b], the stacked bias), so
    ``forward`` is one A.S.B. ``load_weights`` takes ``[{"S", "A", "B", "bias"}]`` (from ``load_fused_weights``)
    and accepts the native per-member call that follows it (one empty dict per member; see the module docstring)."""

    def __init__(self, parts: tuple[Part, ...], **kwargs):
        if len(parts) != 1 or len(parts[0].members) < 2 or not parts[0].armor:
            raise ValueError(f"ArmorTrtllmFusedLinear needs one ARMOR part with its group's members, got {parts}")
        super().__init__(parts, **kwargs)

    @property
    def split(self) -> tuple[int, ...]:
        return self.parts[0].split

    def load_weights(self, weights: list[dict], allow_partial_loading: bool = False, **kw: object) -> None:
        p = self.parts[0]
        self.create_weights()
        if len(weights) == 1 and weights[0]:
            return super().load_weights(weights, allow_partial_loading=allow_partial_loading, **kw)
        if len(weights) in (1, len(p.members)) and not any(weights):
            if self._loaded or allow_partial_loading:
                return None  # the native per-member call after load_fused_weights: nothing of ours in it
            raise KeyError(f"ARMOR fused module {p.name}: no {p.name}.S/A/B were given (the native loaders pass "
                           f"per-member dicts, empty for a fused checkpoint); load the model through its ARMOR class "
                           "(engines.trtllm_model), whose load_weights hands the fused tensors over first")
        raise ValueError(f"ARMOR fused module {p.name}: got {len(weights)} weight dicts with keys "
                         f"{[sorted(w) for w in weights]}; a fused group is stored once under {p.name} (members "
                         f"{list(p.members)} are not stored on their own): re-export the checkpoint")

    def extra_repr(self) -> str:
        p = self.parts[0]
        return (f"fused={[m.rsplit('.', 1)[-1] for m in p.members]}, split={list(p.split)}, in={self.in_features}, "
                f"out={self.out_features}")


def load_fused_weights(model: nn.Module, weights, allow_partial_loading: bool = False) -> list[str]:
    """Give every ``ArmorTrtllmFusedLinear`` of ``model`` its tensors from ``weights`` (the checkpoint's name ->
    tensor mapping the native ``load_weights`` receives: a dict or TensorRT-LLM's ``ConsumableWeightsDict``) as
    ``[{"S", "A", "B", "bias"}]`` under its own name, in one pass over the names; tensors taken are marked
    consumed where the mapping can. Returns the fused module names."""
    fused = {name: m for name, m in model.named_modules() if isinstance(m, ArmorTrtllmFusedLinear)}
    if not fused:
        return []
    given: dict[str, dict] = {name: {} for name in fused}
    for key, value in weights.items():
        owner, _, leaf = key.rpartition(".")
        if owner in given:
            given[owner][leaf] = value
    for name, module in fused.items():
        module.load_weights(weights=[given[name]], allow_partial_loading=allow_partial_loading)
        if hasattr(weights, "mark_consumed"):
            weights.mark_consumed(name)
    return list(fused)


def load_fused_first(model: nn.Module, native_load_weights, weights, weight_mapper=None,
                     allow_partial_loading: bool = False, **kwargs):
    """The ARMOR model classes' ``load_weights``: ``load_fused_weights``, then the native ``load_weights`` (the
    bound method of the native class), given ``weight_mapper`` / ``allow_partial_loading`` only where its signature
    names them, as TensorRT-LLM's model loader (``_call_load_weights``) calls a model's."""
    load_fused_weights(model, weights, allow_partial_loading=allow_partial_loading)
    names = inspect.getfullargspec(native_load_weights).args
    if "weight_mapper" in names:
        kwargs["weight_mapper"] = weight_mapper
    if "allow_partial_loading" in names:
        kwargs["allow_partial_loading"] = allow_partial_loading
    elif allow_partial_loading:
        raise ValueError(f"{type(model).__name__}: this TensorRT-LLM release's load_weights has no partial loading")
    return native_load_weights(weights, **kwargs)


def _probe(self) -> bool:
    return False


for _name in QUANT_PROBES:
    setattr(ArmorTrtllmLinear, _name, property(_probe, doc="quantisation probe of TensorRT-LLM's Linear: False"))


# ---- which native modules become ARMOR modules
def part_shapes(facts) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every projection a decoder layer can have, from ``adapters.model_facts``."""
    h, i, q, kv = facts.hidden, facts.intermediate, facts.q_dim, facts.kv_dim
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.qkv_proj": (q + 2 * kv, h), "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h), "mlp.gate_up_proj": (2 * i, h), "mlp.down_proj": (h, i)}


def projection_plan(facts, armor_layers: dict[str, dict], groups: dict[str, dict] | None = None
                    ) -> dict[str, tuple[Part, ...]]:
    """Native module path -> its parts, for every native projection that holds at least one ARMOR part.

    ``armor_layers`` is the checkpoint's ``config.json`` ``armor.layers`` (fqn -> shape, block_size,
    has_A, has_B, has_bias); parts not listed there are dense (their ``weight`` is in the checkpoint).
    ``groups`` is its ``armor.groups`` (fused fqn -> members, split): a native module whose path is a group
    gets one fused part (``ArmorTrtllmFusedLinear``); its members must be the family's, in the native order."""
    fam, shapes, groups = facts.family, part_shapes(facts), groups or {}
    dense_bias = {"self_attn.o_proj": facts.o_bias, "mlp.down_proj": facts.mlp_bias}
    plan = {}
    for i in range(facts.num_layers):
        for native, entry in NATIVE_MODULES:
            local = getattr(fam, entry)
            local = (local,) if isinstance(local, str) else local
            path = facts.layer(i, native)
            if path in groups:
                plan[path] = (_fused_part(path, armor_layers[path], groups[path],
                                          tuple(facts.layer(i, n) for n in local)),)
                continue
            parts = []
            for name in local:
                fqn = facts.layer(i, name)
                info = armor_layers.get(fqn)
                if info is not None:
                    d_out, d_in = info["shape"]
                    parts.append(Part(fqn, d_out, d_in, True, info.get("block_size"), bool(info.get("has_A")),
                                      bool(info.get("has_B")), bool(info.get("has_bias"))))
                else:
                    bias = dense_bias.get(name, facts.mlp_bias if name.startswith("mlp.") else facts.qkv_bias)
                    parts.append(Part(fqn, *shapes[name], False, has_bias=bool(bias)))
            if any(p.armor for p in parts):
                plan[facts.layer(i, native)] = tuple(parts)
    return plan


def _fused_part(path: str, info: dict, group: dict, native_members: tuple[str, ...]) -> Part:
    members, split = tuple(group["members"]), tuple(group["split"])
    if members != native_members:
        raise ValueError(f"fused group {path}: members {list(members)} are not TensorRT-LLM's {list(native_members)} "
                         "in that order (the native code splits the fused output in that order)")
    d_out, d_in = info["shape"]
    if sum(split) != d_out:
        raise ValueError(f"fused group {path}: split {list(split)} does not sum to its {d_out} rows")
    return Part(path, d_out, d_in, True, info.get("block_size"), bool(info.get("has_A")), bool(info.get("has_B")),
                bool(info.get("has_bias")), members, split)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def armorize(model: nn.Module, plan: dict[str, tuple[Part, ...]], dtype: torch.dtype | None) -> None:
    """Swap each planned native module of ``model`` for an ARMOR module that carries its settings."""
    for path, parts in plan.items():
        native = model.get_submodule(path)
        cls = ArmorTrtllmFusedLinear if parts[0].members else ArmorTrtllmLinear
        set_submodule(model, path, cls(parts, dtype=dtype, like=native))
