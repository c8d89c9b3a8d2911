"""ARMOR model classes for TensorRT-LLM's PyTorch backend: importing this module registers them.

    import engines.trtllm_model                    # registers ArmorLlamaForCausalLM, ArmorMistralForCausalLM, ...
    from tensorrt_llm import LLM, SamplingParams
    llm = LLM(model="armor-out/trtllm")            # the folder written by `armor-export --engine trtllm`

or ``trtllm-serve armor-out/trtllm --custom_module_dirs <repo>/engines/trtllm_module/armor_trtllm``
(README, TensorRT-LLM section). Importing it without TensorRT-LLM raises ``TrtllmUnavailable`` (an
ImportError) saying how to install it; the pure-PyTorch parts live in ``engines.trtllm_linear``.

Read against NVIDIA/TensorRT-LLM (files and the commits of the versions read, via the code index):
  tensorrt_llm/_torch/models/modeling_utils.py @ cb4c622cf5bb97009451f7f44609498a48a2b11d (also 000a01de66f0):
      ``PostInitCaller`` runs ``__post_init__`` after ``__init__``, which calls ``create_weights()`` on every
      module that has one; ``register_auto_model(name)`` writes ``MODEL_CLASS_MAPPING[name]``;
      ``load_weights(weights, weight_mapper=None, skip_modules=[])`` visits every module with parameters and
      calls ``module.load_weights(weights=[...])`` (one dict per q/k/v or gate/up part for ``qkv_proj`` /
      ``gate_up_proj``), skips ``next_layer_layernorm`` and a tied ``lm_head``
  tensorrt_llm/_torch/models/checkpoints/hf/weight_mapper.py @ 088aa36b002777f37d26241bcba56c86b132e5ee and
      checkpoints/base_weight_mapper.py @ 0c8de69a1ca6213eebb20a51873890ff128666c2 (the v2 loader: same
      per-part dicts; reads ``module.quant_config.quant_mode`` on k/v parts)
  tensorrt_llm/_torch/modules/attention.py @ 00547a25ac61d28d1dabb2e47383a1af605ebb59,
  tensorrt_llm/_torch/modules/gated_mlp.py @ 90f3bec14ca71aed5da396226af9ccc2f888cb9f,
  tensorrt_llm/_torch/modules/qk_norm_attention.py @ a98a9061d72f6fd39f5d055ebdd2c6878a100e2c,
  tensorrt_llm/_torch/modules/linear.py @ ed53795b33fc139493f762a1c6c53f691cf52d38 (what they call on their
      linears: the list is ``tests/engines/test_trtllm_model.py::NATIVE_CALLS``)
  tensorrt_llm/_torch/models/modeling_llama.py (Llama/Mistral: ``next_layer_layernorm`` / ``next_attn`` are
      wired in ``load_weights`` in older releases and in ``post_load_weights`` in newer ones; the layer applies
      the next layer's input norm through it, so skipping it drops the norms), modeling_qwen.py @ 87b279a9,
      modeling_qwen3.py @ 5dedf53b, modeling_mistral.py @ 0dcfa87b, modeling_phi3.py @ bd6f83f8
  tensorrt_llm/executor/proxy.py / worker.py (``worker_main`` receives ``_torch_model_class_mapping`` - the
      pickled ``MODEL_CLASS_MAPPING`` - and updates its own; pickle stores classes by qualified name, so the
      worker imports this module by name) and examples/llm-api/out_of_tree_example/ (@ 59d71344, a7c0ff3f,
      eef8cda7: register with the decorator at import; ``--custom_module_dirs`` imports a package directory)

How the ARMOR classes join that lifecycle: each ``Armor<Family>ForCausalLM`` subclasses the native class and
only, after the native ``__init__``, swaps the native ``qkv_proj`` / ``o_proj`` / ``gate_up_proj`` /
``down_proj`` holding pruned projections for ``ArmorTrtllmLinear`` modules, and a native module that is a fused
group of the checkpoint (``armor.groups``, format 3) for one ``ArmorTrtllmFusedLinear``. Those implement
``create_weights`` / ``load_weights`` / ``post_load_weights``, so the native ``__post_init__``, the native
``load_weights`` (v1 and v2) and the model loader's ``post_load_weights`` pass drive them. ``load_weights`` is
overridden only to run one step before the native one: the native loaders give a ``qkv_proj`` / ``gate_up_proj``
module one dict per member, filtered by the members' names, so a group stored once under its fused name would
reach it as empty dicts (``engines.trtllm_linear`` names the loader files read); ``load_fused_weights`` hands
each fused module its ``{S, A, B, bias}`` first. The native ``load_weights`` then runs unchanged (called with
``weight_mapper`` / ``allow_partial_loading`` exactly when it names them, as the model loader's
``_call_load_weights`` does), so every piece of wiring it (or ``post_load_weights``) does is kept.

Families: Llama, Mistral, Qwen2, Qwen3. Phi-3 is refused (its ``qkv_proj`` / ``gate_up_proj`` are pruned as one
A.S.B each, the layout ``ArmorTrtllmFusedLinear`` runs, but TensorRT-LLM's own ``Phi3ForCausalLM.load_weights``
reads the dense fused ``qkv_proj.weight`` / ``gate_up_proj.weight`` and splits them by rows, which an ARMOR
checkpoint does not have, so the native load that follows the fused step would fail) and so is
Gemma 2 (not in the PyTorch backend's model index read); ``engines.trtllm.TRTLLM_FAMILIES`` says so before
any work. Tensor parallel size 1 (``TensorParallelUnsupported`` otherwise).
"""
from __future__ import annotations

