"""Per-layer checkpoints of a solve, so a killed run resumes where it stopped.

The store is the sibling folder ``<out>.partial/`` of the artifact ``<out>``:
  run.json                  {"key": <hash of the run settings>, "settings": {...}}
  <fqn>.safetensors         S (dense, 2:4), A_blocks, B_blocks, bias of one finished layer
  <fqn>.json                the layer's manifest entry plus the sha256 of its .safetensors
Each file is written to a temporary name and renamed into place; the .json is written last, so a
layer counts as finished only when its .json exists and the tensor file's hash matches it. A kill at
any moment leaves at worst a temporary file, removed on the next open.

The key hashes everything that changes a layer's result (model files, solver options, calibration
tokens and options, targets). A store whose key differs is emptied before use: stale layers are
never reused. Ranks of a distributed run share the store (it must be on a shared filesystem); rank
0 assembles the artifact from it and then deletes it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from armor_export.artifact import WEIGHT_SUFFIXES, LayerFactors
from armor_export.fsutil import MARKER, OutputError, atomic_write_file, read_marker, remove_tree, sha256_file, \
    write_marker
from solver.factors import Factorization

STORE_VERSION = 1
SUFFIX = ".partial"
RUN_FILE = "run.json"
TMP = ".tmp-"


def store_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}{SUFFIX}"


def model_fingerprint(folder: Path) -> dict:
    """Cheap identity of a model folder: config.json's hash and every weight file's size and mtime."""
    folder = Path(folder)
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir())
             if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}
    return {"config_sha256": sha256_file(folder / "config.json"), "weights": files}


def settings_key(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _write_atomic(path: Path, write) -> None:
    atomic_write_file(path, write)


def _write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


class CheckpointError(RuntimeError):
    """A checkpointed layer that cannot be reused (corrupt, truncated, or from another run)."""


class LayerStore:
    """Finished layers of one run (see the module docstring). Cheap to construct; ``prepare`` first."""

    def __init__(self, out: Path, settings: dict):
        self.root = store_dir(out)
        self.settings = settings
        self.key = settings_key(settings)

    def prepare(self, *, reuse: bool = True) -> list[str]:
        """Create the store for this run (single writer: rank 0). Returns notes on what was discarded."""
        notes = []
        if self.root.exists() and read_marker(self.root) is None and self._read_run() is None \
                and (not self.root.is_dir() or any(self.root.iterdir())):
            raise OutputError(f"{self.root} exists but is not an armor-export checkpoint store (no {MARKER}); "
                              f"armor-export keeps its resume checkpoints there: move it away, or pass --no-resume "
                              f"and another --out")
        if self.root.exists():
            run = self._read_run()
            if run is None or run.get("key") != self.key or not reuse:
                why = "--no-resume" if not reuse else "the run settings changed"
                notes.append(f"discarded {len(self.done())} checkpointed layer(s) in {self.root} ({why})")
                shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if read_marker(self.root) is None:
            write_marker(self.root, "resume-store")
        for stale in [*self.root.glob(f"{TMP}*"), *self.root.glob(".*.armor-tmp-*")]:
            stale.unlink(missing_ok=True)
        if self._read_run() is None:
            _write_json(self.root / RUN_FILE, {"store_version": STORE_VERSION, "key": self.key,
                                               "settings": self.settings})
        notes += self.drop_bad()
        return notes

    def drop_bad(self) -> list[str]:
        """Verify every checkpoint (record, hash, tensors); remove the bad ones so that only those layers
        are solved again. Returns one note per removed layer."""
        notes = []
        for name in sorted(self.done()):
            try:
                self.load(name)
            except CheckpointError as e:
                for suffix in (".json", ".safetensors"):
                    (self.root / f"{name}{suffix}").unlink(missing_ok=True)
                notes.append(f"{e}; solving layer {name} again")
        return notes

    def discard_if_empty(self) -> None:
        """After a failed run: remove the store when it holds no finished layer (nothing to resume)."""
        if self.root.is_dir() and not self.done() and read_marker(self.root) is not None:
            remove_tree(self.root)

    def _read_run(self) -> dict | None:
        try:
            return json.loads((self.root / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def check(self) -> None:
        """Fail when the store on disk belongs to another run (another process reset it)."""
        run = self._read_run()
        if run is None or run.get("key") != self.key:
            raise RuntimeError(f"{self.root}: checkpoint store missing or belongs to another run; "
                               f"was the same output used by two runs at once?")

    def done(self) -> set[str]:
        names = set()
        for p in self.root.glob("*.json"):
            if p.name not in (RUN_FILE, MARKER) and not p.name.startswith((TMP, ".")) \
                    and p.with_suffix(".safetensors").is_file():
                names.add(p.name[:-len(".json")])
        return names

    def save(self, name: str, lf: LayerFactors) -> None:
        f = lf.factors
        tensors = {"S": f.S, "A_blocks": f.A_blocks, "B_blocks": f.B_blocks, "bias": lf.bias}
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if v is not None}
        tfile = self.root / f"{name}.safetensors"
        _write_atomic(tfile, lambda p: save_file(tensors, str(p)))
        _write_json(self.root / f"{name}.json", {"name": name, "key": self.key, "info": lf.info,
                                                 "sha256": sha256_file(tfile)})

    def load(self, name: str) -> LayerFactors:
        jfile, tfile = self.root / f"{name}.json", self.root / f"{name}.safetensors"
        try:
            entry = json.loads(jfile.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jfile}: unreadable checkpoint record ({e})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("info"), dict):
            raise CheckpointError(f"{jfile}: checkpoint record is malformed")
        try:
            ok = entry.get("key") == self.key and sha256_file(tfile) == entry.get("sha256")
        except OSError as e:
            raise CheckpointError(f"{tfile}: cannot be read ({e})") from None
        if not ok:
            raise CheckpointError(f"{tfile}: checkpoint does not match its record (corrupt or from another run)")
        try:
            t: dict[str, torch.Tensor] = load_file(str(tfile))
            S = t["S"]
        except (SafetensorError, OSError, KeyError) as e:
            raise CheckpointError(f"{tfile}: cannot be read ({e})") from None
        return LayerFactors(Factorization(S, t.get("A_blocks"), t.get("B_blocks")), t.get("bias"), entry["info"])

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
