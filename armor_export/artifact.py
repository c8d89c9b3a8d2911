"""The versioned factor artifact: what solving produces and every engine reads.

Layout of an artifact directory (format ``armor-export/factors``, version 3; schema in armor_export.manifest):
  manifest.json          format, version, source model, method and solver options, calibration
                         provenance (sha256), per-layer shape / block size / losses / status / time,
                         sha256 of every other file of the artifact (``files``), library versions
  manifest.sha256        the manifest's own sha256 (``sha256sum -c`` format)
  factors.index.json     {"metadata": {...}, "weight_map": {tensor: shard file}} (Hugging Face style)
  factors-0000i-of-0000n.safetensors   the shards: each one chunk of layers as the solver finished it
                         (the resume store's chunk file, moved in; armor_export.resume), holding per
                         pruned linear ``{fqn}``:
                           {fqn}.S_values  [d_out, d_in/2]   kept values of S, group order
                           {fqn}.S_meta    uint8 [d_out, ceil(d_in/8)]  2-bit positions (solver.sparsity)
                           {fqn}.A_blocks  [d_out/b, b, b]   (absent = identity)
                           {fqn}.B_blocks  [d_in/b, b, b]    (absent = identity)
                           {fqn}.bias      [d_out]           (absent = no bias)
  base.safetensors       every other tensor of the model (embeddings, norms, untied lm_head)
  config.json, tokenizer and generation files copied from the source model folder
  .armor-export.json     the ownership marker (armor_export.fsutil)
The normaliser is folded into A and B. No pickles anywhere; loading verifies the manifest's digest,
schema and version and every file's hash, and fails with the file's (and layer's) name on any mismatch.
Which layers share a shard depends on how they were solved (chunks, ranks, resumed layers); the
tensors do not. Versions 1 and 2 (one ``factors.safetensors``; version 1 with only the tensor files
hashed and no digest) are still read.

This module reads; armor_export.artifact_write writes (shards as layers finish, then the folder).
Reading is lazy: ``Artifact.layers`` and ``Artifact.base`` are mappings that read one layer's (one
tensor's) data from its shard when asked (safetensors ``safe_open``), so a stage that walks the
layers holds one layer's factors at a time.
Fused groups (``--fuse``): the members are stored as ordinary layers holding the same B_blocks; the
manifest's ``groups`` names them, and loading checks that their B is indeed shared.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from armor_export.hashes import HASHES, MARKER, folder_files, sha256_file
from armor_export.manifest import DIGEST, FORMAT, FORMAT_VERSION, ArtifactError, check_digest, check_version, validate
from solver.factors import Factorization
from solver.sparsity import unpack_24

FACTORS_FILE = "factors.safetensors"  # versions 1 and 2: all factors in one file
FACTORS_INDEX = "factors.index.json"  # version 3: tensor -> shard
PARTS = ("S_values", "S_meta", "A_blocks", "B_blocks", "bias")
BASE_FILE = "base.safetensors"
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
OWN_FILES = (MANIFEST, DIGEST, MARKER, HASHES)  # not part of ``files``; never copied from a source folder
__all__ = ["ArtifactError", "DIGEST", "FORMAT", "FORMAT_VERSION"]


@dataclass
class LayerFactors:
    factors: Factorization
    bias: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # manifest entry (losses, status, time ...)


@dataclass
class Artifact:
    path: Path
    manifest: dict
    layers: Mapping[str, LayerFactors]  # LazyLayers: one layer read per access
    base: Mapping[str, torch.Tensor]  # LazyTensors: one tensor read per access

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Fused groups: fused fqn -> member fqns in stacking order (empty for unfused and v1/v2 artifacts)."""
        return {g: tuple(r["members"]) for g, r in self.manifest.get("groups", {}).items()}


def shard_name(i: int, n: int) -> str:
    return f"factors-{i:05d}-of-{n:05d}.safetensors"


def _open(f: Path):
    if not Path(f).is_file():
        raise ArtifactError(f"{f}: missing (the artifact is incomplete)")
    try:
        return safe_open(str(f), "pt")
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{f}: cannot be read as safetensors ({e})") from None


def tensor_keys(f: Path) -> list[str]:
    """The tensor names of a safetensors file (its header only)."""
    with _open(f) as fh:
        return list(fh.keys())


class LazyTensors(Mapping):
    """``{tensor name: tensor}`` over safetensors files, read one tensor per access."""

    def __init__(self, folder: Path, where: dict[str, str]):
        self.folder, self.where = Path(folder), where

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self.folder / self.where[key]
        with _open(f) as fh:
            return fh.get_tensor(key)

    def read(self, keys) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with _open(self.folder / name) as fh:
                out.update({k: fh.get_tensor(k) for k in ks})
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


