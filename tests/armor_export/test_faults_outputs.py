"""Fault injection on the output side (issue 16): every case exits 2 with one line naming the culprit, prints no
traceback, and leaves no partial output and no damaged input. The integrity chain's cases are in
test_faults_integrity.py.

Tiny random model, method magnitude (no calibration) unless a case needs statistics, so the file
runs in a few seconds. Filesystem faults use real mounts (a full / read-only tmpfs) where the test
runs as root, and a monkeypatched write (ENOSPC) everywhere."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from armor_export.cli import main
from armor_export.fsutil import TMP_TAG, lock_path
from armor_export.hashes import MARKER
from armor_export import writer
from tests.armor_export.fault_helpers import (  # noqa: F401 (art is a fixture)
    art, assert_clear, copy_art, flip_byte, leftovers, prune_args, run_cli, tree_digest)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- owned outputs and --overwrite

def test_overwrite_refuses_a_foreign_folder(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out, "--overwrite"))
    assert_clear(rc, err, out, "not written by armor-export")
    assert (out / "thesis.tex").read_text() == "years of work" and leftovers(tmp_path) == []


def test_overwrite_never_replaces_an_input(capsys, tiny_model_dir, tiny_text_dir, tmp_path, art):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    before = tree_digest(model)
    rc, err = run_cli(capsys, *prune_args(model, model, "--overwrite"))
    assert_clear(rc, err, model, "input")
    text = shutil.copytree(tiny_text_dir / "calib", tmp_path / "texts" / "calib")
    rc, err = run_cli(capsys, *prune_args(model, tmp_path / "texts", "--overwrite", "--calib-text", text,
                                          method="nowag"))
    assert_clear(rc, err, "input")  # --out would contain the calibration text
    a = copy_art(art, tmp_path / "a")
    rc, err = run_cli(capsys, "export", "--artifact", a, "--engine", "trtllm", "--out", a, "--overwrite")
    assert_clear(rc, err, "input")
    assert tree_digest(model) == before and text.is_dir() and (a / "manifest.json").is_file()


def test_overwrite_of_own_artifact_leaves_no_temporaries(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    assert main(prune_args(tiny_model_dir, out)) == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "artifact"
    assert main(prune_args(tiny_model_dir, out, "--overwrite", "--seed", "1")) == 0
    assert leftovers(tmp_path) == [] and (out / "manifest.json").is_file()
    (out / MARKER).unlink()  # an artifact written before markers existed is armor-export's too
    assert main(prune_args(tiny_model_dir, out, "--overwrite")) == 0 and (out / MARKER).is_file()


def test_out_that_is_a_file_or_under_a_file(capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, f, "--overwrite"))
    assert_clear(rc, err, f, "is a file")
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, f / "sub" / "art"))
    assert_clear(rc, err, f, "is a file")
    assert f.read_text() == "keep" and leftovers(tmp_path) == []


# ---------------------------------------------------------------- locks

def test_concurrent_run_into_the_same_out_fails_at_once(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from armor_export.fsutil import output_lock
            with output_lock({str(out)!r}):
                print("locked", flush=True)
                time.sleep(60)
            """)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out))
        assert_clear(rc, err, out, f"pid {holder.pid}", "another armor-export run")
        assert time.monotonic() - t0 < 10, "the second run must fail at once, before loading anything"
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file is stale and taken over
    assert lock_path(out).exists()
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out))
    assert rc == 0 and "stale lock" in err and str(holder.pid) in err
    assert leftovers(tmp_path) == []


def test_stale_lock_of_a_dead_process_is_taken_over(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(out).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out))
    assert rc == 0 and "stale lock" in err and "no longer running" in err
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- OS errors

