"""Fault injection on the input side: every bad model, tensor, text, flag, device or missing package is one line
``armor-export: error: ...`` naming the culprit, exit code 2, no traceback, and no output left behind.
The CLI runs in-process (``armor_export.cli.main``); one subprocess checks the real console entry."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from armor_export.cli import main

WEIGHTS = "model.safetensors"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_clear(rc: int, err: str, *culprits: str, code: int = 2) -> str:
    """Exit ``code``, exactly one ``error:`` line that names every culprit, no traceback."""
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    return lines[0]


def assert_nothing_left(out: Path) -> None:
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name) or p.name.startswith(f".{out.name}")]
    assert not left, left


def model_copy(src: Path, dst: Path, edit=None, config: dict | None = None) -> Path:
    """A copy of the tiny model folder, its weights through ``edit(state_dict)`` and config.json updated."""
    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(str(dst / WEIGHTS))
        edit(sd)
        save_file(sd, str(dst / WEIGHTS), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def untied(src: Path, dst: Path, edit=None) -> Path:
    """The tiny model with its own lm_head.weight (tie_word_embeddings false)."""
    def add_head(sd):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        if edit is not None:
            edit(sd)
    return model_copy(src, dst, add_head, {"tie_word_embeddings": False})


def prune(model, out, *extra) -> list:
    return ["prune", "--model", model, "--method", "magnitude", "--out", out, *extra]


# ---- the checkpoint matches the model ----------------------------------------------------------------

@pytest.mark.parametrize("layerwise", [False, True], ids=["eager", "layer-by-layer"])
def test_missing_tensors_are_named(capsys, tiny_model_dir, tmp_path, layerwise):
    gone = ("model.layers.1.mlp.down_proj.weight", "model.norm.weight")
    m = model_copy(tiny_model_dir, tmp_path / "m", lambda sd: [sd.pop(k) for k in gone])
    out = tmp_path / "o"
    rc, _, err = cli(capsys, *prune(m, out, *(["--layer-by-layer"] if layerwise else [])))
    assert_clear(rc, err, *gone, "lacks", WEIGHTS)
    assert_nothing_left(out)


@pytest.mark.parametrize("layerwise", [False, True], ids=["eager", "layer-by-layer"])
def test_unexpected_tensor_is_named(capsys, tiny_model_dir, tmp_path, layerwise):
    extra = "model.layers.0.mlp.extra_proj.weight"
    m = model_copy(tiny_model_dir, tmp_path / "m", lambda sd: sd.__setitem__(extra, torch.zeros(4, 4)))
    out = tmp_path / "o"
    rc, _, err = cli(capsys, *prune(m, out, *(["--layer-by-layer"] if layerwise else [])))
    assert_clear(rc, err, extra, "unexpected")
    assert_nothing_left(out)


@pytest.mark.parametrize("layerwise", [False, True], ids=["eager", "layer-by-layer"])
def test_wrongly_shaped_tensors_are_named(capsys, tiny_model_dir, tmp_path, layerwise):
    m = model_copy(tiny_model_dir, tmp_path / "m", config={"intermediate_size": 128})
    out = tmp_path / "o"
    rc, _, err = cli(capsys, *prune(m, out, *(["--layer-by-layer"] if layerwise else [])))
    assert_clear(rc, err, "wrongly shaped", "model.layers.0.mlp.down_proj.weight [64, 96] (config: [64, 128])")
    assert_nothing_left(out)


def test_tokenizer_of_another_model(capsys, tiny_model_dir, tmp_path):
    m = model_copy(tiny_model_dir, tmp_path / "m", config={"vocab_size": 300})
    rc, _, err = cli(capsys, "eval", "--model", m)
    assert_clear(rc, err, str(m), "tokenizer has", "vocab_size is 300")


KINDS = {"embedding": "model.embed_tokens.weight", "norm": "model.layers.0.input_layernorm.weight",
         "final norm": "model.norm.weight", "linear": "model.layers.1.mlp.down_proj.weight",
         "lm_head": "lm_head.weight"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_nonfinite_tensor_of_every_kind_is_named(capsys, tiny_model_dir, tmp_path, kind, bad):
    """Not blamed on calibration: the load names the tensor before any work."""
    name = KINDS[kind]
    m = untied(tiny_model_dir, tmp_path / "m", lambda sd: sd[name].view(-1).__setitem__(3, bad))
    out = tmp_path / "o"
    rc, _, err = cli(capsys, *prune(m, out))
    mod, _, attr = name.rpartition(".")
    line = assert_clear(rc, err, f"{mod}: {attr} has 1 NaN/Inf entries", "corrupt")
    assert "calibration" not in line
    assert_nothing_left(out)


@pytest.mark.parametrize("name", [KINDS["norm"], KINDS["lm_head"]])
def test_nonfinite_tensor_layer_by_layer(capsys, tiny_model_dir, tmp_path, name):
    m = untied(tiny_model_dir, tmp_path / "m", lambda sd: sd[name].view(-1).__setitem__(0, float("nan")))
    out = tmp_path / "o"
    rc, _, err = cli(capsys, *prune(m, out, "--layer-by-layer"))
    assert_clear(rc, err, name.rpartition(".")[0], "NaN/Inf")
    assert_nothing_left(out)


def test_nonfinite_embedding_fails_eval_too(capsys, tiny_model_dir, tmp_path):
    m = model_copy(tiny_model_dir, tmp_path / "m", lambda sd: sd[KINDS["embedding"]].__setitem__((5, 1), float("inf")))
    rc, out, err = cli(capsys, "eval", "--model", m, "--eval-windows", "1", "--eval-seqlen", "16")
    assert_clear(rc, err, "model.embed_tokens: weight has 1 NaN/Inf")
    assert out == ""


def tiny_gguf(src: Path, path: Path, skip: str | None = None, nan_in: str | None = None) -> Path:
    """The tiny Llama written as an fp32 GGUF (llama names, gpt2 BPE vocabulary), without ``skip`` and with a NaN
    in ``nan_in`` (HF names)."""
    import numpy as np
    from gguf import GGUFWriter

    cfg = json.loads((src / "config.json").read_text())
    tj = json.loads((src / "tokenizer.json").read_text())
    sd = load_file(str(src / WEIGHTS))
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([1] * len(vocab))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                       ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")):
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        if hf != skip:
            a = sd[hf].numpy().copy()
            if hf == nan_in:
                a.reshape(-1)[0] = np.nan
            w.add_tensor(gg, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("fault", ["missing", "nan"])
def test_gguf_with_missing_or_nonfinite_tensor(capsys, tiny_model_dir, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("ARMOR_EXPORT_CACHE", str(tmp_path / "cache"))
    name = "model.layers.1.mlp.down_proj.weight" if fault == "missing" else "model.norm.weight"
    g = tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf", **({"skip": name} if fault == "missing" else {"nan_in": name}))
    rc, _, err = cli(capsys, *prune(g, tmp_path / "o"))
    assert_clear(rc, err, str(g), name if fault == "missing" else "model.norm: weight has 1 NaN/Inf")
    assert not list((tmp_path / "cache").rglob("config.json"))  # no converted folder was cached
    assert_nothing_left(tmp_path / "o")


def test_pickle_in_the_model_folder_is_refused_unrun(capsys, tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    m = model_copy(tiny_model_dir, tmp_path / "m")
    (m / WEIGHTS).unlink()
    # a protocol-0 pickle that would run `touch marker` if anything unpickled it
    (m / "pytorch_model.bin").write_bytes(b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    for extra in ((), ("--layer-by-layer",)):
        rc, _, err = cli(capsys, *prune(m, tmp_path / "o", *extra))
        assert_clear(rc, err, "pytorch_model.bin", "pickle", "safetensors")
        assert not marker.exists()
        assert_nothing_left(tmp_path / "o")


@pytest.mark.parametrize("text,what", [("{not json", "not valid JSON (Expecting property name"),
                                       ("[1, 2]", "expected a JSON object")])
def test_bad_config_json_names_the_file(capsys, tiny_model_dir, tmp_path, text, what):
    m = model_copy(tiny_model_dir, tmp_path / "m")
    (m / "config.json").write_text(text)
    for args in (prune(m, tmp_path / "o"), ["eval", "--model", m]):
        rc, _, err = cli(capsys, *args)
        assert_clear(rc, err, str(m / "config.json"), what)
    assert_nothing_left(tmp_path / "o")


def test_missing_tokenizer_says_so(capsys, tiny_model_dir, tmp_path):
    m = model_copy(tiny_model_dir, tmp_path / "m")
    for f in TOKENIZER:
        (m / f).unlink(missing_ok=True)
    for extra in ((), ("--layer-by-layer",)):
        rc, _, err = cli(capsys, *prune(m, tmp_path / "o", *extra))
        line = assert_clear(rc, err, str(m), "no tokenizer", "tokenizer.json")
        assert "sentencepiece" not in line
    assert_nothing_left(tmp_path / "o")


@pytest.mark.parametrize("text", ["{bad", '{"version": "1.0"}'])
def test_corrupt_tokenizer_json(capsys, tiny_model_dir, tmp_path, text):
    m = model_copy(tiny_model_dir, tmp_path / "m")
    (m / "tokenizer.json").write_text(text)
    rc, _, err = cli(capsys, "eval", "--model", m)
    assert_clear(rc, err, str(m), "cannot load the tokenizer")


# ---- text inputs -------------------------------------------------------------------------------------

def test_non_utf8_text_names_file_and_offset(capsys, tiny_model_dir, tiny_text_dir, tmp_path):
    good = (tiny_text_dir / "calib" / "a.txt").read_bytes()[:5000]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(good + "café".encode("latin-1") + good)
    offset = len(good) + 3
    out = tmp_path / "o"
    rc, _, err = cli(capsys, "prune", "--model", tiny_model_dir, "--method", "nowag", "--calib-text", bad,
                     "--calib-samples", "2", "--calib-seqlen", "16", "--out", out)
    assert_clear(rc, err, str(bad), "not UTF-8", f"byte offset {offset}", "0xe9")
    assert_nothing_left(out)
    rc, stdout, err = cli(capsys, "eval", "--model", tiny_model_dir, "--eval-text", bad)
    assert_clear(rc, err, str(bad), f"byte offset {offset}")
    assert stdout == ""


def test_binary_text_is_refused(capsys, tiny_model_dir, tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("plain words " * 50)
    (d / "b.txt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a zip renamed .txt
    rc, _, err = cli(capsys, "prune", "--model", tiny_model_dir, "--method", "nowag", "--calib-text", d,
                     "--calib-samples", "2", "--calib-seqlen", "16", "--out", tmp_path / "o")
    assert_clear(rc, err, str(d / "b.txt"), "binary", "byte offset 4")
    assert_nothing_left(tmp_path / "o")


# ---- options -----------------------------------------------------------------------------------------

BAD_FLAGS = [("--lr", v) for v in ("inf", "nan", "1e30", "0", "-1e-3", "abc")] + \
            [("--hessian-damp", v) for v in ("inf", "-inf", "nan", "0", "-0.1", "1e30")] + \
            [("--iterations", v) for v in ("-3", "1.5", "many")] + \
            [("--block-size", v) for v in ("0", "-4", "6")] + \
            [("--calib-samples", v) for v in ("0", "-1")] + \
            [("--calib-seqlen", v) for v in ("1", "-5")] + \
            [("--sparse-rounds", "0"), ("--patience", "0"), ("--refit-rounds", "-2"),
             ("--seed", "-1"), ("--seed", str(2**64))]


@pytest.mark.parametrize("flag,value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_bad_numeric_flag(capsys, tmp_path, flag, value):
    out = tmp_path / "o"
    rc, _, err = cli(capsys, "prune", "--method", "armor", f"{flag}={value}", "--out", out)
    assert_clear(rc, err, f"argument {flag}", value if value != "1.5" else "'1.5'")
    assert_nothing_left(out)


@pytest.mark.parametrize("flag,value", [("--eval-windows", "0"), ("--eval-windows", "-2"), ("--eval-seqlen", "1"),
                                        ("--eval-seqlen", "nan")])
def test_bad_eval_flag(capsys, flag, value):
    rc, _, err = cli(capsys, "eval", f"{flag}={value}")
    assert_clear(rc, err, f"argument {flag}")


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", 1e30), ("lr", float("nan")),
                                         ("hessian_damp", float("inf")), ("sparsegpt_damp", float("nan")),
                                         ("rtol", float("inf")), ("seed", -1)])
def test_solver_config_refuses_nonfinite_and_out_of_range(field, value):
    from solver.config import SolverConfig

    with pytest.raises(ValueError, match=field):
        SolverConfig(**{field: value})


def test_calib_config_refuses_bad_seed():
    from armor_export.config import CalibConfig

    with pytest.raises(ValueError, match="seed"):
        CalibConfig(seed=-1)


@pytest.mark.parametrize("dev", ["banana", "cuda:x", "mps", "cuda", "cuda:7"])
def test_bad_or_missing_device(capsys, tmp_path, dev):
    if dev.startswith("cuda") and torch.cuda.is_available() and (dev == "cuda" or torch.cuda.device_count() > 7):
        pytest.skip("a CUDA device is available here")
    rc, _, err = cli(capsys, "prune", "--device", dev, "--out", tmp_path / "o")
    line = assert_clear(rc, err, "argument --device", dev)
    assert ("cpu, cuda or cuda:N" in line) or ("CUDA" in line)
    assert "Expected one of cpu, cuda, ipu" not in line
    assert_nothing_left(tmp_path / "o")


def test_sequence_lengths_beyond_the_positions(capsys, tiny_model_dir, tiny_text_dir, tmp_path):
    m = model_copy(tiny_model_dir, tmp_path / "m", config={"max_position_embeddings": 64})
    out = tmp_path / "o"
    rc, _, err = cli(capsys, "prune", "--model", m, "--method", "nowag", "--calib-text", tiny_text_dir / "calib",
                     "--calib-samples", "2", "--calib-seqlen", "65", "--out", out)
    assert_clear(rc, err, "--calib-seqlen 65", "64 positions")
    assert_nothing_left(out)
    rc, stdout, err = cli(capsys, "eval", "--model", m, "--eval-text", tiny_text_dir / "eval", "--eval-seqlen", "100000")
    assert_clear(rc, err, "--eval-seqlen 100000", "64 positions")
    assert stdout == ""
    rc, stdout, _ = cli(capsys, "eval", "--model", m, "--eval-text", tiny_text_dir / "eval", "--eval-windows", "1",
                        "--eval-seqlen", "64")  # the limit itself is fine
    assert rc == 0 and [e["seqlen"] for e in json.loads(stdout)["evals"].values()] == [64]


@pytest.mark.parametrize("extra,culprit", [(("--block-size", "12"), "block size 12"),
                                           (("--eval-seqlen", "2048"), "--eval-seqlen 2048"),
                                           (("--calib-seqlen", "5000"), "--calib-seqlen 5000")])
def test_one_shot_run_checks_before_the_dense_evaluation(capsys, tiny_model_dir, tiny_text_dir, tmp_path, extra,
                                                         culprit):
    rc, _, err = cli(capsys, "run", "--model", tiny_model_dir, "--calib-text", tiny_text_dir / "calib",
                     "--eval-text", tiny_text_dir / "eval", "--out", tmp_path / "o", *extra)
    assert_clear(rc, err, culprit)
    assert "perplexity (dense)" not in err  # nothing was evaluated


# ---- evaluation --------------------------------------------------------------------------------------

def test_nonfinite_perplexity_is_an_error_not_infinity(capsys, tiny_model_dir, tiny_text_dir, tmp_path):
    """Finite weights whose logits are ~1e29: the cross-entropy is finite, its exp is not."""
    m = model_copy(tiny_model_dir, tmp_path / "m", lambda sd: sd["model.norm.weight"].fill_(1e30))
    js = tmp_path / "ppl.json"
    rc, stdout, err = cli(capsys, "eval", "--model", m, "--eval-text", tiny_text_dir / "eval", "--eval-windows", "1",
                          "--eval-seqlen", "32", "--json", js)
    assert_clear(rc, err, "not finite", str(m), "b.txt")
    assert "Infinity" not in stdout and not js.exists()


def test_eval_refuses_model_with_artifact(capsys, tiny_model_dir, tmp_path):
    rc, stdout, err = cli(capsys, "eval", "--model", tiny_model_dir, "--artifact", tmp_path / "a")
    assert_clear(rc, err, "--model", "--artifact", "not both")
    assert stdout == ""


# ---- engines -----------------------------------------------------------------------------------------

def test_missing_genai_fails_before_any_work(capsys, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails, find_spec says absent
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "--engine", "onnx", "--model", tiny_model_dir, "--out", out)
    assert_clear(rc, err, "--engine onnx", "onnxruntime_genai", "pip install 'armor-export[genai]'")
    assert "Loading weights" not in err  # nothing was loaded
    assert_nothing_left(out)
    rc, _, err = cli(capsys, "export", "--artifact", tmp_path / "a", "--engine", "onnx", "--out", tmp_path / "e")
    assert_clear(rc, err, "onnxruntime_genai", "onnxruntime-genai")
    assert_nothing_left(tmp_path / "e")


# ---- the mapping itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "free space"), (errno.EACCES, "permissions"),
                                        (errno.EROFS, "read-only"), (errno.ENOTDIR, "not a folder"),
                                        (errno.EDQUOT, "quota")])
def test_os_errors_are_one_line_naming_the_path(capsys, tiny_model_dir, tmp_path, monkeypatch, code, words):
    from armor_export import pipeline

    target = tmp_path / "o" / "factors.safetensors"

    def fail(*a, **k):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(pipeline, "prune", fail)
    rc, _, err = cli(capsys, *prune(tiny_model_dir, tmp_path / "o"))
    assert_clear(rc, err, str(target), os.strerror(code), words)


def test_parent_of_out_is_a_file(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "f").write_text("a file")
    rc, _, err = cli(capsys, *prune(tiny_model_dir, tmp_path / "f" / "o"))
    assert_clear(rc, err, str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "a file"


def test_internal_errors_point_to_debug(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from armor_export import pipeline

    def bug(*a, **k):
        raise KeyError("layers")

    monkeypatch.setattr(pipeline, "prune", bug)
    rc, _, err = cli(capsys, *prune(tiny_model_dir, tmp_path / "o"))
    assert_clear(rc, err, "internal error", "KeyError", "--debug", "ARMOR_DEBUG=1", code=1)
    with pytest.raises(KeyError):
        main([str(a) for a in prune(tiny_model_dir, tmp_path / "o", "--debug")])
    with pytest.raises(KeyError):
        main(["--debug", *[str(a) for a in prune(tiny_model_dir, tmp_path / "o")]])
    monkeypatch.setenv("ARMOR_DEBUG", "1")
    with pytest.raises(KeyError):
        main([str(a) for a in prune(tiny_model_dir, tmp_path / "o")])


def test_console_entry_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("ARMOR_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "armor_export", "report", "--artifact", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert_clear(res.returncode, res.stderr, str(tmp_path / "nope"), "manifest.json not found")


def test_a_long_message_keeps_its_end():
    from armor_export.errors import MAX_CHARS, one_line

    text = "what failed: " + "x " * 1000 + "what to do: rerun with --overwrite"
    line = one_line(text)
    assert len(line) <= MAX_CHARS and line.startswith("what failed:") and line.endswith("rerun with --overwrite")
    assert one_line("a\nb") == "a b"
