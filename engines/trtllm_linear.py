"""The ARMOR linear that stands in for TensorRT-LLM's ``Linear`` (pure PyTorch: imports without TensorRT-LLM).

TensorRT-LLM's PyTorch backend fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``
``Linear``. ARMOR projections cannot share one GEMM (each has its own input factor B), so one
``ArmorTrtllmLinear`` holds the parts of a fused module and returns their outputs concatenated in the
fused order ([q | k | v], [gate | up]) - the tensor the native attention / MLP code splits.

It follows the native ``Linear`` lifecycle (``tensorrt_llm/_torch/modules/linear.py``):
  create_weights()            allocate the parts' parameters (called by the model's ``__post_init__``
                              and by ``Attention.create_weights`` on ``o_proj``); idempotent
  load_weights(weights, **kw) one dict per part, as the native loaders pass them: ``{"S", "A", "B",
                              "bias"}`` for an ARMOR part, ``{"weight", "bias"}`` for a part left dense
  post_load_weights()         S as a 2:4 semi-structured tensor on CUDA (fp16/bf16, sm80+)
  forward(x, *, all_reduce_params=None, lora_params=None, layer_idx=None)
and answers the quantisation probes the native modules make (``has_fp8_qdq``, ``has_nvfp4``, ...) with
False. Tensors are direct ``nn.Parameter``s (``S0``, ``A0``, ``B0``, ``bias0``, ``weight1``, ...) so that
the native loaders, which only visit modules with parameters, call ``load_weights`` on it.

``projection_plan`` says, from the family table, which native module stands for which Hugging Face
projections; ``armorize`` swaps the native modules of a built model for ARMOR ones.
Tensor parallel size 1 only (the parts are not sharded).
"""
from __future__ import annotations

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
        self._weights_created = False
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


def projection_plan(facts, armor_layers: dict[str, dict]) -> dict[str, tuple[Part, ...]]:
    """Native module path -> its parts, for every native projection that holds at least one ARMOR part.

    ``armor_layers`` is the checkpoint's ``config.json`` ``armor.layers`` (fqn -> shape, block_size,
    has_A, has_B, has_bias); parts not listed there are dense (their ``weight`` is in the checkpoint)."""
    fam, shapes = facts.family, part_shapes(facts)
    dense_bias = {"self_attn.o_proj": facts.o_bias, "mlp.down_proj": facts.mlp_bias}
    plan = {}
    for i in range(facts.num_layers):
        for native, entry in NATIVE_MODULES:
            local = getattr(fam, entry)
            local = (local,) if isinstance(local, str) else local
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


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def armorize(model: nn.Module, plan: dict[str, tuple[Part, ...]], dtype: torch.dtype | None) -> None:
    """Swap each planned native module of ``model`` for an ARMOR module that carries its settings."""
    for path, parts in plan.items():
        native = model.get_submodule(path)
        set_submodule(model, path, ArmorTrtllmLinear(parts, dtype=dtype, like=native))
