"""Model families as data: every per-family fact that pruning and the engines need, in one table.

``FAMILIES`` (keyed by transformers' ``config.model_type``) holds the static facts of a family: where
the decoder layers are, which linears are pruned (as the model has them: Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` are pruned fused) and which of them read the same activation, the module names of the
norms, q/k norms, whether q/k/v carry a bias, how the sliding window is declared, the norm offset
(Gemma's ``x * (1 + w)``), the embedding scale, soft-capping, the activation and the config keys it is
read from. ``model_facts(config)`` reads the per-model values (heads, GQA, head_dim, RoPE type and
scaling, the window of every layer, tied lm_head, special token ids with their fallbacks) from one
transformers config; it is the only place any stage reads those keys.

``ModelFacts.features()`` names what a model needs from an engine; ``check_features`` fails with one
line naming the family, the feature and the engine when an engine cannot express one of them.
lm_head and the embeddings are never pruned.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QKV_FUSED, GATE_UP_FUSED = "self_attn.qkv_proj", "mlp.gate_up_proj"


@dataclass(frozen=True)
class Family:
    name: str
    layers_path: str  # attribute path of the decoder-layer ModuleList
    linears: tuple[str, ...]  # pruned linears, relative to one decoder layer, as the model has them
    shared_inputs: tuple[tuple[str, ...], ...]  # linears that read the same activation
    fusable: tuple[tuple[str, ...], ...]  # separate projections inference stacks fuse (qkv, gate/up)
    gguf_architectures: tuple[str, ...]
    trtllm_architecture: str  # our registered ARMOR model class name for TensorRT-LLM
    # attention / MLP projections, relative to one decoder layer; one name = fused in the model
    qkv: tuple[str, ...] = ATTN[:3]  # (q, k, v) or (qkv fused, rows q | k | v)
    o_proj: str = ATTN[3]
    gate_up: tuple[str, ...] = MLP[:2]  # (gate, up) or (gate_up fused, rows gate | up)
    down_proj: str = MLP[2]
    # norms (module names; the weight is ``{name}.weight``)
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    attn_norm: str = "input_layernorm"  # before attention
    mlp_norm: str = "post_attention_layernorm"  # before the MLP
    post_attn_norm: str | None = None  # Gemma 2 sandwich: on the attention output before the residual add
    post_mlp_norm: str | None = None
    qk_norm: tuple[str, str] | None = None  # per-head RMSNorm of q and k before RoPE (Qwen3)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + w); Gemma: 1, computed in fp32
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma), in the model dtype
    qkv_bias: str = "attention_bias"  # config key that switches q/k/v/o biases; "always" = q/k/v always
    mlp_bias_key: str | None = None  # config key for MLP biases (Llama's mlp_bias)
    act_keys: tuple[str, ...] = ("hidden_act",)  # config keys of the MLP activation, first present wins
    # sliding window: "none"; "all" (``sliding_window`` applies to every layer when set);
    # "layer_types" (``config.layer_types``; else derived from use_sliding_window / max_window_layers)
    window_rule: str = "none"
    softcap: bool = False  # attn_logit_softcapping / final_logit_softcapping (Gemma 2)
    attn_scale_key: str | None = None  # scores scaled by config[key] ** -0.5 instead of head_dim ** -0.5

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def fused_gate_up(self) -> bool:
        return len(self.gate_up) == 1


def _decoder(name: str, gguf: tuple[str, ...], **kw) -> Family:
    return Family(name=name, layers_path="model.layers", linears=ATTN + MLP,
                  shared_inputs=(ATTN[:3], (ATTN[3],), MLP[:2], (MLP[2],)), fusable=(ATTN[:3], MLP[:2]),
                  gguf_architectures=gguf, trtllm_architecture=f"Armor{name.capitalize()}ForCausalLM", **kw)


FUSED = (QKV_FUSED, ATTN[3], GATE_UP_FUSED, MLP[2])

# keyed by transformers' config.model_type
FAMILIES: dict[str, Family] = {
    "llama": _decoder("llama", ("llama",), mlp_bias_key="mlp_bias"),
    "mistral": _decoder("mistral", ("mistral",), qkv_bias="none", window_rule="all"),
    "qwen2": _decoder("qwen2", ("qwen2",), qkv_bias="always", window_rule="layer_types"),
    "qwen3": _decoder("qwen3", ("qwen3",), qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
                      window_rule="layer_types"),
    "phi3": Family(name="phi3", layers_path="model.layers", linears=FUSED,
                   shared_inputs=((FUSED[0],), (FUSED[1],), (FUSED[2],), (FUSED[3],)), fusable=(),
                   gguf_architectures=("phi3",), trtllm_architecture="ArmorPhi3ForCausalLM",
                   qkv=(QKV_FUSED,), gate_up=(GATE_UP_FUSED,), qkv_bias="none", window_rule="all"),
    "gemma2": _decoder("gemma2", ("gemma2",), mlp_norm="pre_feedforward_layernorm",
                       post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
                       norm_offset=1.0, embed_scale=True, act_keys=("hidden_activation", "hidden_act"),
                       window_rule="layer_types", softcap=True, attn_scale_key="query_pre_attn_scalar"),
}
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only


class UnsupportedModel(ValueError):
    """The model's architecture is not one armor-export knows how to prune."""


