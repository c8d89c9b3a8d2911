"""ARMOR model classes for TensorRT-LLM's PyTorch backend (Llama, Mistral, Qwen2, Qwen3).

Nothing from ``tensorrt_llm`` is imported at module import time. Call ``register_armor_models()``
explicitly (after ``import tensorrt_llm`` works, before constructing ``LLM``):

    from engines.trtllm_model import register_armor_models
    register_armor_models()                      # ArmorLlamaForCausalLM, ArmorMistralForCausalLM, ...
    from tensorrt_llm import LLM, SamplingParams
    llm = LLM(model="armor-out/trtllm")          # the folder written by `armor-export --engine trtllm`
    print(llm.generate(["Hello"], SamplingParams(max_tokens=32))[0].outputs[0].text)

Each class subclasses TensorRT-LLM's own model class for the family (e.g.
``tensorrt_llm._torch.models.modeling_llama.LlamaForCausalLM``, a ``DecoderModelForCausalLM``) and is
registered under the checkpoint's ``architectures`` name with ``register_auto_model``. After the
native model is built, every fused projection (``qkv_proj``, ``gate_up_proj``) and every plain one
(``o_proj``, ``down_proj``) is replaced by an ``ArmorConcat`` of per-projection ``ArmorLinear``s:
B as a batched matmul over blocks, S as ``torch.sparse.to_sparse_semi_structured`` on CUDA
(fp16/bf16, sm80+; dense S otherwise), A as a batched matmul. The parts are concatenated in the
fused weight's order ([q, k, v], [gate, up]), so the native attention/MLP code sees the same
tensor a fused GEMM would give. Fusion into one GEMM is impossible because q/k/v (and gate/up)
carry different input factors B. ``load_weights`` fills the ARMOR parts from ``{fqn}.A/S/B`` and
copies every other tensor by its Hugging Face name.

Targets: TensorRT-LLM 1.0 - 1.2.x and 1.3 release candidates, PyTorch backend; tensor-parallel
size 1 (ARMOR parts are not sharded). Not run in CI (no GPU, TensorRT-LLM not installable there).
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
from torch import nn

from engines.torch_module import ArmorLinear, set_submodule

# family -> candidate native classes (module, class name); the first importable one is used
NATIVE_CLASSES = {
    "llama": (("tensorrt_llm._torch.models.modeling_llama", "LlamaForCausalLM"),),
    "mistral": (("tensorrt_llm._torch.models.modeling_mistral", "MistralForCausalLM"),
                ("tensorrt_llm._torch.models.modeling_llama", "LlamaForCausalLM")),
    "qwen2": (("tensorrt_llm._torch.models.modeling_qwen", "Qwen2ForCausalLM"),),
    "qwen3": (("tensorrt_llm._torch.models.modeling_qwen3", "Qwen3ForCausalLM"),),
}
# TensorRT-LLM module (relative to a decoder layer) -> the Hugging Face projections it fuses, in order
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
INSTALL_HINT = ("TensorRT-LLM is not installed. On a Linux machine with an NVIDIA GPU (sm80+ for 2:4 "
                "kernels) and CUDA 12/13: `pip install tensorrt-llm` (or use the NGC container "
                "nvcr.io/nvidia/tensorrt-llm/release); the PyPI package is a stub that downloads the real "
                "wheel from NVIDIA's index. The checkpoint itself also runs without it: "
                "engines.hf_checkpoint.load_checkpoint_model.")


class TrtllmUnavailable(RuntimeError):
    """tensorrt_llm cannot be imported here."""


def missing_trtllm_message() -> str | None:
    """None when tensorrt_llm is importable, else what is missing and how to install it."""
    return INSTALL_HINT if importlib.util.find_spec("tensorrt_llm") is None else None


class ArmorConcat(nn.Module):
    """Stand-in for a (possibly fused) TensorRT-LLM Linear: the concatenated outputs of its parts
    (ArmorLinear, or nn.Linear for projections left dense). Accepts and ignores the extra keyword
    arguments TensorRT-LLM passes to Linear (all_reduce_params, lora_params, layer_idx, ...)."""

    def __init__(self, names: tuple[str, ...], parts: list[nn.Module] | None = None):
        super().__init__()
        self.names = tuple(names)
        self.parts = nn.ModuleList(parts or [])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(self.parts) != len(self.names):
            raise RuntimeError(f"ArmorConcat{self.names}: weights not loaded")
        outs = [p(x) for p in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("has_") or name.startswith("use_"):  # quantisation/fusion probes: not used
                return False
            raise


def projection_plan(num_layers: int, has_module, layers_path: str = "model.layers") -> dict[str, tuple[str, ...]]:
    """TensorRT-LLM module path -> HF projection names it stands for, for every decoder layer.

    ``has_module(path)`` says whether the native model has that submodule; a fused module missing
    from the native model falls back to its unfused HF names (each replaced on its own)."""
    plan = {}
    for i in range(num_layers):
        pre = f"{layers_path}.{i}"
        for trt_name, hf_names in FUSED.items():
            if has_module(f"{pre}.{trt_name}"):
                plan[f"{pre}.{trt_name}"] = tuple(f"{pre}.{n}" for n in hf_names)
            else:
                for n in hf_names:
                    if has_module(f"{pre}.{n}"):
                        plan[f"{pre}.{n}"] = (f"{pre}.{n}",)
    return plan


def build_part(weights, fqn: str, *, dtype: torch.dtype, device) -> nn.Module:
    """ArmorLinear from ``{fqn}.S/A/B/bias`` or a dense nn.Linear from ``{fqn}.weight/bias``."""
    get = (lambda s: weights[f"{fqn}.{s}"].to(device=device, dtype=dtype) if f"{fqn}.{s}" in weights else None)
    S = get("S")
    if S is not None:
        return ArmorLinear(S, get("A"), get("B"), get("bias"))
    W = get("weight")
    if W is None:
        raise KeyError(f"checkpoint has neither {fqn}.S nor {fqn}.weight")
    lin = nn.Linear(W.shape[1], W.shape[0], bias=f"{fqn}.bias" in weights, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        if lin.bias is not None:
            lin.bias.copy_(get("bias"))
    return lin


def armorize(model: nn.Module, num_layers: int) -> dict[str, tuple[str, ...]]:
    """Replace the projection modules of a native model by empty ArmorConcat placeholders."""
    def has(path):
        try:
            model.get_submodule(path)
            return True
        except AttributeError:
            return False

    plan = projection_plan(num_layers, has)
    for path, names in plan.items():
        set_submodule(model, path, ArmorConcat(names))
    return plan


def load_armor_weights(model: nn.Module, weights, plan: dict[str, tuple[str, ...]], *, dtype: torch.dtype,
                       semi_structured: bool = True, tie_embeddings: bool = False) -> dict:
    """Fill the ArmorConcat parts and copy every other parameter by name; returns counts."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    n_sparse = 0
    for path, names in plan.items():
        parts = [build_part(weights, n, dtype=dtype, device=device) for n in names]
        for p in parts:
            if isinstance(p, ArmorLinear) and semi_structured:
                n_sparse += int(p.to_semi_structured())
        set_submodule(model, path, ArmorConcat(names, parts))
    covered = {f"{path}." for path in plan}
    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(c) for c in covered):
                continue
            src = name if name in weights else None
            if src is None and tie_embeddings and name.endswith("lm_head.weight"):
                src = next((k for k in ("model.embed_tokens.weight",) if k in weights), None)
            if src is None:
                missing.append(name)
                continue
            t = weights[src]
            view = p[tuple(slice(0, s) for s in t.shape)] if tuple(t.shape) != tuple(p.shape) else p
            view.copy_(t.to(device=p.device, dtype=p.dtype))
    if missing:
        raise KeyError(f"ARMOR checkpoint lacks tensors for parameters {missing[:8]}")
    return {"armor_modules": len(plan), "semi_structured": n_sparse}


