"""The streaming artifact writer: the last stage of a prune, and the owner of the manifest's provenance.

``ArtifactWriter`` wraps the resume store (armor_export.resume): solved chunks go there as they finish (they are
the artifact's shards), and ``finish`` links them into the artifact folder with the base tensors and the
manifest (armor_export.artifact_write), then removes the store. What the manifest records about how the
artifact was made is ``Provenance``; ``manifest_fields`` is the one place that maps it to manifest fields
(their types are checked on read by armor_export.manifest). ``run_settings`` is the store's key: everything
that changes a layer's result.
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from armor_export import __version__
from armor_export.artifact_write import finish_artifact
from armor_export.calibration import TokenWindows
from armor_export.config import CalibConfig, to_dict
from armor_export.fsutil import read_marker
from armor_export.models import model_id
from armor_export.resume import LayerStore, model_fingerprint
from armor_export.shard import DistContext
from armor_export.source import Loaded
from solver.config import SolverConfig


def library_versions() -> dict:
    import safetensors
    import transformers

    return {"armor_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def run_settings(loaded: Loaded, names: list[str], solver_cfg: SolverConfig, calib: CalibConfig,
                 tokens: TokenWindows | None, fuse: tuple[str, ...] = ()) -> dict:
    """Everything that changes a layer's result: the key of the resume store."""
    settings = {"armor_export": __version__, "model": model_fingerprint(loaded.folder), "targets": names,
                "solver": solver_cfg.to_dict(),
                "calibration": None if tokens is None else {"sha256": tokens.sha256, **to_dict(calib)}}
    if fuse:  # absent when unfused: the key of an unfused run is what it was before --fuse existed
        settings["fuse"] = list(fuse)
    return settings


def group_records(loaded: Loaded, groups: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    """The manifest's ``groups``: fused fqn -> members (stacking order) and their d_out (the split sizes)."""
    return {g: {"members": list(ms), "split": [loaded.d_out(m) for m in ms]} for g, ms in groups.items()}


@dataclass(frozen=True)
class Provenance:
    """How an artifact was made: source, settings, calibration, targets, timings and execution."""
    loaded: Loaded
    solver: SolverConfig
    calib: CalibConfig
    tokens: TokenWindows | None  # None: the method needs no calibration
    targets: list[str]
    ignore: tuple[str, ...]
    fuse: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    seconds: dict[str, float]  # calibration, solve, total
    world_size: int
    resumed_layers: int


def manifest_fields(p: Provenance) -> dict:
    """The manifest's provenance fields (the format's own fields, layers and files are artifact_write's)."""
    model, fam = p.loaded.model, p.loaded.family
    return {
        "created_unix": int(time.time()),
        "source": {"model_id": model_id(p.loaded.folder), "folder": str(p.loaded.folder),
                   "model_type": model.config.model_type, "family": fam.name},
        "method": p.solver.method,
        "solver_config": p.solver.to_dict(),
        "calibration": None if p.tokens is None else {**p.tokens.describe(), "mode": p.calib.mode,
                                                      "config": to_dict(p.calib)},
        "targets": p.targets,
        "ignore": list(p.ignore),
        "fuse": list(p.fuse),
        "groups": group_records(p.loaded, p.groups),
        "timing_seconds": {k: round(p.seconds[k], 2) for k in ("calibration", "solve", "total")},
        "execution": {"world_size": p.world_size, "layer_by_layer": p.loaded.lazy is not None,
                      "resumed_layers": p.resumed_layers},
        "library_versions": library_versions(),
    }


def log(msg: str, dist: DistContext) -> None:
    print(f"armor-export: [rank {dist.rank}/{dist.world}] {msg}" if dist.world > 1 else f"armor-export: {msg}",
          file=sys.stderr, flush=True)


class ArtifactWriter:
    """The artifact at ``out``, written as layers finish: ``open`` (every rank), ``store`` as the solve's sink,
    ``finish`` (rank 0). ``settings``: ``run_settings`` of this run (the store is reused only under the same)."""

    def __init__(self, out: Path, settings: dict):
        self.out = Path(out)
        self.store = LayerStore(self.out, settings)

    def open(self, *, resume: bool, dist: DistContext) -> set[str]:
        """Prepare the store (rank 0; ``resume=False`` empties it) and return the linears already finished in
        it, read by every rank before any rank writes a new one."""
        if dist.main:
            for note in self.store.prepare(reuse=resume):
                log(note, dist)
        dist.barrier()
        self.store.check()
        done = self.store.done()
        dist.barrier()  # every rank has read the same ``done`` before anyone writes a new layer
        return done

    def finish(self, provenance: Provenance, *, overwrite: bool = False) -> Path:
        """The artifact from the store's shards of every target, then the store is removed."""
        names, loaded = provenance.targets, provenance.loaded
        path = finish_artifact(self.out, self.store.shards(names), base=loaded.base_tensors(names),
                               source_dir=loaded.folder, manifest=manifest_fields(provenance), overwrite=overwrite)
        self.store.remove()
        return path

    @staticmethod
    def after_failure(out: Path, *, resume: bool, dist: DistContext) -> None:
        """Rank 0 after a failed run: a store that was only the staging area (``--no-resume``) or holds no
        finished layer is removed; otherwise the finished layers are kept for the rerun, and the log says so."""
        store = LayerStore(out, {})
        if not resume and read_marker(store.root) is not None:
            store.remove()
        store.discard_if_empty()
        if store.root.is_dir() and store.done():
            log(f"the {len(store.done())} finished layer(s) are kept in {store.root}; rerun the same command to "
                f"resume", dist)
