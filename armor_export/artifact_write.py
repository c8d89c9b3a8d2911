"""The write side of the factor artifact (layout: armor_export.artifact): one shard from solved layers, and
the atomic assembly of shards, base tensors, model files, index and manifest into the artifact folder.

The shards are written as the solver finishes chunks of layers (``write_shard``, called by the resume store)
and linked into the artifact at the end (``finish_artifact``), so the factors are never assembled in memory.
What the manifest says beyond the format's own fields (provenance) is decided by the writer stage,
armor_export.writer.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from armor_export.artifact import (BASE_FILE, DIGEST, FACTORS_INDEX, FORMAT, FORMAT_VERSION, MANIFEST, OWN_FILES,
                                   ArtifactError, LayerFactors, copy_model_files, shard_name, tensor_keys)
from armor_export.fsutil import atomic_dir
from armor_export.hashes import folder_files, sha256_file
from armor_export.manifest import digest_line
from solver.sparsity import pack_24


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


def layer_entry(lf: LayerFactors) -> dict:
    """The layer's manifest entry: the solver's facts plus what the readers decode the tensors with."""
    return {**lf.info, "shape": list(lf.factors.S.shape), "block_size": lf.factors.block_size,
            "has_bias": lf.bias is not None}


def write_shard(path: Path, layers: Mapping[str, LayerFactors]) -> dict[str, dict]:
    """Write one shard (the packed factors of ``layers``) to ``path``; return the layers' manifest entries."""
    tensors: dict[str, torch.Tensor] = {}
    for name, lf in layers.items():
        tensors.update(layer_tensors(name, lf))
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    return {name: layer_entry(lf) for name, lf in layers.items()}


def _place(src: Path, dest: Path) -> None:
    """A finished shard into the artifact: a hard link (the store keeps its copy until the artifact is
    renamed into place; no bytes are copied), or a rename where links are not possible."""
    try:
        os.link(src, dest)
    except OSError:
        os.replace(src, dest)


def save_artifact(out: Path, *, layers: Mapping[str, LayerFactors], base: Mapping[str, torch.Tensor],
                  source_dir: Path, manifest: dict, overwrite: bool = False) -> Path:
    """Write an artifact from layers in memory (one shard); see ``finish_artifact``."""
    return finish_artifact(out, [layers], base=base, source_dir=source_dir, manifest=manifest, overwrite=overwrite)


def finish_artifact(out: Path, shards: list, *, base: Mapping[str, torch.Tensor], source_dir: Path,
                    manifest: dict, overwrite: bool = False) -> Path:
    """Write an artifact atomically; ``manifest`` is extended with format, layers, index and file hashes.

    ``shards``: in order, each either ``(path, entries)`` of a shard already written (``write_shard``, e.g. a
    resume-store chunk: linked in, never loaded) or a mapping of layers to write as one shard here.
    ``base`` must not hold tensors of a pruned linear (they live in the shards); such a tensor is refused
    here, before anything is written, instead of making the artifact unloadable."""
    names = [n for s in shards for n in (s[1] if isinstance(s, tuple) else s)]
    owned = tuple(f"{n}." for n in names)
    stray = sorted(k for k in base if k.startswith(owned))
    if stray:
        raise ArtifactError(f"{out}: base tensors {stray[:5]} belong to pruned linears; the base file holds "
                            "only tensors no pruned linear owns (this is a bug in the caller, not in the model)")
    if len(set(names)) != len(names):
        raise ArtifactError(f"{out}: a layer is in two shards (this is a bug in the caller)")
    man = dict(manifest)
    man["format"], man["format_version"] = FORMAT, FORMAT_VERSION
    man["layers"], weight_map = {}, {}
    with atomic_dir(out, overwrite=overwrite, kind="artifact", hash_files=False, inputs=(source_dir,)) as tmp:
        for i, shard in enumerate(shards, 1):
            dest = tmp / shard_name(i, len(shards))
            if isinstance(shard, tuple):
                _place(Path(shard[0]), dest)
                entries = shard[1]
            else:
                entries = write_shard(dest, shard)
            man["layers"].update(entries)
            weight_map.update({k: dest.name for k in tensor_keys(dest)})
        index = {"metadata": {"format": FORMAT, "format_version": FORMAT_VERSION}, "weight_map": weight_map}
        (tmp / FACTORS_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in base.items()}, str(tmp / BASE_FILE))
        man["model_files"] = copy_model_files(source_dir, tmp)
        man["files"] = {f: sha256_file(tmp / f) for f in folder_files(tmp, OWN_FILES)}
        data = (json.dumps(man, indent=2, sort_keys=True) + "\n").encode()
        (tmp / MANIFEST).write_bytes(data)
        (tmp / DIGEST).write_text(digest_line(data))
    return Path(out)
