"""The versioned factor artifact: what solving produces and every engine reads.

Layout of an artifact directory (format ``armor-export/factors``, version 1):
  manifest.json          format, version, source model, method and solver options, calibration
                         provenance (sha256), per-layer shape / block size / losses / status / time,
                         sha256 of every tensor file, library versions
  factors.safetensors    per pruned linear ``{fqn}``:
                           {fqn}.S_values  [d_out, d_in/2]   kept values of S, group order
                           {fqn}.S_meta    uint8 [d_out, ceil(d_in/8)]  2-bit positions (solver.sparsity)
                           {fqn}.A_blocks  [d_out/b, b, b]   (absent = identity)
                           {fqn}.B_blocks  [d_in/b, b, b]    (absent = identity)
                           {fqn}.bias      [d_out]           (absent = no bias)
  base.safetensors       every other tensor of the model (embeddings, norms, untied lm_head)
  config.json, tokenizer and generation files copied from the source model folder
The normaliser is folded into A and B. No pickles anywhere; loading verifies format version and
file hashes and fails with the file's name on any mismatch.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from armor_export.fsutil import atomic_dir, sha256_file
from solver.factors import Factorization
from solver.sparsity import pack_24, unpack_24

FORMAT = "armor-export/factors"
FORMAT_VERSION = 1
FACTORS_FILE = "factors.safetensors"
BASE_FILE = "base.safetensors"
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


class ArtifactError(ValueError):
    """An artifact that cannot be read: wrong format or version, missing or corrupt file."""


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


def layers_from_tensors(tensors: dict[str, torch.Tensor], entries: dict[str, dict]) -> dict[str, LayerFactors]:
    layers = {}
    for name, info in entries.items():
        try:
            values, meta = tensors[f"{name}.S_values"], tensors[f"{name}.S_meta"]
        except KeyError as e:
            raise ArtifactError(f"{FACTORS_FILE}: missing tensor {e.args[0]!r} for layer {name}") from None
        S = unpack_24(values, meta, int(info["shape"][1]))
        f = Factorization(S, tensors.get(f"{name}.A_blocks"), tensors.get(f"{name}.B_blocks"))
        layers[name] = LayerFactors(f, tensors.get(f"{name}.bias"), info)
    return layers


def copy_model_files(source_dir: Path, dest: Path) -> list[str]:
    """Copy config, tokenizer and generation files (not weights) of an HF folder."""
    copied = []
    for p in sorted(Path(source_dir).iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith("."):
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
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / FACTORS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        save_file({k: v.detach().contiguous().cpu() for k, v in base.items()}, str(tmp / BASE_FILE))
        man["model_files"] = copy_model_files(source_dir, tmp)
        man["files"] = {f: sha256_file(tmp / f) for f in (FACTORS_FILE, BASE_FILE)}
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    return Path(out)


def read_manifest(path: Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not an armor-export artifact: {MANIFEST} not found")
    try:
        man = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf}: not valid JSON ({e})") from None
    if man.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: format {man.get('format')!r} is not {FORMAT!r}")
    version = man.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = "upgrade armor-export" if newer else "re-create the artifact with this version"
        raise ArtifactError(f"{mf}: format version {version} is not supported (this armor-export reads version "
                            f"{FORMAT_VERSION}); {hint}")
    return man


def _load_checked(path: Path, name: str, expected_sha: str | None) -> dict[str, torch.Tensor]:
    f = path / name
    if not f.is_file():
        raise ArtifactError(f"{f}: missing (the artifact is incomplete)")
    if expected_sha is not None and sha256_file(f) != expected_sha:
        raise ArtifactError(f"{f}: sha256 does not match the manifest; the file is corrupt or was modified")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{f}: cannot be read as safetensors ({e})") from None


def load_artifact(path: Path, *, verify: bool = True) -> Artifact:
    path = Path(path)
    man = read_manifest(path)
    files = man.get("files", {}) if verify else {}
    tensors = _load_checked(path, FACTORS_FILE, files.get(FACTORS_FILE))
    base = _load_checked(path, BASE_FILE, files.get(BASE_FILE))
    return Artifact(path, man, layers_from_tensors(tensors, man["layers"]), base)


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
