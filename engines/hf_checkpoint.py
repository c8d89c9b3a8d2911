"""The ARMOR Hugging-Face-style checkpoint folder (what TensorRT-LLM's PyTorch backend loads).

Layout (format ``armor-export/hf-checkpoint``, version 2; version 3 when the artifact has fused groups):
  config.json          the source config, plus
                         ``architectures``: [our registered class, e.g. "ArmorLlamaForCausalLM"]
                         ``torch_dtype`` / ``dtype``: the checkpoint dtype
                         ``armor``: format, format_version, block_size, targets (local projection names),
                                    layers {fqn: shape, block_size, has_A, has_B, has_bias},
                                    s_storage, fusion, source_architectures,
                                    groups {fused fqn: {members, split}} (version 3 only)
  model-0000i-of-0000n.safetensors + model.safetensors.index.json (Hugging Face sharding: the index's
  ``weight_map`` names each tensor's shard; shards hold at most ``max_shard_bytes``, default 1 GiB, or one
  tensor when a tensor is larger), together holding, per pruned projection ``{fqn}``:
                         {fqn}.A [d_out/b, b, b]  (absent = identity)
                         {fqn}.S [d_out, d_in]    2:4 along d_in, stored DENSE with +0.0 zeros
                         {fqn}.B [d_in/b, b, b]   (absent = identity)
                         {fqn}.bias [d_out]       (absent = no bias)
                       every other tensor under its Hugging Face name (tied lm_head omitted)
  tokenizer / generation files copied from the artifact.
Version 1 (one ``model.safetensors``, no index) is still read.
The shards are written one at a time from the lazily read artifact, so writing holds at most one shard
(plus one layer, or one fused group) in memory. TensorRT-LLM's PyTorch backend reads every ``*.safetensors``
of the folder (``HfWeightLoader.load_weights`` in tensorrt_llm/_torch/models/checkpoints/hf/weight_loader.py,
read at NVIDIA/TensorRT-LLM commit 149b221391edea2c3ef09390083aa4805e2461a2), so shards need no change there.
S is stored dense (not packed) because that is what ``torch.sparse.to_sparse_semi_structured`` and
TensorRT's weight-sparsity detection consume; the zeros cost 2x S's bytes on disk.

Fusion (``armor.fusion`` says which case a checkpoint is): an artifact pruned without ``--fuse`` gives every
q/k/v and gate/up projection its own input factor B, so each keeps its own A.S.B (``FUSION_NOTE``; version 2,
written byte for byte as before fused groups existed). A fused group of the artifact (``--fuse qkv,gate_up``:
the members solved as one stacked layer with one shared B) is stored ONCE, under TensorRT-LLM's native fused
name (``model.layers.N.self_attn.qkv_proj``, ``model.layers.N.mlp.gate_up_proj``): S = the members' S stacked
by rows (still 2:4 along d_in), A = the members' A blocks concatenated (block-diagonal over the stacked
output), B = the one shared B, bias = the members' biases stacked (zeros for a member without one);
``armor.layers`` lists the group under its fused name with the stacked shape, ``armor.groups`` gives its
members and split sizes (``FUSED_NOTE``; version 3). Projections outside a group (o_proj, down_proj, or a
group left unfused by ``--ignore``) are stored as in version 2.

``load_checkpoint_model(dir, dtype=, device=, semi_structured=)`` loads it into the plain PyTorch
runtime (``engines.torch_module.ArmorLinear``; a fused group as one ``ArmorLinear`` split by
``FusedArmor``/``FusedPart``); the same function serves CPU and CUDA checks.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from armor_export.adapters import family_for, split_name
from armor_export.artifact import Artifact, copy_model_files, load_artifact
from armor_export.fsutil import atomic_dir
from engines.parity import DTYPES
from solver.fused import stack_biases, stack_factorizations
from solver.sparsity import is_24, positive_zeros

CKPT_FORMAT = "armor-export/hf-checkpoint"
CKPT_VERSION = 2  # written when the artifact has no fused group (byte-identical to before fusion)
CKPT_FUSED_VERSION = 3  # written when it has: groups stored once under their native fused name
CKPT_READS = (1, 2, 3)
WEIGHTS = "model.safetensors"  # version 1: every tensor in this one file
WEIGHTS_INDEX = "model.safetensors.index.json"  # version 2: tensor name -> shard
MAX_SHARD_BYTES = 1 << 30
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
# armor.fusion: FUSION_NOTE when the artifact has no fused group (pruned without --fuse; also Phi-3, whose model has
# qkv_proj / gate_up_proj and so no group to fuse), FUSED_NOTE when it has (format 3, armor.groups)
FUSION_NOTE = ("unfused: q/k/v and gate/up have different input factors B, so each projection keeps its own "
               "A.S.B; TensorRT-LLM's fused qkv_proj / gate_up_proj are emulated by concatenating outputs")
FUSED_NOTE = ("fused: each group in armor.groups (q/k/v, gate/up pruned as one stacked layer with one shared input "
              "factor B, armor-export --fuse) is stored once under TensorRT-LLM's fused name (qkv_proj, gate_up_proj): "
              "S the members' S stacked by rows (2:4 along d_in), A their A blocks concatenated, B the shared B, bias "
              "stacked; it runs as one A.S.B whose output is split by armor.groups[...].split; projections outside a "
              "group keep their own A.S.B")


class CheckpointError(ValueError):
    """A checkpoint folder that does not follow the ARMOR HF-checkpoint schema."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_tensors(art: Artifact, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, cast to ``dtype``, one at a time (the artifact is read lazily, one
    layer per access); zeros of S are +0.0 after the cast (a tiny negative value rounds to -0.0 in
    fp16/bf16 and is normalised here). A fused group is written once, under its fused name, where its first
    member comes in the artifact's layer order (``group_factors``)."""
    def ready(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().cpu()

    for name in art.base:
        t = art.base[name]
        yield name, ready(t.to(dtype) if t.is_floating_point() else t)
    group_of = {m: g for g, ms in art.groups.items() for m in ms}
    done: set[str] = set()
    for fqn in art.layers:
        if fqn in group_of:
            g = group_of[fqn]
            if g in done:
                continue
            done.add(g)
            fqn, (f, bias) = g, group_factors(art, g)
        else:
            lf = art.layers[fqn]
            f, bias = lf.factors, lf.bias
        yield f"{fqn}.S", ready(positive_zeros(f.S.to(dtype)))
        if f.A_blocks is not None:
            yield f"{fqn}.A", ready(f.A_blocks.to(dtype))
        if f.B_blocks is not None:
            yield f"{fqn}.B", ready(f.B_blocks.to(dtype))
        if bias is not None:
            yield f"{fqn}.bias", ready(bias.to(dtype))


def group_factors(art: Artifact, group: str):
    """(stacked factorization, stacked bias or None) of a fused group: S and A of the members stacked in
    member order, their one shared B (``solver.fused.stack_factorizations`` refuses members that do not share it)."""
    members = art.groups[group]
    lfs = [art.layers[m] for m in members]
    return (stack_factorizations([lf.factors for lf in lfs]),
            stack_biases([lf.bias for lf in lfs], [lf.factors.S.shape[0] for lf in lfs]))


def shard_file(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
                 metadata: dict[str, str]) -> dict[str, str]:
    """Write ``tensors`` (in order) into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard
    of its own) and the index; return the weight map. Holds one shard in memory at a time."""
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    parts: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            save_file(pending, str(folder / f".part-{len(parts):05d}"), metadata=metadata)
            parts.append(list(pending))
            pending, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[name] = t
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(parts):
        dest = shard_file(i + 1, len(parts))
        (folder / f".part-{i:05d}").rename(folder / dest)
        weight_map.update(dict.fromkeys(names, dest))
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return weight_map


def weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it: from the index (version 2) or the one ``model.safetensors``
    (version 1). A missing index, shard or file is a ``CheckpointError`` naming it."""
    ckpt_dir = Path(ckpt_dir)
    idx = ckpt_dir / WEIGHTS_INDEX
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{idx}: not a safetensors index with a 'weight_map' ({e})") from None
        out = {k: ckpt_dir / v for k, v in wm.items()}
        gone = sorted({str(p) for p in out.values() if not p.is_file()})
        if gone:
            raise CheckpointError(f"{gone[0]}: missing (listed in {idx}); the checkpoint is incomplete: re-export it")
        return out
    single = ckpt_dir / WEIGHTS
    if single.is_file():
        return dict.fromkeys(read_safetensors_header(single), single)
    raise CheckpointError(f"{ckpt_dir}: neither {WEIGHTS_INDEX} nor {WEIGHTS}; not a complete checkpoint")


def read_headers(ckpt_dir: Path) -> dict[str, dict]:
    """Every tensor's safetensors header entry (dtype, shape, data_offsets) across the checkpoint's files."""
    out: dict[str, dict] = {}
    for f in sorted(set(weight_files(ckpt_dir).values())):
        out.update(read_safetensors_header(f))
    return out


def armor_config(art: Artifact, source_config: dict, dtype: torch.dtype) -> dict:
    fam = family_for(source_config.get("model_type"), str(art.path / "config.json"))
    entries = art.manifest["layers"]  # shapes and block sizes from the manifest: no layer is read here
    has = _tensor_names(art)
    sizes = {e["block_size"] for e in entries.values()} - {None}
    targets = sorted({split_name(fam, n)[1] for n in art.layers})
    groups = art.groups
    grouped = {m for ms in groups.values() for m in ms}
    layers = {n: {"shape": list(e["shape"]), "block_size": e["block_size"],
                  "has_A": f"{n}.A_blocks" in has, "has_B": f"{n}.B_blocks" in has,
                  "has_bias": bool(e["has_bias"])} for n, e in entries.items() if n not in grouped}
    split = {g: [entries[m]["shape"][0] for m in ms] for g, ms in groups.items()}
    for g, ms in groups.items():  # the stacked layer, stored under the fused name
        first = ms[0]
        layers[g] = {"shape": [sum(split[g]), entries[first]["shape"][1]], "block_size": entries[first]["block_size"],
                     "has_A": f"{first}.A_blocks" in has, "has_B": f"{first}.B_blocks" in has,
                     "has_bias": any(bool(entries[m]["has_bias"]) for m in ms)}
    cfg = dict(source_config)
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [fam.trtllm_architecture]
    cfg["torch_dtype"] = cfg["dtype"] = DTYPE_NAMES[dtype]
    cfg["armor"] = {
        "format": CKPT_FORMAT,
        "format_version": CKPT_FUSED_VERSION if groups else CKPT_VERSION,
        "family": fam.name,
        "block_size": sizes.pop() if len(sizes) == 1 else None,
        "targets": targets,
        "layers": layers,
        "s_storage": "dense, 2:4 along d_in (axis 1), +0.0 zeros",
        "product": "y = ((x . B^T) . S^T) . A^T + bias (A, B block-diagonal, stored as [n, b, b] blocks)",
        "fusion": FUSED_NOTE if groups else FUSION_NOTE,
        "source_architectures": source_config.get("architectures"),
        "method": art.manifest.get("method"),
    }
    if groups:
        cfg["armor"]["groups"] = {g: {"members": list(ms), "split": split[g]} for g, ms in groups.items()}
    return cfg


def _tensor_names(art: Artifact) -> set[str]:
    """The artifact's factor tensor names ({fqn}.A_blocks, ...), without reading any tensor data."""
    where = getattr(getattr(art.layers, "tensors", None), "where", None)
    if where is not None:
        return set(where)
    out = set()
    for n, lf in art.layers.items():
        out |= {f"{n}.{k}" for k, t in (("A_blocks", lf.factors.A_blocks), ("B_blocks", lf.factors.B_blocks)) if t is not None}
    return out


def write_checkpoint(artifact_dir: Path, out_dir: Path, *, dtype: str | torch.dtype | None = None,
                     overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the ARMOR HF checkpoint of an artifact atomically, shard by shard; return the folder."""
    art = load_artifact(artifact_dir)
    dt = resolve_dtype(dtype)
    source = json.loads((Path(artifact_dir) / "config.json").read_text())
    cfg = armor_config(art, source, dt)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        copy_model_files(art.path, tmp)
        for extra in ("manifest.json",):
            (tmp / extra).unlink(missing_ok=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_shards(tmp, checkpoint_tensors(art, dt), max_shard_bytes,
                     {"format": "pt", "armor_format": CKPT_FORMAT,
                      "armor_format_version": str(cfg["armor"]["format_version"])})
    return Path(out_dir)


# ---------------------------------------------------------------- reading and checking

def read_config(ckpt_dir: Path) -> dict:
    p = Path(ckpt_dir) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{p}: missing")
    cfg = json.loads(p.read_text())
    armor = cfg.get("armor")
    if not isinstance(armor, dict) or armor.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{p}: no 'armor' section of format {CKPT_FORMAT!r}; not an ARMOR checkpoint")
    if armor.get("format_version") not in CKPT_READS:
        raise CheckpointError(f"{p}: armor format_version {armor.get('format_version')!r} is not one this version "
                              f"reads ({', '.join(map(str, CKPT_READS))}); re-export the checkpoint")
    return cfg


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (name -> dtype, shape, data_offsets), read from the bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def load_checkpoint_model(ckpt_dir: Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
                          semi_structured: bool = False):
    """The HF model of the checkpoint with every projection an ``ArmorLinear`` (no TensorRT-LLM).

    ``dtype`` None keeps the stored dtype. Returns (model, config dict, number of S turned into
    semi-structured tensors)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from engines.torch_module import ArmorLinear, FusedArmor, FusedPart, set_submodule

    ckpt_dir = Path(ckpt_dir)
    cfg = read_config(ckpt_dir)
    stored = resolve_dtype({"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[cfg["torch_dtype"]])
    dt = stored if dtype is None else resolve_dtype(dtype)
    files = weight_files(ckpt_dir)
    tensors = {}
    for f in sorted(set(files.values())):
        tensors.update(load_file(str(f)))
    config = AutoConfig.from_pretrained(ckpt_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=dt)
    layers, groups = cfg["armor"]["layers"], cfg["armor"].get("groups", {})
    for fqn in layers:
        get = (lambda s: None if f"{fqn}.{s}" not in tensors else tensors.pop(f"{fqn}.{s}").to(dt))
        S = get("S")
        if S is None or not is_24(S):
            raise CheckpointError(f"{files.get(f'{fqn}.S', ckpt_dir / WEIGHTS_INDEX)}: {fqn}.S missing or not 2:4")
        linear = ArmorLinear(S, get("A"), get("B"), get("bias"))
        if fqn not in groups:
            set_submodule(model, fqn, linear)
            continue
        group = FusedArmor(linear, groups[fqn]["split"])  # one A.S.B, its output split among the members
        set_submodule(model, fqn, group)
        for j, member in enumerate(groups[fqn]["members"]):
            set_submodule(model, member, FusedPart(group, j))
    missing, unexpected = model.load_state_dict({k: v.to(dt) if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    owners = set(layers) | {f"{g}.linear" for g in groups}
    armor_bufs = {n for n in missing if n.rpartition(".")[0] in owners}
    bad = sorted(set(missing) - tied - armor_bufs)
    if bad or unexpected:
        raise CheckpointError(f"{ckpt_dir}: the weights do not match config.json (missing {bad[:5]}, "
                              f"unexpected {list(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    model.to(device=device, dtype=dt)
    n_sparse = 0
    if semi_structured:
        n_sparse = sum(bool(m.to_semi_structured()) for m in model.modules() if isinstance(m, ArmorLinear))
    model.eval()
    return model, cfg, n_sparse


def checkpoint_logits(ckpt_dir: Path, tokens: torch.Tensor, *, device: str = "cpu", dtype=None,
                      semi_structured: bool = False) -> tuple[torch.Tensor, int]:
    """Logits (fp32, CPU) of the checkpoint in the plain PyTorch runtime on ``device``; the second value
    counts the S tensors that ran as semi-structured sparse (0 on CPU)."""
    from engines.parity import model_logits

    model, _, n_sparse = load_checkpoint_model(ckpt_dir, dtype=dtype, device=device, semi_structured=semi_structured)
    logits = model_logits(model, tokens)
    del model
    return logits, n_sparse