@pytest.fixture
def mount(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs folder; skipped where mounting is not allowed."""
    points = []

    def make(size: str, ro: bool = False) -> Path:
        d = tmp_path / f"mnt{len(points)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
        points.append(d)
        return d

    yield make
    for d in points:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_full_disk_real_tmpfs(capsys, tiny_model_dir, mount):
    disk = mount("96k")
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, disk / "art", "--no-resume"))
    assert_clear(rc, err, disk / "art", "No space left on device")
    assert list(disk.iterdir()) == []


def test_full_disk_monkeypatched_write(capsys, tiny_model_dir, tmp_path, monkeypatch):
    import armor_export.artifact_write as artifact_write

    real = artifact_write.save_file

    def half_then_enospc(tensors, path, metadata=None):
        if path.endswith("base.safetensors"):
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(artifact_write, "save_file", half_then_enospc)
    out = tmp_path / "deep" / "art"
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out, "--no-resume"))
    assert_clear(rc, err, out, "No space left on device", "free space")
    assert list(tmp_path.iterdir()) == [], "no output, temporary, lock, store or created parent may remain"
    # with checkpoints (the default) the finished layers stay for the rerun, and the message says so
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out))
    assert_clear(rc, err, out, "No space left on device", "rerun the same command to resume")
    assert sorted(p.name for p in out.parent.iterdir()) == ["art.partial"]
    monkeypatch.setattr(artifact_write, "save_file", real)
    assert main(prune_args(tiny_model_dir, out)) == 0 and leftovers(out.parent) == []


def test_read_only_out(capsys, tiny_model_dir, mount):
    ro = mount("1m", ro=True)
    t0 = time.monotonic()
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, ro / "art", "--no-resume", method="nowag"))
    assert_clear(rc, err, ro, "read-only")
    assert time.monotonic() - t0 < 10, "a read-only --out must fail before the solve"


# ---------------------------------------------------------------- early failures leave nothing

def test_early_failure_leaves_nothing(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "new" / "art"
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out, "--calib-text", tmp_path / "missing.txt",
                                          method="nowag"))
    assert rc == 2 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "no --out, no empty .partial/, no lock, no created parent"


def test_one_shot_run_early_failure_then_resume_without_overwrite(capsys, tiny_model_dir, tiny_text_dir, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "run"
    base = ["--model", tiny_model_dir, "--method", "magnitude", "--eval-text", tiny_text_dir / "eval",
            "--eval-windows", "2", "--eval-seqlen", "32", "--out", out]
    rc, err = run_cli(capsys, *base, "--eval-seqlen", "0")
    assert rc == 2 and "Traceback" not in err and not out.exists(), "a failed one-shot run must not leave --out"
    # a crash while writing the artifact, after every layer was checkpointed
    import armor_export.artifact_write as artifact_write

    real = artifact_write.save_file

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def base_fails(tensors, path, *a, **k):  # the checkpointed chunks are written, the base file is not
        return enospc() if str(path).endswith("base.safetensors") else real(tensors, path, *a, **k)

    monkeypatch.setattr(artifact_write, "save_file", base_fails)
    rc, err = run_cli(capsys, *base)
    assert_clear(rc, err, "No space left")
    assert json.loads((out / MARKER).read_text())["complete"] is False and (out / "artifact.partial").is_dir()
    monkeypatch.setattr(artifact_write, "save_file", real)
    rc, err = run_cli(capsys, *base)  # the same command, no --overwrite: resumes the incomplete run
    assert rc == 0, err
    assert json.loads((out / MARKER).read_text())["complete"] is True
    assert json.loads((out / "artifact" / "manifest.json").read_text())["execution"]["resumed_layers"] == 14
    rc, err = run_cli(capsys, *base)  # a complete run folder needs --overwrite
    assert_clear(rc, err, "--overwrite")
    assert leftovers(tmp_path) == [] and leftovers(out) == []


# ---------------------------------------------------------------- kill -9 and resume checkpoints

def test_kill_9_during_the_solve_then_resume(capsys, tiny_model_dir, tiny_text_dir, tmp_path, monkeypatch):
    """A forked child SIGKILLs itself after its third checkpointed chunk of layers; the rerun resumes and
    gives the same factors as an uninterrupted run."""
    from armor_export.artifact import load_artifact
    from armor_export.resume import LayerStore

    calib = ["--calib-text", tiny_text_dir / "calib", "--calib-samples", "4", "--calib-seqlen", "32"]
    out = tmp_path / "art"
    real, saved = LayerStore.save_chunk, []

    def save_then_die(self, layers):
        real(self, layers)
        saved.append(list(layers))
        if len(saved) == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:
        try:
            import torch

            torch.set_num_threads(1)
            monkeypatch.setattr(LayerStore, "save_chunk", save_then_die)
            main(prune_args(tiny_model_dir, out, *calib, method="nowag"))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert not out.exists()
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out, *calib, method="nowag"))
    n_done = int(re.search(r"resuming: (\d+) of 14", err).group(1))
    assert rc == 0 and 3 <= n_done < 14, err
    ref = tmp_path / "ref"
    assert main(prune_args(tiny_model_dir, ref, *calib, "--no-resume", method="nowag")) == 0
    a, b = load_artifact(out), load_artifact(ref)
    for n, lf in b.layers.items():
        assert lf.factors.S.equal(a.layers[n].factors.S)
    assert leftovers(tmp_path) == []


def test_kill_9_during_the_artifact_write_then_resume(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """A forked child (modules already imported: fast) SIGKILLs itself half-way through base.safetensors."""
    import armor_export.artifact_write as artifact_write

    out = tmp_path / "art"
    real = artifact_write.save_file

    def killed(t, path, metadata=None):
        if path.endswith("base.safetensors"):
            Path(path).write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(t, path, metadata=metadata)

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            import torch

            torch.set_num_threads(1)
            monkeypatch.setattr(artifact_write, "save_file", killed)
            main(prune_args(tiny_model_dir, out))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert not out.exists() and any(TMP_TAG in p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    rc, err = run_cli(capsys, *prune_args(tiny_model_dir, out))
    assert rc == 0 and "stale lock" in err, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["execution"]["resumed_layers"] == len(man["targets"])
    assert leftovers(tmp_path) == []


def test_corrupt_resume_checkpoint_is_solved_again_alone(capsys, tiny_model_dir, tiny_text_dir, tmp_path,
                                                         monkeypatch):
    from armor_export.artifact import load_artifact

    calib = ["--calib-text", tiny_text_dir / "calib", "--calib-samples", "4", "--calib-seqlen", "32"]
    args = prune_args(tiny_model_dir, tmp_path / "art", *calib, method="nowag")
    real = writer.finish_artifact
    monkeypatch.setattr(writer, "finish_artifact", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main([str(x) for x in args]) == 130
    store = tmp_path / "art.partial"
    bad = "model.layers.1.self_attn.k_proj"
    chunk = next(json.loads(f.read_text()) for f in store.glob("model.*.json")
                 if bad in json.loads(f.read_text())["layers"])
    flip_byte(store / f"{chunk['first']}.safetensors", at=-5)
    monkeypatch.setattr(writer, "finish_artifact", real)
    capsys.readouterr()
    rc, err = run_cli(capsys, *args)
    assert rc == 0 and f"{chunk['first']}.safetensors" in err and bad in err and "again" in err, err
    man = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert man["execution"]["resumed_layers"] == len(man["targets"]) - len(chunk["layers"])
    ref = tmp_path / "ref"
    assert main([str(x) for x in prune_args(tiny_model_dir, ref, *calib, "--no-resume", method="nowag")]) == 0
    a, b = load_artifact(tmp_path / "art"), load_artifact(ref)
    assert all(a.layers[n].factors.S.equal(b.layers[n].factors.S) for n in man["targets"])
    assert leftovers(tmp_path) == []
