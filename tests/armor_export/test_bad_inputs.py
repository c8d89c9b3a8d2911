"""Bad input: every case is a clear error (CLI exit 2, "armor-export: error: ...") or a per-layer
fallback recorded in the manifest; nothing silently wrong. No pickles are loaded or written."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from armor_export.artifact import ArtifactError, load_artifact
from armor_export.cli import main
from armor_export import calibrate, source

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = "model.safetensors"


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def prune_cli(model, text, out, *extra) -> list:
    return ["prune", "--model", model, "--calib-text", text, "--calib-samples", "4", "--calib-seqlen", "32",
            "--method", "nowag", "--out", out, *extra]


def edited_model(src: Path, dst: Path, edit) -> Path:
    """A copy of the tiny model folder whose weights went through ``edit(state_dict)``."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / WEIGHTS))
    edit(sd)
    save_file(sd, str(dst / WEIGHTS), metadata={"format": "pt"})
    return dst


def odd_model(src: Path, dst: Path, **overrides) -> Path:
    """The tiny model's tokenizer with a random Llama of other sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(src)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
    for p in src.iterdir():
        if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json":
            shutil.copy2(p, dst / p.name)
    return dst


@pytest.fixture(scope="module")
def mag_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mag") / "art"
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "magnitude", "--out", str(out)]) == 0
    return out


# ---- models -------------------------------------------------------------------------------------

def test_missing_model(capsys, tmp_path):
    rc, err = run_cli(capsys, "prune", "--model", tmp_path / "nope", "--method", "magnitude", "--out", tmp_path / "o")
    assert rc == 2 and "armor-export: error:" in err and "not found" in err


def test_unsupported_model_type(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    rc, err = run_cli(capsys, "prune", "--model", tmp_path / "m", "--method", "magnitude", "--out", tmp_path / "o")
    assert rc == 2 and "'gpt2' is not supported" in err and "llama" in err


def test_gguf_of_unsupported_architecture(capsys, tmp_path, monkeypatch):
    from gguf import GGUFWriter

    monkeypatch.setenv("ARMOR_EXPORT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rc, err = run_cli(capsys, "prune", "--model", path, "--method", "magnitude", "--out", tmp_path / "o")
    assert rc == 2 and "GGUF architecture 'gpt2' is not supported" in err and str(path) in err


def test_dims_not_divisible_by_4(capsys, tiny_model_dir, tmp_path):
    m = odd_model(tiny_model_dir, tmp_path / "odd", intermediate_size=98)
    rc, err = run_cli(capsys, "prune", "--model", m, "--method", "magnitude", "--out", tmp_path / "o")
    assert rc == 2 and "mlp.down_proj: input dimension 98 is not divisible by 4" in err and "--ignore" in err


def test_block_size_not_dividing_the_layer(capsys, tiny_model_dir, tiny_text_dir, tmp_path):
    rc, err = run_cli(capsys, "prune", "--model", tiny_model_dir, "--calib-text", tiny_text_dir / "calib",
                      "--method", "armor", "--block-size", "12", "--out", tmp_path / "o")
    assert rc == 2 and "block size 12 does not divide the layer shape" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights(capsys, tiny_model_dir, tmp_path, bad):
    key = "model.layers.1.self_attn.q_proj.weight"
    m = edited_model(tiny_model_dir, tmp_path / "m", lambda sd: sd[key].__setitem__((3, 5), bad))
    rc, err = run_cli(capsys, "prune", "--model", m, "--method", "magnitude", "--out", tmp_path / "o")
    assert rc == 2 and "model.layers.1.self_attn.q_proj: weight has 1 NaN/Inf entries" in err


def test_corrupt_and_truncated_model_weights(capsys, tiny_model_dir, tmp_path):
    for how in ("truncated", "garbage"):
        m = tmp_path / how
        shutil.copytree(tiny_model_dir, m)
        data = (m / WEIGHTS).read_bytes()
        (m / WEIGHTS).write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x07" * 64)
        for extra in ((), ("--layer-by-layer",)):
            rc, err = run_cli(capsys, "prune", "--model", m, "--method", "magnitude", "--out", tmp_path / "o", *extra)
            assert rc == 2 and WEIGHTS in err and "corrupt" in err, err


# ---- activations (recorded, not silent) ------------------------------------------------------------

def test_zero_activation_channel_is_recorded(tiny_model_dir, tiny_text_dir, tmp_path):
    m = edited_model(tiny_model_dir, tmp_path / "m",
                     lambda sd: sd["model.layers.0.input_layernorm.weight"].__setitem__(5, 0.0))
    out = tmp_path / "o"
    assert main(prune_cli(str(m), str(tiny_text_dir / "calib"), str(out))) == 0
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    assert layers["model.layers.0.self_attn.q_proj"]["notes"]["h_replaced"] == 1
    assert layers["model.layers.0.mlp.up_proj"]["notes"]["h_replaced"] == 0


def _loaded_with(tiny_model_dir, name: str, index, value):
    """The tiny model loaded, then one entry of ``name`` set in memory: activations go non-finite in the
    calibration pass although the checkpoint passed the load checks (what an fp16 overflow would do)."""
    from armor_export import pipeline

    loaded = source.load(str(tiny_model_dir))
    with torch.no_grad():
        loaded.model.get_parameter(name)[index] = value
    return loaded


def test_nonfinite_activations_are_dropped_and_counted(tiny_model_dir, tiny_text_dir, tmp_path):
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from solver.config import SolverConfig

    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=4, seqlen=32)
    loaded = source.load(str(tiny_model_dir))
    ids = calibrate.calibration_windows(loaded.tokenizer, calib).token_ids
    first = {}
    for row in ids.tolist():  # the token whose earliest position in any window is latest
        for pos, t in enumerate(row):
            first[t] = min(first.get(t, pos), pos)
    tok = max(first, key=lambda t: (first[t], -t))
    loaded = _loaded_with(tiny_model_dir, "model.embed_tokens.weight", tok, float("nan"))
    out = pipeline.prune(None, SolverConfig(method="nowag"), calib, tmp_path / "o", loaded=loaded, progress=False)
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    q0 = layers["model.layers.0.self_attn.q_proj"]
    assert q0["dropped_tokens"] >= 1 and q0["calib_tokens"] + q0["dropped_tokens"] == 4 * 32


def test_channel_with_only_nonfinite_activations_is_a_clear_error(tiny_model_dir, tiny_text_dir, tmp_path):
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from solver.config import SolverConfig

    loaded = _loaded_with(tiny_model_dir, "model.layers.1.post_attention_layernorm.weight", 2, float("inf"))
    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=4, seqlen=32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj.*calibration"):
        pipeline.prune(None, SolverConfig(method="nowag"), calib, tmp_path / "o", loaded=loaded, progress=False)


# ---- calibration text ------------------------------------------------------------------------------

def test_empty_and_too_short_calibration_text(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("To be, or not to be.")
    rc, err = run_cli(capsys, *prune_cli(tiny_model_dir, tmp_path / "empty.txt", tmp_path / "o"))
    assert rc == 2 and "empty" in err
    rc, err = run_cli(capsys, *prune_cli(tiny_model_dir, tmp_path / "short.txt", tmp_path / "o"))
    assert rc == 2 and "windows of 32" in err and "provide more text" in err


# ---- options and outputs ---------------------------------------------------------------------------

def test_existing_output_is_refused_unless_overwrite(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    args = ["prune", "--model", tiny_model_dir, "--method", "magnitude", "--out", tmp_path / "o"]
    rc, err = run_cli(capsys, *args)
    assert rc == 2 and "already exists; pass --overwrite" in err and (tmp_path / "o" / "keep.txt").exists()
    # issue 16: --overwrite replaces only armor-export's own folders (tests/armor_export/test_faults_outputs.py)
    rc, err = run_cli(capsys, *args, "--overwrite")
    assert rc == 2 and "not written by armor-export" in err and (tmp_path / "o" / "keep.txt").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_engine_library_missing(capsys, mag_artifact, tmp_path):
    rc, err = run_cli(capsys, "export", "--artifact", mag_artifact, "--engine", "tensorrt", "--out", tmp_path / "e")
    assert rc == 2 and "armor-export: error:" in err and "pip install tensorrt" in err
    # The TensorRT lowering keeps the checked ONNX for trtexec, but no engine file is left behind.
    assert not [p for p in (tmp_path / "e").rglob("*") if p.suffix in (".engine", ".plan")]


# ---- artifacts -------------------------------------------------------------------------------------

def test_artifact_flipped_byte_and_truncation_name_the_file(mag_artifact, tmp_path):
    for name in ("factors-00001-of-", "base.safetensors", "factors.index.json"):
        name = next(p.name for p in mag_artifact.iterdir() if p.name.startswith(name))
        for how in ("flip", "truncate"):
            a = tmp_path / f"{name}-{how}"
            shutil.copytree(mag_artifact, a)
            data = bytearray((a / name).read_bytes())
            if how == "flip":
                data[len(data) // 2] ^= 0x01
            else:
                data = data[: len(data) - 100]
            (a / name).write_bytes(bytes(data))
            with pytest.raises(ArtifactError, match=re.escape(name) + ".*sha256 does not match"):
                load_artifact(a)


def test_artifact_from_newer_format_version(capsys, mag_artifact, tmp_path):
    a = tmp_path / "newer"
    shutil.copytree(mag_artifact, a)
    man = json.loads((a / "manifest.json").read_text())
    man["format_version"] += 1
    (a / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="upgrade armor-export"):
        load_artifact(a)
    rc, err = run_cli(capsys, "report", "--artifact", a)
    assert rc == 2 and "format version" in err


def test_artifact_holds_no_pickles(mag_artifact):
    for p in mag_artifact.rglob("*"):
        if p.is_file():
            head = p.read_bytes()[:4]
            assert not head.startswith(b"\x80") and not head.startswith(b"PK"), f"{p.name} looks like a pickle/zip"
            assert p.suffix in (".json", ".safetensors", ".jinja", ".txt", ".model", ".sha256", ""), p.name


def test_no_unsafe_torch_load_in_source():
    call = "torch" + ".load("
    offenders = []
    for d in ("armor_export", "solver", "engines", "benchmarks", "tests"):
        for f in sorted((REPO / d).rglob("*.py")):
            src = f.read_text(encoding="utf-8", errors="replace")
            for m in re.finditer(re.escape(call), src):
                args = src[m.end(): m.end() + 400].split(")")[0]
                if "weights_only=True" not in args:
                    offenders.append(f"{f.relative_to(REPO)}:{src[:m.start()].count(chr(10)) + 1}")
            if re.search(r"^\s*(import pickle|from pickle import|import dill)", src, re.M):
                offenders.append(f"{f.relative_to(REPO)}: imports pickle")
    assert not offenders, offenders