class LazyLayers(Mapping):
    """``{fqn: LayerFactors}`` of an artifact, each layer decoded from its shard when asked."""

    def __init__(self, folder: Path, entries: dict[str, dict], where: dict[str, str]):
        self.entries, self.tensors = entries, LazyTensors(folder, where)
        known = {f"{n}.{p}" for n in entries for p in PARTS}
        stray = sorted(k for k in where if k not in known)
        if stray:
            layer = stray[0].rsplit(".", 1)[0]
            raise ArtifactError(f"{Path(folder) / where[stray[0]]}: holds tensor {stray[0]!r}, but layer {layer} has "
                                f"no entry in the manifest's 'layers' (the manifest was edited or belongs to another "
                                f"artifact)")
        for n in entries:
            for p in ("S_values", "S_meta"):
                if f"{n}.{p}" not in where:
                    files = sorted(set(where.values())) or [FACTORS_INDEX]
                    raise ArtifactError(f"{Path(folder) / files[0]}: missing tensor '{n}.{p}' for layer {n}")

    def __getitem__(self, name: str) -> LayerFactors:
        entry = self.entries[name]
        keys = [f"{name}.{p}" for p in PARTS if f"{name}.{p}" in self.tensors.where]
        where = str(self.tensors.folder / self.tensors.where[f"{name}.S_values"])
        return layers_from_tensors(self.tensors.read(keys), {name: entry}, where)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _check_blocks(where: str, name: str, t: torch.Tensor | None, what: str, d: int, b) -> None:
    if t is None:
        return
    if b is None or tuple(t.shape) != (d // b, b, b) or not t.is_floating_point():
        raise ArtifactError(f"{where}: layer {name}: {what} has shape {tuple(t.shape)} {t.dtype}, but the "
                            f"manifest says [{d}/b, b, b] with block_size {b}; the artifact is inconsistent")


def layers_from_tensors(tensors: dict[str, torch.Tensor], entries: dict[str, dict],
                        where: str = FACTORS_FILE) -> dict[str, LayerFactors]:
    known = {f"{n}.{p}" for n in entries for p in ("S_values", "S_meta", "A_blocks", "B_blocks", "bias")}
    stray = sorted(k for k in tensors if k not in known)
    if stray:
        layer = stray[0].rsplit(".", 1)[0]
        raise ArtifactError(f"{where}: holds tensor {stray[0]!r}, but layer {layer} has no entry in the manifest's "
                            f"'layers' (the manifest was edited or belongs to another artifact)")
    layers = {}
    for name, info in entries.items():
        try:
            values, meta = tensors[f"{name}.S_values"], tensors[f"{name}.S_meta"]
        except KeyError as e:
            raise ArtifactError(f"{where}: missing tensor {e.args[0]!r} for layer {name}") from None
        d_out, d_in = (int(x) for x in info["shape"])
        try:
            if values.shape[0] != d_out:
                raise ValueError(f"S_values has {values.shape[0]} rows")
            S = unpack_24(values, meta, d_in)
        except (ValueError, RuntimeError, IndexError) as e:
            raise ArtifactError(f"{where}: layer {name}: S_values {tuple(values.shape)} / S_meta {tuple(meta.shape)} "
                                f"do not decode to the manifest's shape [{d_out}, {d_in}] ({e})") from None
        b = info.get("block_size")
        A, B, bias = (tensors.get(f"{name}.{k}") for k in ("A_blocks", "B_blocks", "bias"))
        _check_blocks(where, name, A, "A_blocks", d_out, b)
        _check_blocks(where, name, B, "B_blocks", d_in, b)
        if (bias is not None) != bool(info["has_bias"]) or (bias is not None and tuple(bias.shape) != (d_out,)):
            raise ArtifactError(f"{where}: layer {name}: bias {None if bias is None else tuple(bias.shape)} does "
                                f"not match the manifest (has_bias {info['has_bias']}, d_out {d_out})")
        f = Factorization(S, A, B)
        layers[name] = LayerFactors(f, bias, info)
    return layers


def copy_model_files(source_dir: Path, dest: Path) -> list[str]:
    """Copy config, tokenizer and generation files (not weights) of an HF folder."""
    copied = []
    for p in sorted(Path(source_dir).iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith(".") \
                and p.name not in OWN_FILES:
            shutil.copy2(p, dest / p.name)
            copied.append(p.name)
    return copied


def read_manifest(path: Path) -> dict:
    """The manifest of the artifact at ``path``, its digest and schema checked (not the other files)."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not an armor-export artifact: {MANIFEST} not found")
    data = mf.read_bytes()
    try:
        man = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        check_digest(mf, data, required=False)  # a digest mismatch is the clearer message
        raise ArtifactError(f"{mf}: not valid JSON ({e})") from None
    if isinstance(man, dict) and man.get("format") == FORMAT:
        check_version(mf, man.get("format_version"))  # a newer artifact says "upgrade", whatever else it holds
        check_digest(mf, data, required=man["format_version"] >= 2)
    validate(mf, man)
    return man


def check_files(path: Path, man: dict) -> None:
    """Every file the manifest lists exists and matches its sha256; (version 2) nothing else is there."""
    path = Path(path)
    files = man["files"]
    factors = (FACTORS_INDEX,) if man["format_version"] >= 3 else (FACTORS_FILE,)
    required = (*factors, BASE_FILE) + (tuple(man["model_files"]) if man["format_version"] >= 2 else ())
    for name in required:
        if name not in files:
            raise ArtifactError(f"{path / MANIFEST}: field 'files' has no entry for {name}; the manifest was edited "
                                f"or is incomplete: re-create the artifact")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (the artifact is incomplete)")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 does not match the manifest; the file is corrupt or was modified")
    if man["format_version"] >= 2:
        extra = [f for f in folder_files(path, OWN_FILES) if f not in files]
        if extra:
            raise ArtifactError(f"{path / extra[0]}: not listed in the manifest's 'files' (added after the artifact "
                                f"was written); remove it or re-create the artifact")
    else:
        print(f"armor-export: note: {path} is a format version 1 artifact: only its tensor files are hashed "
              f"(config and tokenizer are not checked); re-create it for the full check", file=sys.stderr)


def check_artifact(path: Path) -> dict:
    """Manifest (digest, schema, version) and every file's hash, without loading tensors: the first step of
    every command that reads an artifact, so nothing reads a corrupt config or tokenizer."""
    man = read_manifest(path)
    check_files(Path(path), man)
    return man


def factor_files(path: Path, man: dict) -> dict[str, str]:
    """``{tensor: file}`` of the factors: the index (version 3, every shard listed in ``files``) or the one
    factors file's header (versions 1, 2)."""
    path = Path(path)
    if man["format_version"] < 3:
        return dict.fromkeys(tensor_keys(path / FACTORS_FILE), FACTORS_FILE)
    f = path / FACTORS_INDEX
    try:
        where = json.loads(f.read_text())["weight_map"]
        if not (isinstance(where, dict) and all(isinstance(v, str) for v in where.values())):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{f}: not a valid index ({type(e).__name__}: {e}); re-create the artifact") from None
    for name in sorted(set(where.values())):
        if name not in man["files"] or "/" in name:
            raise ArtifactError(f"{f}: names shard {name!r}, which the manifest's 'files' does not list; the index "
                                f"was edited: re-create the artifact")
        keys = set(tensor_keys(path / name))
        listed = {k for k, v in where.items() if v == name}
        if keys != listed:
            odd = sorted(keys ^ listed)[0]
            raise ArtifactError(f"{path / name}: tensor {odd!r} does not match {FACTORS_INDEX}; re-create the "
                                f"artifact")
    return where


def load_artifact(path: Path, *, verify: bool = True) -> Artifact:
    """Open an artifact; ``verify`` (default) checks every file's sha256 first. Tensors are read lazily."""
    path = Path(path)
    man = read_manifest(path)
    if verify:
        check_files(path, man)
    layers = LazyLayers(path, man["layers"], factor_files(path, man))
    check_shared_b(layers, man.get("groups", {}), str(path / FACTORS_INDEX))
    base = LazyTensors(path, dict.fromkeys(tensor_keys(path / BASE_FILE), BASE_FILE))
    return Artifact(path, man, layers, base)


def check_shared_b(layers: Mapping[str, LayerFactors], groups: dict, where: str) -> None:
    """The members of every fused group hold one and the same B (they were solved as one stacked layer);
    read one group at a time."""
    from solver.fused import shares_input_factor

    for g, rec in groups.items():
        if not shares_input_factor([layers[m].factors for m in rec["members"]]):
            raise ArtifactError(f"{where}: the members of fused group {g} ({', '.join(rec['members'])}) do not hold "
                                f"the same B_blocks and block size; the artifact is inconsistent: re-create it")


def shard_of(path: Path, layer: str) -> str:
    """The file name (in the artifact at ``path``) holding ``layer``'s factors."""
    path = Path(path)
    return factor_files(path, read_manifest(path))[f"{layer}.S_values"]


def read_layers(art: Artifact) -> dict[str, LayerFactors]:
    """Every layer's factors in memory (for callers that really need them all at once)."""
    return {n: art.layers[n] for n in art.layers}


def build_base_model(art: Artifact, *, dtype: torch.dtype = torch.float32):
    """The HF model of the artifact's config with base tensors loaded; pruned linears still hold
    their freshly initialised dense weights until the caller replaces them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(art.path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(art.base, strict=False)
    pruned = {f"{n}.weight" for n in art.layers} | {f"{n}.bias" for n in art.layers}
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    really_missing = sorted(set(missing) - pruned - tied)
    if really_missing or unexpected:
        raise ArtifactError(f"{art.path / BASE_FILE}: does not match config.json (missing {really_missing[:5]}, "
                            f"unexpected {list(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    return model.to(dtype)