import importlib

import torch

from armor_export.adapters import model_facts
from engines.trtllm_linear import TensorParallelUnsupported, armorize, load_fused_first, projection_plan

INSTALL_HINT = ("TensorRT-LLM is not installed. On a Linux machine with an NVIDIA GPU (sm80+ for 2:4 "
                "kernels) and CUDA 12/13: `pip install tensorrt-llm` (or use the NGC container "
                "nvcr.io/nvidia/tensorrt-llm/release). The checkpoint itself also runs without it: "
                "engines.hf_checkpoint.load_checkpoint_model.")
# family -> candidate native classes (module, class); the first importable one is subclassed
NATIVE_CLASSES = {
    "llama": (("tensorrt_llm._torch.models.modeling_llama", "LlamaForCausalLM"),),
    "mistral": (("tensorrt_llm._torch.models.modeling_mistral", "MistralForCausalLM"),
                ("tensorrt_llm._torch.models.modeling_llama", "MistralForCausalLM")),
    "qwen2": (("tensorrt_llm._torch.models.modeling_qwen", "Qwen2ForCausalLM"),),
    "qwen3": (("tensorrt_llm._torch.models.modeling_qwen3", "Qwen3ForCausalLM"),),
}


class TrtllmUnavailable(ImportError):
    """tensorrt_llm cannot be imported here."""


try:
    from tensorrt_llm._torch.models.modeling_utils import register_auto_model
except ImportError as e:  # the library itself, or one of its native dependencies
    raise TrtllmUnavailable(f"{INSTALL_HINT} (import failed: {e})") from e


def _native(family: str):
    for module, name in NATIVE_CLASSES[family]:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


class ArmorModelMixin:
    """In front of a native ``DecoderModelForCausalLM``: build it, then swap in the ARMOR projections."""

    def __init__(self, model_config, *args, **kwargs):
        mapping = getattr(model_config, "mapping", None)
        tp = getattr(mapping, "tp_size", 1) if mapping is not None else 1
        if tp > 1:
            raise TensorParallelUnsupported(
                f"{type(self).__name__}: tensor parallel size {tp} is not supported (ARMOR's A/S/B factors are not "
                "sharded); run with tensor_parallel_size=1 (one GPU per model replica)")
        super().__init__(model_config, *args, **kwargs)
        cfg = model_config.pretrained_config
        armor = getattr(cfg, "armor", None)
        if not isinstance(armor, dict) or "layers" not in armor:
            raise ValueError(f"{type(self).__name__}: config.json has no 'armor' section; write the folder with "
                             "`armor-export export --engine trtllm`")
        dtype = getattr(cfg, "torch_dtype", None) or getattr(cfg, "dtype", None)
        dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
        self.armor_plan = projection_plan(model_facts(cfg), armor["layers"], armor.get("groups"))
        armorize(self, self.armor_plan, dtype)

    def load_weights(self, weights, weight_mapper=None, allow_partial_loading: bool = False, **kwargs):
        """Fused groups first, then the native ``load_weights`` (``engines.trtllm_linear.load_fused_first``)."""
        return load_fused_first(self, super().load_weights, weights, weight_mapper, allow_partial_loading, **kwargs)


_LLAMA, _MISTRAL, _QWEN2, _QWEN3 = (_native(f) for f in ("llama", "mistral", "qwen2", "qwen3"))

if _LLAMA is not None:
    @register_auto_model("ArmorLlamaForCausalLM")
    class ArmorLlamaForCausalLM(ArmorModelMixin, _LLAMA):
        """ARMOR A.S.B projections on TensorRT-LLM's LlamaForCausalLM."""

if _MISTRAL is not None:
    @register_auto_model("ArmorMistralForCausalLM")
    class ArmorMistralForCausalLM(ArmorModelMixin, _MISTRAL):
        """ARMOR A.S.B projections on TensorRT-LLM's MistralForCausalLM."""

if _QWEN2 is not None:
    @register_auto_model("ArmorQwen2ForCausalLM")
    class ArmorQwen2ForCausalLM(ArmorModelMixin, _QWEN2):
        """ARMOR A.S.B projections on TensorRT-LLM's Qwen2ForCausalLM."""

if _QWEN3 is not None:
    @register_auto_model("ArmorQwen3ForCausalLM")
    class ArmorQwen3ForCausalLM(ArmorModelMixin, _QWEN3):
        """ARMOR A.S.B projections on TensorRT-LLM's Qwen3ForCausalLM."""


def registered() -> dict[str, type]:
    """Architecture name -> ARMOR class, for the families this TensorRT-LLM release has."""
    return {name: cls for name in ("ArmorLlamaForCausalLM", "ArmorMistralForCausalLM", "ArmorQwen2ForCausalLM",
                                   "ArmorQwen3ForCausalLM") if (cls := globals().get(name)) is not None}
