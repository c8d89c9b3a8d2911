"""Byte identity of prune artifacts across refactors of the pipeline's stages.

For a tiny model, four prunes (whole model, layer by layer, resumed from a half-filled store, fused
groups; plus sequential calibration) are reduced to a fingerprint: the sha256 of every tensor file
(each factor shard, the index, base.safetensors; see ``_sha`` for the one exception) and of the manifest without what legitimately differs
between two runs (timestamps, timings, temporary folders). The fingerprints are pinned in
``data/artifact_pins.json``, recorded with the code before the stages were split (commit b7c5069):
a change of any byte of the factors, of the sharding or of a manifest field fails here.

The digests depend on the torch build and CPU kernels of the project's venv (the solver is deterministic
per machine, not across BLAS builds). After a deliberate change of the solver or of the format, rewrite
the pins with ``ARMOR_WRITE_PINS=1 python -m pytest tests/armor_export/test_artifact_pins.py`` and say
so in the commit.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from armor_export import calibrate, pipeline, source, writer
from armor_export.artifact import load_artifact
from armor_export.config import CalibConfig
from armor_export.resume import LayerStore
from solver.config import SolverConfig

PINS = Path(__file__).parent / "data" / "artifact_pins.json"
VOLATILE_TOP = ("created_unix", "timing_seconds")


def _sha(p: Path) -> str:
    """sha256 of a file; of a safetensors file, of its header with sorted keys and its data: safetensors
    writes the ``__metadata__`` object in a per-process hash order, so two runs' shard files can differ in
    the order of the two metadata keys only (the tensors and their layout are byte-identical)."""
    raw = p.read_bytes()
    if p.suffix != ".safetensors":
        return hashlib.sha256(raw).hexdigest()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode()
    return hashlib.sha256(header + b"\0" + raw[8 + n:]).hexdigest()


def fingerprint(art: Path) -> dict:
    """``{tensor file: sha256}`` plus the sha256 of the manifest minus timestamps, timings and folder."""
    load_artifact(art)  # the integrity chain holds (every file's sha256, the manifest's digest)
    man = json.loads((art / "manifest.json").read_text())
    for k in VOLATILE_TOP:
        man.pop(k, None)
    man["source"].pop("folder", None)
    if man.get("calibration"):
        man["calibration"]["config"]["text"] = "<calib text folder>"  # a temporary path
    for entry in man["layers"].values():
        entry.pop("seconds", None)
        for k in [k for k in entry.get("notes", {}) if k.endswith("seconds")]:
            entry["notes"].pop(k)
    man["files"] = {f: _sha(art / f) for f in man["files"]}
    files = {f: d for f, d in man["files"].items() if f.endswith((".safetensors", ".index.json"))}
    return {"files": files, "manifest": man, "n_shards": len(files) - 2}


def _calib(text_dir: Path, **kw) -> CalibConfig:
    return CalibConfig(text=str(text_dir / "calib"), samples=4, seqlen=32, **kw)


ARMOR = SolverConfig(method="armor", block_size=8, iterations=6, sparse_rounds=1)


def _whole(model, text, out):
    return pipeline.prune(str(model), ARMOR, _calib(text), out, progress=False)


def _layerwise(model, text, out):
    return pipeline.prune(str(model), SolverConfig(method="nowag"), _calib(text), out, progress=False,
                          layerwise=True)


def _fused(model, text, out):
    return pipeline.prune(str(model), ARMOR, _calib(text), out, progress=False, fuse=("qkv", "gate_up"))


def _sequential(model, text, out):
    return pipeline.prune(str(model), ARMOR, _calib(text, mode="sequential"), out, progress=False)


def _resumed(model, text, out):
    """Two layers of a reference run checkpointed in the store, the rest solved on resume."""
    ref = pipeline.prune(str(model), ARMOR, _calib(text), out.parent / f"{out.name}-ref", progress=False,
                         resume=False)
    loaded = source.load(str(model))
    names = json.loads((ref / "manifest.json").read_text())["targets"]
    tokens = calibrate.calibration_windows(loaded.tokenizer, _calib(text))
    store = LayerStore(out, writer.run_settings(loaded, names, ARMOR, _calib(text), tokens))
    store.prepare()
    art = load_artifact(ref)
    for n in (names[0], names[5]):
        store.save(n, art.layers[n])
    return pipeline.prune(str(model), ARMOR, _calib(text), out, progress=False, loaded=loaded)


CASES = {"whole": _whole, "layerwise": _layerwise, "fused": _fused, "sequential": _sequential,
         "resumed": _resumed}


def environment() -> dict:
    """What the digests depend on besides our code: the torch build and the CPU kernels it dispatches to (an
    AVX2 and an AVX-512 machine reduce in different orders), and the libraries that write the files."""
    import safetensors
    import transformers

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "safetensors": safetensors.__version__, "transformers": transformers.__version__}


@pytest.mark.parametrize("case", sorted(CASES))
def test_artifact_bytes_are_pinned(case, tiny_model_dir, tiny_text_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pins were recorded single-threaded (reduction order)
    try:
        got = fingerprint(CASES[case](tiny_model_dir, tiny_text_dir, tmp_path / case))
    finally:
        torch.set_num_threads(threads)
    pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
    if os.environ.get("ARMOR_WRITE_PINS") == "1":
        pins[case] = got
        pins["environment"] = environment()
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    assert case in pins, f"no pin for {case}: run with ARMOR_WRITE_PINS=1 once"
    if pins.get("environment") != environment():
        pytest.skip(f"pins recorded with {pins.get('environment')}, this machine has {environment()}: the digests are "
                    "comparable only there (the refactor proof); re-record with ARMOR_WRITE_PINS=1 on purpose")
    assert got == pins[case]
