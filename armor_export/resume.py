"""Per-layer checkpoints of a solve, so a killed run resumes where it stopped.

The store is the sibling folder ``<out>.partial/`` of the artifact ``<out>``:
  run.json                  {"store_version", "key": <hash of the run settings>, "settings": {...}}
  <fqn>.safetensors         one finished chunk of layers (``<fqn>`` its first layer), already in the
                            artifact's shard format (``artifact_write.write_shard``: packed S, A, B, bias)
  <fqn>.json                the chunk's record: its layers, their manifest entries and solver facts,
                            and the sha256 of its .safetensors
Each file is written to a temporary name and renamed into place; the .json is written last, so a
chunk counts as finished only when its .json exists and the tensor file's hash matches it. A kill at
any moment leaves at worst a temporary file, removed on the next open. The chunk files become the
artifact's shards (``artifact_write.finish_artifact`` links them in): the factors are never assembled in
memory and never copied.

The key hashes everything that changes a layer's result (model files, solver options, calibration
tokens and options, targets). A store whose key (or store version) differs is emptied before use:
stale layers are never reused. Ranks of a distributed run share the store (it must be on a shared
filesystem); rank 0 turns it into the artifact and then deletes it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from armor_export.artifact import WEIGHT_SUFFIXES, ArtifactError, LayerFactors, LazyLayers, tensor_keys
from armor_export.artifact_write import write_shard
from armor_export.fsutil import OutputError, atomic_write_file, read_marker, remove_tree, write_marker
from armor_export.hashes import MARKER, sha256_file

STORE_VERSION = 2  # 1: one dense-S file per layer
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
            if run is None or run.get("key") != self.key or run.get("store_version") != STORE_VERSION or not reuse:
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
        for first in sorted(self._records()):
            try:
                self._verified(first)
            except CheckpointError as e:
                try:
                    layers = ", ".join(self._record(first)["layers"])
                except CheckpointError:
                    layers = f"{first} and the rest of its chunk"
                for suffix in (".json", ".safetensors"):
                    (self.root / f"{first}{suffix}").unlink(missing_ok=True)
                notes.append(f"{e}; solving layer(s) {layers} again")
        self._index = None
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

    def _records(self) -> list[str]:
        """The chunks on disk: the first-layer names of every record with its tensor file."""
        firsts = []
        for p in self.root.glob("*.json"):
            if p.name not in (RUN_FILE, MARKER) and not p.name.startswith((TMP, ".")) \
                    and p.with_suffix(".safetensors").is_file():
                firsts.append(p.name[:-len(".json")])
        return sorted(firsts)

    def _record(self, first: str) -> dict:
        jfile = self.root / f"{first}.json"
        try:
            rec = json.loads(jfile.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jfile}: unreadable checkpoint record ({e})") from None
        if not (isinstance(rec, dict) and isinstance(rec.get("layers"), dict) and isinstance(rec.get("info"), dict)
                and set(rec["layers"]) == set(rec["info"]) and first in rec["layers"]):
            raise CheckpointError(f"{jfile}: checkpoint record is malformed")
        return rec

    def _verified(self, first: str) -> dict:
        """The chunk's record after checking its key, its tensor file's hash and its tensor names."""
        rec, tfile = self._record(first), self.root / f"{first}.safetensors"
        try:
            ok = rec.get("key") == self.key and sha256_file(tfile) == rec.get("sha256")
        except OSError as e:
            raise CheckpointError(f"{tfile}: cannot be read ({e})") from None
        if not ok:
            raise CheckpointError(f"{tfile}: checkpoint does not match its record (corrupt or from another run)")
        try:
            LazyLayers(self.root, rec["layers"], dict.fromkeys(tensor_keys(tfile), tfile.name))
        except ArtifactError as e:
            raise CheckpointError(f"{tfile}: cannot be read ({e})") from None
        return rec

    def index(self) -> dict[str, str]:
        """``{layer: first layer of its chunk}`` for every finished layer."""
        if getattr(self, "_index", None) is None:
            idx = {}
            for first in self._records():
                try:
                    idx.update(dict.fromkeys(self._record(first)["layers"], first))
                except CheckpointError:
                    continue
            self._index = idx
        return self._index

    def done(self) -> set[str]:
        self._index = None
        return set(self.index())

    def save_chunk(self, layers: dict[str, LayerFactors]) -> None:
        """Checkpoint one solved chunk as a shard of the artifact (``artifact_write.write_shard``)."""
        first = next(iter(layers))
        tfile = self.root / f"{first}.safetensors"
        entries = {}
        _write_atomic(tfile, lambda p: entries.update(write_shard(p, layers)))
        _write_json(self.root / f"{first}.json", {"first": first, "key": self.key, "layers": entries,
                                                  "info": {n: lf.info for n, lf in layers.items()},
                                                  "sha256": sha256_file(tfile)})
        self._index = None

    def save(self, name: str, lf: LayerFactors) -> None:
        self.save_chunk({name: lf})

    def load(self, name: str) -> LayerFactors:
        """One finished layer (its chunk verified first), with the solver's facts as ``info``."""
        first = self.index().get(name)
        if first is None:
            raise CheckpointError(f"{self.root}: layer {name} has no checkpoint")
        rec, tfile = self._verified(first), self.root / f"{first}.safetensors"
        try:
            lf = LazyLayers(self.root, rec["layers"], dict.fromkeys(tensor_keys(tfile), tfile.name))[name]
        except ArtifactError as e:
            raise CheckpointError(f"{tfile}: cannot be read ({e})") from None
        return LayerFactors(lf.factors, lf.bias, rec["info"][name])

    def shards(self, names: list[str]) -> list[tuple[Path, dict]]:
        """The chunks holding ``names``, in the order of their first layer in ``names``, as
        ``artifact_write.finish_artifact`` takes them (verified; every layer must be finished)."""
        idx, order = self.index(), {}
        missing = [n for n in names if n not in idx]
        if missing:
            raise RuntimeError(f"{self.root}: layer {missing[0]} was not solved ({len(missing)} missing); "
                               f"a rank failed or another run changed the store")
        for n in names:
            order.setdefault(idx[n], None)
        out = []
        for first in order:
            rec = self._verified(first)
            out.append((self.root / f"{first}.safetensors", rec["layers"]))
        return out

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