class ArmorMixin:
    """Mixed in front of TensorRT-LLM's native causal-LM class (see ``make_armor_class``)."""

    def __init__(self, model_config, *args, **kwargs):
        super().__init__(model_config, *args, **kwargs)
        cfg = getattr(model_config, "pretrained_config", model_config)
        mapping = getattr(model_config, "mapping", None)
        if mapping is not None and getattr(mapping, "tp_size", 1) > 1:
            raise NotImplementedError("ARMOR models support tensor-parallel size 1 only (A/S/B are not sharded)")
        self._armor_plan = armorize(self, cfg.num_hidden_layers)
        self._armor_cfg = cfg

    def load_weights(self, weights, *args, **kwargs):
        cfg = self._armor_cfg
        armor = getattr(cfg, "armor", None) or {}
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float16"))
        return load_armor_weights(self, weights, self._armor_plan, dtype=dtype,
                                  semi_structured=armor.get("semi_structured", True),
                                  tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))


def make_armor_class(native_cls: type, name: str) -> type:
    return type(name, (ArmorMixin, native_cls), {"__doc__": f"ARMOR A.S.B projections on {native_cls.__name__}"})


def native_class(family: str) -> type:
    errors = []
    for module, cls in NATIVE_CLASSES[family]:
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as e:
            errors.append(f"{module}.{cls}: {e}")
    raise TrtllmUnavailable(f"no TensorRT-LLM model class for family {family!r}: {errors}")


def register_armor_models(families=None) -> list[str]:
    """Register ``Armor<Family>ForCausalLM`` for each family with TensorRT-LLM; returns the names."""
    msg = missing_trtllm_message()
    if msg:
        raise TrtllmUnavailable(msg)
    from tensorrt_llm._torch.models.modeling_utils import register_auto_model

    from armor_export.adapters import FAMILIES

    names = []
    for fam in families or NATIVE_CLASSES:
        arch = FAMILIES[fam].trtllm_architecture
        register_auto_model(arch)(make_armor_class(native_class(fam), arch))
        names.append(arch)
    return names
