"""Resume and atomicity: per-layer checkpoints survive kill -9 and give the same artifact; stale
or foreign checkpoints are never reused; crash leftovers are cleaned; corrupt files are named."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from armor_export import calibrate, pipeline, source, writer
from armor_export.artifact import ArtifactError, LayerFactors, load_artifact
from armor_export.config import CalibConfig
from armor_export.fsutil import TMP_TAG
from armor_export.resume import RUN_FILE, LayerStore, store_dir
from solver.config import SolverConfig
from solver.factors import Factorization

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import cli_env, prune_args, same_artifact  # noqa: E402


def _layer(seed: int) -> LayerFactors:
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(8, 16, generator=g) * torch.tensor([1.0, 0, 1, 0]).repeat(4)
    A, B = torch.randn(1, 8, 8, generator=g), torch.randn(2, 8, 8, generator=g)
    return LayerFactors(Factorization(S, A, B), torch.randn(8, generator=g), {"loss_final": 0.1 + seed})


def test_store_roundtrip_and_key_change_discards(tmp_path):
    out = tmp_path / "art"
    st = LayerStore(out, {"a": 1})
    assert st.prepare() == []
    lf = _layer(0)
    st.save("model.layers.0.mlp.up_proj", lf)
    back = LayerStore(out, {"a": 1}).load("model.layers.0.mlp.up_proj")
    for x, y in ((lf.factors.S, back.factors.S), (lf.factors.A_blocks, back.factors.A_blocks),
                 (lf.factors.B_blocks, back.factors.B_blocks), (lf.bias, back.bias)):
        assert torch.equal(x, y)
    assert back.info == lf.info
    same = LayerStore(out, {"a": 1})
    assert same.prepare() == [] and same.done() == {"model.layers.0.mlp.up_proj"}
    changed = LayerStore(out, {"a": 2})
    notes = changed.prepare()
    assert changed.done() == set() and "settings changed" in notes[0]
    with pytest.raises(RuntimeError, match="another run"):
        same.check()


def test_store_ignores_half_written_layers_and_detects_corruption(tmp_path):
    out = tmp_path / "art"
    st = LayerStore(out, {"a": 1})
    st.prepare()
    st.save("l0", _layer(0))
    # a kill between the tensor file and its record, and one in the middle of a write
    (st.root / "l1.safetensors").write_bytes(b"\0" * 10)
    (st.root / ".tmp-999-l2.safetensors").write_bytes(b"junk")
    st2 = LayerStore(out, {"a": 1})
    st2.prepare()
    assert st2.done() == {"l0"} and not list(st2.root.glob(".tmp-*"))
    data = bytearray((st.root / "l0.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (st.root / "l0.safetensors").write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"l0\.safetensors: checkpoint does not match"):
        st2.load("l0")


def test_resume_reuses_checkpoints_in_process(tiny_model_dir, tiny_text_dir, tmp_path):
    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=4, seqlen=32)
    cfg = SolverConfig(method="nowag")
    ref = pipeline.prune(str(tiny_model_dir), cfg, calib, tmp_path / "ref", progress=False, resume=False)
    assert not store_dir(ref).exists()
    # Pre-fill the store with two layers from the reference, as if an earlier run had been killed.
    out = tmp_path / "out"
    loaded = source.load(str(tiny_model_dir))
    names = json.loads((ref / "manifest.json").read_text())["targets"]
    tokens = calibrate.calibration_windows(loaded.tokenizer, calib)
    st = LayerStore(out, writer.run_settings(loaded, names, cfg, calib, tokens))
    st.prepare()
    art = load_artifact(ref)
    for n in names[:2]:
        st.save(n, art.layers[n])
    res = pipeline.prune(str(tiny_model_dir), cfg, calib, out, progress=False, loaded=loaded)
    assert json.loads((res / "manifest.json").read_text())["execution"]["resumed_layers"] == 2
    same_artifact(ref, res)
    assert not store_dir(out).exists()


def test_kill_9_then_rerun_gives_identical_artifact(tiny_model_dir, tiny_text_dir, tmp_path):
    from armor_export.cli import main

    text = tiny_text_dir / "calib"
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = prune_args(tiny_model_dir, text, out, iterations=10)
    proc = subprocess.Popen([sys.executable, "-m", "armor_export", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = store_dir(out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name != RUN_FILE for p in store.glob("*.json")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run left output under the final name"
    n_done = len(LayerStore(out, {}).done())
    assert n_done >= 1
    assert main(args) == 0  # the same command resumes
    man = json.loads((out / "manifest.json").read_text())
    assert man["execution"]["resumed_layers"] >= 1
    assert main(prune_args(tiny_model_dir, text, ref, iterations=10) + ["--no-resume"]) == 0
    same_artifact(ref, out)


def test_crash_leftover_of_artifact_is_cleaned(tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    leftover = tmp_path / f".art{TMP_TAG}12345"
    leftover.mkdir()
    (leftover / "factors.safetensors").write_bytes(b"half")
    pipeline.prune(str(tiny_model_dir), SolverConfig(method="magnitude"), CalibConfig(), out, progress=False)
    assert not leftover.exists() and (out / "manifest.json").is_file()
    load_artifact(out)


def test_directory_without_manifest_is_refused_with_clear_message(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "factors.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="manifest.json not found"):
        load_artifact(tmp_path / "half")
