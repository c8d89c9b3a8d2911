"""Model families as data: where the decoder layers are, which linears are pruned, which share an
input, and how names map into other formats. Adding a family adds one table entry.

lm_head and the embeddings are never pruned.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    layers_path: str  # attribute path of the decoder-layer ModuleList
    linears: tuple[str, ...]  # pruned linears, relative to one decoder layer
    shared_inputs: tuple[tuple[str, ...], ...]  # linears that read the same activation
    fusable: tuple[tuple[str, ...], ...]  # projections inference stacks fuse (qkv, gate/up)
    gguf_architectures: tuple[str, ...]
    trtllm_architecture: str  # our registered ARMOR model class name for TensorRT-LLM


def _decoder(name: str, gguf: tuple[str, ...]) -> Family:
    return Family(
        name=name,
        layers_path="model.layers",
        linears=ATTN + MLP,
        shared_inputs=(ATTN[:3], (ATTN[3],), MLP[:2], (MLP[2],)),
        fusable=(ATTN[:3], MLP[:2]),
        gguf_architectures=gguf,
        trtllm_architecture=f"Armor{name.capitalize()}ForCausalLM",
    )


# keyed by transformers' config.model_type
FAMILIES: dict[str, Family] = {
    "llama": _decoder("llama", ("llama",)),
    "mistral": _decoder("mistral", ("mistral",)),
    "qwen2": _decoder("qwen2", ("qwen2",)),
    "qwen3": _decoder("qwen3", ("qwen3",)),
}


class UnsupportedModel(ValueError):
    """The model's architecture is not one armor-export knows how to prune."""


def family_for(model_type: str | None, where: str = "model") -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"{where}: architecture {model_type!r} is not supported; armor-export supports model_type "
            f"{sorted(FAMILIES)} (Llama, Mistral, Qwen2, Qwen3 decoders)."
        )
    return FAMILIES[model_type]


def family_for_gguf(arch: str, where: str) -> Family:
    for fam in FAMILIES.values():
        if arch in fam.gguf_architectures:
            return fam
    supported = sorted(a for f in FAMILIES.values() for a in f.gguf_architectures)
    raise UnsupportedModel(f"{where}: GGUF architecture {arch!r} is not supported; supported: {supported}")


def target_names(family: Family, num_layers: int, ignore: tuple[str, ...] = ()) -> list[str]:
    """Fully qualified names of the linears to prune, minus those matching any ``ignore`` glob."""
    names = [f"{family.layers_path}.{i}.{lin}" for i in range(num_layers) for lin in family.linears]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, pat) for pat in ignore)]


def split_name(family: Family, fqn: str) -> tuple[int, str]:
    """'model.layers.3.mlp.down_proj' -> (3, 'mlp.down_proj')."""
    rest = fqn[len(family.layers_path) + 1:]
    idx, _, local = rest.partition(".")
    return int(idx), local
