"""The versioned factor artifact: what solving produces and every engine reads.

Layout of an artifact directory (format ``armor-export/factors``, version 3; schema in armor_export.manifest):
  manifest.json          format, version, source model, method and solver options, calibration
                         provenance (sha256), per-layer shape / block size / losses / status / time,
                         sha256 of every other file of the artifact (``files``), library versions
  manifest.sha256        the manifest's own sha256 (``sha256sum -c`` format)
  factors.safetensors    per pruned linear ``{fqn}``:
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
Version-1 artifacts (only the tensor files hashed, no digest) and version-2 ones (no ``groups``) are still read.
Fused groups (version 3, ``--fuse``): the members are stored as ordinary layers holding the same B_blocks;
the manifest's ``groups`` names them, and loading checks that their B is indeed shared.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from armor_export.fsutil import HASHES, MARKER, atomic_dir, folder_files, sha256_file
from armor_export.manifest import (DIGEST, FORMAT, FORMAT_VERSION, ArtifactError, check_digest, check_version,
                                   digest_line, validate)
from solver.factors import Factorization
from solver.sparsity import pack_24, unpack_24

FACTORS_FILE = "factors.safetensors"
BASE_FILE = "base.safetensors"
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
OWN_FILES = (MANIFEST, DIGEST, MARKER, HASHES)  # not part of ``files``; never copied from a source folder
__all__ = ["ArtifactError", "FORMAT", "FORMAT_VERSION"]


@dataclass
class LayerFactors:
    factors: Factorization
    bias: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # manifest entry (losses, status, time ...)


@dataclass
class Artifact:
    path: Path
    manifest: dict
    layers: dict[str, LayerFactors]
    base: dict[str, torch.Tensor]

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Fused groups: fused fqn -> member fqns in stacking order (empty for unfused and v1/v2 artifacts)."""
        return {g: tuple(r["members"]) for g, r in self.manifest.get("groups", {}).items()}


def layer_tensors(name: str, lf: LayerFactors) -> dict[str, torch.Tensor]:
    values, meta = pack_24(lf.factors.S)
    out = {f"{name}.S_values": values, f"{name}.S_meta": meta}
    if lf.factors.A_blocks is not None:
        out[f"{name}.A_blocks"] = lf.factors.A_blocks
    if lf.factors.B_blocks is not None:
        out[f"{name}.B_blocks"] = lf.factors.B_blocks
    if lf.bias is not None:
        out[f"{name}.bias"] = lf.bias
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


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


def save_artifact(out: Path, *, layers: dict[str, LayerFactors], base: dict[str, torch.Tensor],
                  source_dir: Path, manifest: dict, overwrite: bool = False) -> Path:
    """Write an artifact atomically; ``manifest`` is extended with format, layers and file hashes.

    ``base`` must not hold tensors of a pruned linear (they live in the factors file); such a
    tensor is refused here, before anything is written, instead of making the artifact unloadable."""
    owned = tuple(f"{n}." for n in layers)
    stray = sorted(k for k in base if k.startswith(owned))
    if stray:
        raise ArtifactError(f"{out}: base tensors {stray[:5]} belong to pruned linears; the base file holds "
                            "only tensors no pruned linear owns (this is a bug in the caller, not in the model)")
    tensors: dict[str, torch.Tensor] = {}
    for name, lf in layers.items():
        tensors.update(layer_tensors(name, lf))
    man = dict(manifest)
    man["format"], man["format_version"] = FORMAT, FORMAT_VERSION
    man["layers"] = {
        name: {**lf.info, "shape": list(lf.factors.S.shape), "block_size": lf.factors.block_size,
               "has_bias": lf.bias is not None}
        for name, lf in layers.items()
    }
    with atomic_dir(out, overwrite=overwrite, kind="artifact", hash_files=False, inputs=(source_dir,)) as tmp:
        save_file(tensors, str(tmp / FACTORS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        save_file({k: v.detach().contiguous().cpu() for k, v in base.items()}, str(tmp / BASE_FILE))
        man["model_files"] = copy_model_files(source_dir, tmp)
        man["files"] = {f: sha256_file(tmp / f) for f in folder_files(tmp, OWN_FILES)}
        data = (json.dumps(man, indent=2, sort_keys=True) + "\n").encode()
        (tmp / MANIFEST).write_bytes(data)
        (tmp / DIGEST).write_text(digest_line(data))
    return Path(out)


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
    required = (FACTORS_FILE, BASE_FILE) + (tuple(man["model_files"]) if man["format_version"] >= 2 else ())
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


def _load_tensors(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise ArtifactError(f"{f}: missing (the artifact is incomplete)")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{f}: cannot be read as safetensors ({e})") from None


def load_artifact(path: Path, *, verify: bool = True) -> Artifact:
    """Read an artifact; ``verify`` (default) checks every file's sha256 first."""
    path = Path(path)
    man = read_manifest(path)
    if verify:
        check_files(path, man)
    tensors = _load_tensors(path / FACTORS_FILE)
    base = _load_tensors(path / BASE_FILE)
    layers = layers_from_tensors(tensors, man["layers"], str(path / FACTORS_FILE))
    check_shared_b(layers, man.get("groups", {}), str(path / FACTORS_FILE))
    return Artifact(path, man, layers, base)


def check_shared_b(layers: dict[str, LayerFactors], groups: dict, where: str) -> None:
    """The members of every fused group hold one and the same B (they were solved as one stacked layer)."""
    from solver.fused import shares_input_factor

    for g, rec in groups.items():
        if not shares_input_factor([layers[m].factors for m in rec["members"]]):
            raise ArtifactError(f"{where}: the members of fused group {g} ({', '.join(rec['members'])}) do not hold "
                                f"the same B_blocks and block size; the artifact is inconsistent: re-create it")


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
