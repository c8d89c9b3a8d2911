"""Fault injection on the artifact's integrity chain and the engine folders' hashes (issue 16): every damaged or
edited file exits 2 with one line naming the file (and the layer), with no traceback.

A module-scoped tiny magnitude artifact (fault_helpers.art), copied and damaged per case."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from armor_export.cli import main
from armor_export.hashes import HASHES, MARKER
from armor_export.manifest import DIGEST, LAYER, TOP
from tests.armor_export.fault_helpers import (  # noqa: F401 (art is a fixture)
    art, assert_clear, copy_art, flip_byte, leftovers, rehash, rewrite_manifest, run_cli, to_version_2)


# ---------------------------------------------------------------- the artifact's integrity chain

WRONG = {str: 123, int: "x", bool: "yes", dict: [], list: {}}


def _wrong(types):
    ts = types if isinstance(types, tuple) else (types,)
    if dict in ts:
        return 5
    return next(WRONG[t] for t in (str, list, bool, int) if t in ts) if not set(ts) & {int, float} else "x"


@pytest.mark.parametrize("field", sorted(TOP))
def test_every_top_level_manifest_field_removed_or_retyped(capsys, art, tmp_path, field):
    types, required = TOP[field]
    a = copy_art(art, tmp_path / "a")
    rewrite_manifest(a, lambda m: m.pop(field))
    rc, err = run_cli(capsys, "report", "--artifact", a)
    if required:
        assert_clear(rc, err, f"'{field}'", "manifest.json")
    else:
        assert rc == 0 and "Traceback" not in err  # provenance only: the artifact stays readable
    b = copy_art(art, tmp_path / "b")
    rewrite_manifest(b, lambda m: m.__setitem__(field, _wrong(types)))
    rc, err = run_cli(capsys, "report", "--artifact", b)
    assert_clear(rc, err, "manifest.json", "format" if field in ("format",) else field)


@pytest.mark.parametrize("field", sorted(LAYER))
def test_every_layer_field_removed_or_retyped(capsys, art, tmp_path, field):
    types, required = LAYER[field]
    name = json.loads((art / "manifest.json").read_text())["targets"][0]
    a = copy_art(art, tmp_path / "a")
    rewrite_manifest(a, lambda m: m["layers"][name].pop(field, None))
    rc, err = run_cli(capsys, "report", "--artifact", a)
    if required:
        assert_clear(rc, err, f"layers.{name}.{field}", "manifest.json")
    else:
        assert rc == 0 and "Traceback" not in err
    b = copy_art(art, tmp_path / "b")
    rewrite_manifest(b, lambda m: m["layers"][name].__setitem__(field, _wrong(types)))
    rc, err = run_cli(capsys, "report", "--artifact", b)
    assert_clear(rc, err, f"layers.{name}.{field}", "manifest.json")


def test_schema_declares_every_field_the_pipeline_writes(art):
    man = json.loads((art / "manifest.json").read_text())
    assert set(man) <= set(TOP), f"declare new manifest fields in armor_export/manifest.py TOP: {set(man) - set(TOP)}"
    for entry in man["layers"].values():
        assert set(entry) <= set(LAYER), f"declare new layer fields in armor_export/manifest.py LAYER"


def test_missing_files_section_and_missing_entries(capsys, art, tmp_path):
    a = copy_art(art, tmp_path / "a")
    rewrite_manifest(a, lambda m: m.pop("files"))
    assert_clear(*run_cli(capsys, "report", "--artifact", a), "'files'")
    b = copy_art(art, tmp_path / "b")
    rewrite_manifest(b, lambda m: m["files"].pop("config.json"))
    assert_clear(*run_cli(capsys, "eval", "--artifact", b), "'files'", "config.json")


@pytest.mark.parametrize("victim", ["config.json", "tokenizer.json", "base.safetensors", "factors.index.json",
                                    "factors-00001-of-"])
def test_flipped_byte_in_any_artifact_file(capsys, art, tmp_path, victim):
    a = copy_art(art, tmp_path / "a")
    victim = next(p.name for p in a.iterdir() if p.name.startswith(victim))
    flip_byte(a / victim, at=len((a / victim).read_bytes()) // 2)
    rc, err = run_cli(capsys, "export", "--artifact", a, "--engine", "trtllm", "--out", tmp_path / "e")
    assert_clear(rc, err, a / victim, "sha256")
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []


def test_added_file_and_digest_mismatch(capsys, art, tmp_path):
    a = copy_art(art, tmp_path / "a")
    (a / "tokenizer.model").write_bytes(b"another tokenizer")
    assert_clear(*run_cli(capsys, "eval", "--artifact", a), a / "tokenizer.model", "not listed")
    b = copy_art(art, tmp_path / "b")
    man = json.loads((b / "manifest.json").read_text())
    man["method"] = "armor"  # an edit that leaves the JSON valid
    (b / "manifest.json").write_text(json.dumps(man, indent=2))
    assert_clear(*run_cli(capsys, "report", "--artifact", b), b / "manifest.json", DIGEST)
    (b / DIGEST).unlink()
    assert_clear(*run_cli(capsys, "report", "--artifact", b), b / DIGEST, "missing")


def test_format_version_as_string(capsys, art, tmp_path):
    a = copy_art(art, tmp_path / "a")
    from armor_export.manifest import FORMAT_VERSION

    rewrite_manifest(a, lambda m: m.__setitem__("format_version", "2"))
    rc, err = run_cli(capsys, "report", "--artifact", a)
    assert_clear(rc, err, "'format_version'", "string '2'", f"integer {FORMAT_VERSION}")


def test_version_1_artifact_is_still_read(capsys, art, tmp_path):
    from armor_export.artifact import load_artifact

    a = to_version_2(copy_art(art, tmp_path / "a"))
    assert set(load_artifact(a).layers) == set(json.loads((a / "manifest.json").read_text())["targets"])
    (a / DIGEST).unlink()

    def v1(m):
        m["format_version"] = 1
        m["files"] = {k: v for k, v in m["files"].items() if k.endswith(".safetensors")}
    man = json.loads((a / "manifest.json").read_text())
    v1(man)
    (a / "manifest.json").write_text(json.dumps(man))
    assert set(load_artifact(a).layers) == set(man["targets"])
    assert "format version 1" in capsys.readouterr().err


def test_edited_shape_and_corrupt_s_meta_name_layer_and_file(capsys, art, tmp_path):
    from armor_export.artifact import shard_of

    name = json.loads((art / "manifest.json").read_text())["targets"][0]
    shard = shard_of(art, name)
    a = copy_art(art, tmp_path / "a")
    rewrite_manifest(a, lambda m: m["layers"][name].__setitem__("shape", [m["layers"][name]["shape"][0], 128]))
    assert_clear(*run_cli(capsys, "eval", "--artifact", a), name, shard)
    b = copy_art(art, tmp_path / "b")
    t = load_file(str(b / shard))
    t[f"{name}.S_meta"][0, 0] = 0xFF  # kept positions (3, 3): not a valid 2:4 code
    save_file(t, str(b / shard))
    rehash(b, shard)
    assert_clear(*run_cli(capsys, "eval", "--artifact", b), name, shard, "S_meta")


def test_layer_removed_from_the_manifest_is_blamed_correctly(capsys, art, tmp_path):
    name = json.loads((art / "manifest.json").read_text())["targets"][0]
    a = copy_art(art, tmp_path / "a")
    rewrite_manifest(a, lambda m: m["layers"].pop(name))
    assert_clear(*run_cli(capsys, "eval", "--artifact", a), name, "'targets'", "'layers'")

    def drop(m):
        m["layers"].pop(name)
        m["targets"].remove(name)
    b = copy_art(art, tmp_path / "b")
    rewrite_manifest(b, drop)
    rc, err = run_cli(capsys, "eval", "--artifact", b)
    assert_clear(rc, err, name, "factors-0000", "no entry in the manifest")
    assert "base.safetensors" not in err


# ---------------------------------------------------------------- engine folders

def test_engine_folder_hashes_are_checked_first(capsys, art, tmp_path):
    eng = tmp_path / "trtllm"
    assert main(["export", "--artifact", str(art), "--engine", "trtllm", "--out", str(eng)]) == 0
    listed = (eng / HASHES).read_text()
    shard = eng / "model-00001-of-00001.safetensors"
    assert shard.name in listed and "model.safetensors.index.json" in listed and "config.json" in listed
    assert (eng / MARKER).is_file()
    flip_byte(shard, at=len(shard.read_bytes()) // 2)
    rc, err = run_cli(capsys, "verify", "--artifact", art, "--engine", "trtllm", "--engine-dir", eng)
    assert_clear(rc, err, shard, HASHES)
    assert not (eng / "parity.json").exists(), "no parity report for a folder that failed its hash check"
    shutil.rmtree(eng)
    assert main(["export", "--artifact", str(art), "--engine", "trtllm", "--out", str(eng)]) == 0
    (eng / "extra.py").write_text("print('hi')")
    assert_clear(*run_cli(capsys, "verify", "--artifact", art, "--engine", "trtllm", "--engine-dir", eng),
                 eng / "extra.py", "not listed")
    (eng / "extra.py").unlink()
    (eng / HASHES).unlink()
    assert_clear(*run_cli(capsys, "verify", "--artifact", art, "--engine", "trtllm", "--engine-dir", eng),
                 eng / HASHES, "missing")


@pytest.mark.slow  # two fp16 ONNX exports (~13 s on 2 cores)
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_hint_gives_a_command_that_is_not_refused(capsys, art, tmp_path):
    out = tmp_path / "trt"
    rc, err = run_cli(capsys, "export", "--artifact", art, "--engine", "tensorrt", "--out", out)
    assert_clear(rc, err, "TensorRT is not installed", f"--out {out} --overwrite")
    assert "rerun this command" not in err and (out / HASHES).is_file()
    rc, err = run_cli(capsys, "export", "--artifact", art, "--engine", "tensorrt", "--out", out, "--overwrite")
    assert_clear(rc, err, "TensorRT is not installed")  # the hint's command runs; only TensorRT is missing
    assert "already exists" not in err and leftovers(tmp_path) == []