class UnsupportedFeature(ValueError):
    """A feature the model needs that an engine cannot express; the message names family, feature, engine."""


def family_for(model_type: str | None, where: str = "model") -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"{where}: architecture {model_type!r} is not supported; armor-export supports model_type "
            f"{sorted(FAMILIES)} (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 decoders)."
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


# --fuse kinds: the separate projections of a family's ``fusable`` group -> the fused module name
FUSE_KINDS = {"qkv": (ATTN[:3], QKV_FUSED), "gate_up": (MLP[:2], GATE_UP_FUSED)}


def parse_fuse(spec: str | None) -> tuple[str, ...]:
    """'qkv,gate_up' -> ('qkv', 'gate_up'); 'none' or '' -> (); an unknown kind is one clear error."""
    kinds = tuple(dict.fromkeys(k.strip() for k in (spec or "").split(",") if k.strip()))
    if kinds == ("none",):
        return ()
    bad = [k for k in kinds if k not in FUSE_KINDS]
    if bad:
        raise ValueError(f"--fuse {spec}: unknown group {bad[0]!r}; choose from {', '.join(FUSE_KINDS)} "
                         f"(comma-separated) or 'none'")
    return kinds


def fuse_groups(family: Family, names: list[str], kinds: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Fused fqn -> member fqns (in stacking order) for every group of ``kinds`` the family has
    (``Family.fusable``) whose members are all in ``names`` (a group with an ``--ignore``d member stays
    unfused). Families whose model is already fused (Phi-3) have no fusable groups: nothing to do."""
    wanted = set(names)
    groups: dict[str, tuple[str, ...]] = {}
    for n in names:
        i, local = split_name(family, n)
        for kind in kinds:
            members, fused = FUSE_KINDS[kind]
            if members in family.fusable and local == members[0]:
                fqns = tuple(f"{family.layers_path}.{i}.{m}" for m in members)
                if all(m in wanted for m in fqns):
                    groups[f"{family.layers_path}.{i}.{fused}"] = fqns
    return groups


def split_name(family: Family, fqn: str) -> tuple[int, str]:
    """'model.layers.3.mlp.down_proj' -> (3, 'mlp.down_proj')."""
    rest = fqn[len(family.layers_path) + 1:]
    idx, _, local = rest.partition(".")
    return int(idx), local


# ---- per-model facts ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenIds:
    bos: int | None
    eos: tuple[int, ...]
    pad: int | None
    source: dict = field(default_factory=dict)  # which file each id came from


@dataclass(frozen=True)
class ModelFacts:
    family: Family
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    rms_eps: float
    rope_type: str
    rope_theta: float
    rope_parameters: dict
    partial_rotary: float
    windows: tuple[int | None, ...]  # per layer: keys older than the window are masked; None = full
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tied_lm_head: bool
    activation: str
    attn_scale: float  # multiplies q.k^T
    attn_softcap: float | None
    final_softcap: float | None

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.windows)

    def layer(self, i: int, local: str) -> str:
        return f"{self.family.layers_path}.{i}.{local}"

    def features(self) -> dict[str, str]:
        """Feature key -> description, for every non-trivial feature this model needs from an engine."""
        f = self.family
        out = {f"rope:{self.rope_type}": f"RoPE type {self.rope_type!r}"}
        if self.partial_rotary != 1.0:
            out["partial_rotary"] = f"partial rotary embedding (factor {self.partial_rotary})"
        if f.fused_qkv:
            out["fused_qkv"] = f"fused {f.qkv[0]}"
        if f.fused_gate_up:
            out["fused_gate_up"] = f"fused {f.gate_up[0]}"
        if f.qk_norm:
            out["qk_norm"] = "q/k RMSNorm per head"
        if self.qkv_bias or self.o_bias or self.mlp_bias:
            out["linear_bias"] = "biases on the attention/MLP linears"
        if self.sliding:
            out["sliding_window"] = f"sliding-window attention (windows {sorted({w for w in self.windows if w})})"
        if self.attn_softcap:
            out["attn_softcap"] = f"attention logit soft-capping ({self.attn_softcap})"
        if self.final_softcap:
            out["final_softcap"] = f"final logit soft-capping ({self.final_softcap})"
        if f.norm_offset:
            out["norm_offset"] = f"RMSNorm weight offset (x * ({f.norm_offset:g} + w))"
        if f.embed_scale:
            out["embed_scale"] = "embedding scaled by sqrt(hidden_size)"
        if f.post_attn_norm or f.post_mlp_norm:
            out["sandwich_norm"] = "norms on the attention and MLP outputs"
        if self.activation not in ("silu",):
            out[f"act:{self.activation}"] = f"MLP activation {self.activation!r}"
        return out


ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh")


def check_features(facts: ModelFacts, engine: str, supported, where: str = "") -> None:
    """Raise UnsupportedFeature naming family, feature and engine for the first feature not in ``supported``
    (a set of feature keys; a key ending in ':*' accepts every value of that prefix)."""
    for key, desc in facts.features().items():
        prefix = key.split(":", 1)[0] + ":*"
        if key not in supported and prefix not in supported:
            raise UnsupportedFeature(f"{where + ': ' if where else ''}family {facts.family.name!r} needs {desc}, "
                                     f"which the {engine!r} engine cannot express; use the 'torch' engine or "
                                     f"another family")


def _get(config, key, default=None):
    v = getattr(config, key, None)
    return default if v is None else v


def layer_windows(family: Family, config) -> tuple[int | None, ...]:
    n, window = config.num_hidden_layers, _get(config, "sliding_window")
    if family.window_rule == "none" or not window:
        return (None,) * n
    if family.window_rule == "all":
        return (int(window),) * n
    types = getattr(config, "layer_types", None)
    if types is None:  # older configs: Qwen2-style use_sliding_window + max_window_layers
        if not _get(config, "use_sliding_window", family.name == "gemma2"):
            return (None,) * n
        first = _get(config, "max_window_layers", 0)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if family.name in ("qwen2", "qwen3") and not _get(config, "use_sliding_window", True):
        return (None,) * n
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def rope_facts(config) -> tuple[str, float, dict, float]:
    params = dict(_get(config, "rope_parameters") or _get(config, "rope_scaling") or {})
    rtype = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", _get(config, "rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0)))
    return rtype, theta, params, partial


def model_facts(config) -> ModelFacts:
    """Every per-model value any stage needs, read from a transformers config (the only reader of its keys)."""
    fam = family_for(config.model_type, "config.json")
    heads = config.num_attention_heads
    head_dim = _get(config, "head_dim") or config.hidden_size // heads
    rtype, theta, params, partial = rope_facts(config)
    attn_bias = bool(_get(config, "attention_bias", False))
    act = next((getattr(config, k) for k in fam.act_keys if getattr(config, k, None)), "silu")
    scale_base = _get(config, fam.attn_scale_key) if fam.attn_scale_key else None
    return ModelFacts(
        family=fam, num_layers=config.num_hidden_layers, hidden=config.hidden_size,
        intermediate=config.intermediate_size, heads=heads, kv_heads=_get(config, "num_key_value_heads", heads),
        head_dim=head_dim, vocab=config.vocab_size, max_positions=_get(config, "max_position_embeddings", 4096),
        rms_eps=float(_get(config, "rms_norm_eps", 1e-6)), rope_type=rtype, rope_theta=theta,
        rope_parameters=params, partial_rotary=partial, windows=layer_windows(fam, config),
        qkv_bias=fam.qkv_bias == "always" or (fam.qkv_bias == "attention_bias" and attn_bias),
        o_bias=fam.qkv_bias == "attention_bias" and attn_bias,
        mlp_bias=bool(fam.mlp_bias_key and _get(config, fam.mlp_bias_key, False)),
        tied_lm_head=bool(_get(config, "tie_word_embeddings", False)), activation=act,
        attn_scale=float((scale_base or head_dim) ** -0.5),
        attn_softcap=_get(config, "attn_logit_softcapping") if fam.softcap else None,
        final_softcap=_get(config, "final_logit_softcapping") if fam.softcap else None,
    )


def _ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def token_ids(config, folder: Path | None = None) -> TokenIds:
    """bos / eos / pad ids with fallbacks config.json -> generation_config.json -> the tokenizer; bos falls
    back to the first eos (genai and other runtimes need a number) and pad to the first eos."""
    gen, tok = {}, None
    if folder is not None and (Path(folder) / "generation_config.json").is_file():
        gen = json.loads((Path(folder) / "generation_config.json").read_text())
    src: dict[str, str] = {}

    def pick(key: str):
        nonlocal tok
        v = getattr(config, f"{key}_token_id", None)
        if v is not None:
            src[key] = "config.json"
            return v
        if gen.get(f"{key}_token_id") is not None:
            src[key] = "generation_config.json"
            return gen[f"{key}_token_id"]
        if folder is not None and (Path(folder) / "tokenizer_config.json").is_file():
            if tok is None:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            v = getattr(tok, f"{key}_token_id", None)
            if v is not None:
                src[key] = "tokenizer"
                return v
        return None

    eos = _ids(pick("eos"))
    bos, pad = pick("bos"), pick("pad")
    if bos is None and eos:
        bos, src["bos"] = eos[0], "eos (no bos_token_id in config, generation_config or tokenizer)"
    if pad is None and eos:
        pad, src["pad"] = eos[0], "eos (no pad_token_id)"
    return TokenIds(None if bos is None else int(bos), eos, None if pad is None else int(pad), src)
