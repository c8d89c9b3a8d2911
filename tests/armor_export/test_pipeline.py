"""The spine on a tiny random Llama: calibrate -> solve -> artifact -> runtime -> perplexity."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from armor_export import adapters, calibrate, pipeline, source
from armor_export.artifact import load_artifact, read_manifest
from armor_export.calibration import windows
from armor_export.config import CalibConfig, EvalConfig
from armor_export.corpus import CorpusError, default_split, text_files
from armor_export.evaluate import perplexity
from engines.torch_module import load_armor_model
from solver.baselines import nowag_score, prune_by_score
from solver.config import SolverConfig
from solver.sparsity import is_24


def _calib(tiny_text_dir, **kw):
    return CalibConfig(text=str(tiny_text_dir / "calib"), samples=6, seqlen=48, **kw)


def test_nowag_artifact_equals_pruning_in_pytorch(tiny_model_dir, tiny_text_dir, tmp_path):
    calib = _calib(tiny_text_dir)
    out = pipeline.prune(str(tiny_model_dir), SolverConfig(method="nowag"), calib, tmp_path / "a", progress=False)
    man = read_manifest(out)
    assert len(man["targets"]) == 2 * 7 and man["method"] == "nowag"
    assert man["calibration"]["windows"] == 6 and len(man["calibration"]["sha256"]) == 64

    # prune the same model in PyTorch directly, from the same statistics
    loaded = source.load(str(tiny_model_dir))
    tokens = calibrate.calibration_windows(loaded.tokenizer, calib)
    stats = calibrate.collect_stats(loaded, man["targets"], tokens, full=False, progress=False)
    with torch.no_grad():
        for name in man["targets"]:
            lin = loaded.model.get_submodule(name)
            lin.weight.copy_(prune_by_score(lin.weight, nowag_score(lin.weight, stats[name].h))[0])
    model, art = load_armor_model(out)
    for lf in art.layers.values():
        assert is_24(lf.factors.S) and lf.factors.A_blocks is None
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        # identical math (A = B = I), fp32: exact up to kernel reassociation
        torch.testing.assert_close(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_sequential_mode_changes_only_later_blocks(tiny_model_dir, tiny_text_dir):
    loaded = source.load(str(tiny_model_dir))
    tokens = calibrate.calibration_windows(loaded.tokenizer, _calib(tiny_text_dir))
    names = [n for n in adapters.target_names(loaded.family, 2)]
    dense = calibrate.collect_stats(loaded, names, tokens, full=False, progress=False)
    seen = {}

    def record(i, block, bstats):
        for local, st in bstats.items():
            seen[f"model.layers.{i}.{local}"] = st
        # prune the block's linears to zero: later blocks must then see different inputs
        for local in loaded.family.linears:
            block.get_submodule(local).weight.data.zero_()

    from armor_export.capture import iterate_blocks

    for _ in iterate_blocks(loaded.model, loaded.family, tokens.token_ids, full=False, mode="sequential",
                            prune_block=record, progress=False):
        pass
    first = "model.layers.0.self_attn.q_proj"
    later = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(seen[first].h, dense[first].h, rtol=0, atol=0)
    assert not torch.allclose(seen[later].h, dense[later].h)


def test_perplexity_of_uniform_model_is_vocab_size():
    V = 37

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))

    ids = torch.randint(0, V, (3, 10))
    # cross-entropy is computed in fp32: log(V) carries ~1e-7 relative error
    assert math.isclose(perplexity(Uniform(), ids, progress=False), V, rel_tol=1e-6)


def test_calibration_windows_are_deterministic_and_checked(tiny_model_dir, tiny_text_dir):
    loaded = source.load(str(tiny_model_dir))
    files = text_files(tiny_text_dir / "calib")
    a = windows(loaded.tokenizer, files, 5, 32, seed=3, what="calibration")
    b = windows(loaded.tokenizer, files, 5, 32, seed=3, what="calibration")
    assert torch.equal(a.token_ids, b.token_ids) and a.sha256 == b.sha256
    with pytest.raises(CorpusError, match="windows of 100000"):
        windows(loaded.tokenizer, files, 1, 100000, seed=0, what="calibration")


def test_default_corpus_split_is_by_file():
    calib, held_out = default_split()
    assert len(calib) == 36 and len(held_out) == 6
    assert held_out[0].name.startswith("timon") and held_out[-1].name == "winters_tale_gut.txt"
    assert not set(calib) & set(held_out)


def test_cli_prune_eval_report(tiny_model_dir, tiny_text_dir, tmp_path, capsys):
    from armor_export.cli import main

    out = tmp_path / "cli-art"
    rc = main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--calib-text",
               str(tiny_text_dir / "calib"), "--calib-samples", "4", "--calib-seqlen", "32", "--out", str(out)])
    assert rc == 0 and load_artifact(out).manifest["method"] == "wanda"
    rc = main(["eval", "--artifact", str(out), "--eval-text", str(tiny_text_dir / "eval"), "--eval-windows", "2",
               "--eval-seqlen", "32", "--json", str(tmp_path / "ppl.json")])
    assert rc == 0
    res = json.loads((tmp_path / "ppl.json").read_text())
    assert list(res["perplexity"]) == ["eval"] and res["evals"]["eval"]["windows"] == 2
    assert math.isfinite(res["perplexity"]["eval"]) and res["perplexity"]["eval"] > 1
    assert main(["report", "--artifact", str(out)]) == 0
    # an existing output is refused without --overwrite, with exit code 2 and a clear message
    rc = main(["prune", "--model", str(tiny_model_dir), "--method", "magnitude", "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_eval_config_rejects_nonsense():
    with pytest.raises(ValueError):
        EvalConfig(windows=0)
    with pytest.raises(ValueError, match="calibration mode"):
        CalibConfig(mode="bogus")


def test_cli_solver_flags_reach_the_manifest(tiny_model_dir, tiny_text_dir, tmp_path):
    from armor_export.cli import main
    from solver.config import DEFAULT_PRESET, PRESETS

    out = tmp_path / "flags"
    rc = main(["prune", "--model", str(tiny_model_dir), "--method", "armor", "--block-size", "8", "--iterations", "3",
               "--lr", "2e-3", "--lr-schedule", "cosine", "--sparse-rounds", "2", "--calib-text",
               str(tiny_text_dir / "calib"), "--calib-samples", "2", "--calib-seqlen", "16", "--out", str(out)])
    assert rc == 0
    cfg = load_artifact(out).manifest["solver_config"]
    assert (cfg["block_size"], cfg["iterations"], cfg["lr"], cfg["lr_schedule"], cfg["sparse_rounds"]) == (
        8, 3, 2e-3, "cosine", 2)
    out2 = tmp_path / "preset"
    rc = main(["prune", "--model", str(tiny_model_dir), "--method", "armor", "--block-size", "8", "--iterations", "2",
               "--calib-text", str(tiny_text_dir / "calib"), "--calib-samples", "2", "--calib-seqlen", "16",
               "--out", str(out2)])
    cfg = load_artifact(out2).manifest["solver_config"]
    for key in set(PRESETS[DEFAULT_PRESET]) - {"block_size", "iterations"}:  # the rest of the default preset applies
        assert cfg[key] == PRESETS[DEFAULT_PRESET][key], key


@pytest.fixture
def calib_calls(monkeypatch):
    """(full, hessian_block) of every calibration pass the test makes through the pipeline; the passes still run."""
    seen, real = [], calibrate.collect_stats

    def spy(*a, **kw):
        seen.append((kw["full"], kw.get("hessian_block")))
        return real(*a, **kw)

    monkeypatch.setattr(calibrate, "collect_stats", spy)
    return seen


def test_cli_block_hessian_objective_calibrates_blocks_only(tiny_model_dir, tiny_text_dir, tmp_path, calib_calls):
    """--objective block-hessian end to end: blocks-only calibration, manifest, losses, report label."""
    from armor_export.cli import main
    from solver.methods import Problem, solve

    seen = calib_calls
    out = tmp_path / "blk"
    argv = ["prune", "--model", str(tiny_model_dir), "--preset", "cpu", "--block-size", "8", "--iterations", "4",
            "--objective",
            "block-hessian", "--hessian-damp", "0.02", "--calib-text", str(tiny_text_dir / "calib"),
            "--calib-samples", "2", "--calib-seqlen", "16", "--out", str(out)]
    assert main(argv) == 0
    assert seen == [(False, 8)]  # only H's 8 x 8 diagonal blocks were accumulated, not the full H
    man = load_artifact(out).manifest
    assert (man["solver_config"]["objective"], man["solver_config"]["hessian_damp"]) == ("block-hessian", 0.02)
    # the artifact's layer equals a solve from the full H of the same windows (blocks read off H)
    loaded = source.load(str(tiny_model_dir))
    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=2, seqlen=16)
    tokens = calibrate.calibration_windows(loaded.tokenizer, calib)
    name = man["targets"][0]
    st = calibrate.collect_stats(loaded, [name], tokens, full=True, progress=False)[name]
    cfg = SolverConfig.from_dict(man["solver_config"])
    r = solve("armor", [Problem(name, loaded.model.get_submodule(name).weight.detach().float(), st)], cfg)[0]
    assert man["layers"][name]["loss_final"] == pytest.approx(r.report.loss_final, rel=1e-3)
    assert man["layers"][name]["loss_final"] <= man["layers"][name]["loss_start"]
    notes = man["layers"][name]["notes"]  # the paper's (diagonal) proxy of the same factors, for comparison
    assert notes["objective"] == "block-hessian" and notes["diag_loss_final"] > 0 and notes["diag_loss_start"] > 0
    from armor_export.report import _label, artifact_summary

    assert _label(artifact_summary(man)) == "armor (block-hessian)"  # tables say which objective the losses are in
    assert main(["report", "--artifact", str(out)]) == 0


def test_cli_output_refit_calibrates_full_h_and_reports_output_losses(tiny_model_dir, tiny_text_dir, tmp_path,
                                                                     calib_calls):
    from armor_export.cli import main

    seen = calib_calls
    out = tmp_path / "refit"
    argv = ["prune", "--model", str(tiny_model_dir), "--preset", "quality", "--block-size", "8", "--iterations", "4",
            "--refit-rounds", "2", "--calib-text",
            str(tiny_text_dir / "calib"), "--calib-samples", "2", "--calib-seqlen", "16", "--out", str(out)]
    assert main(argv) == 0
    assert seen == [(True, None)]  # the refit reads the full H
    man = load_artifact(out).manifest
    cfg = man["solver_config"]  # the quality preset: the paper's proxy + output refit, flags override it
    assert (cfg["objective"], cfg["refit"], cfg["refit_rounds"], cfg["block_size"]) == ("diag", "output", 2, 8)
    for name, layer in man["layers"].items():
        n = layer["notes"]
        assert layer["loss_final"] <= layer["loss_start"], name  # output losses, the guarantee kept
        assert layer["loss_final"] <= n["output_loss_bcd"] + 1e-12, name  # never worse than the BCD's factors
        assert n["refit"] == "output" and n["bcd_loss_final"] <= n["bcd_loss_start"], name
    from armor_export.report import _label, artifact_summary

    assert _label(artifact_summary(man)) == "armor (output refit, shrink 0.5 to diag)"
    assert main(["report", "--artifact", str(out)]) == 0


def test_cli_refit_flag_overrides_the_preset():
    from armor_export.cli import build_parser, solver_config

    parse = lambda *a: solver_config(build_parser().parse_args(["prune", "--out", "x", *a]))  # noqa: E731
    assert (parse("--preset", "quality", "--refit", "none").refit, parse("--preset", "quality").refit) == (
        "none", "output")
    assert (parse().refit, parse("--refit", "none").refit, parse("--preset", "cpu").refit) == ("output", "none", "none")
    d = parse()  # the default preset: the paper's proxy, then the refit shrunk half-way toward diag H
    assert (d.objective, d.refit_shrink, d.refit_shrink_to, d.iterations) == ("diag", 0.5, "diag", 300)
    assert parse("--refit-shrink", "0", "--refit-shrink-to", "block").refit_shrink_to == "block"
    assert parse("--refit-shrink", "0").refit_shrink == 0.0


def test_sequential_calibration_feeds_the_block_objective(tiny_model_dir, tiny_text_dir, tmp_path):
    cfg = SolverConfig(block_size=8, iterations=2, objective="block-hessian")
    out = pipeline.prune(str(tiny_model_dir), cfg, _calib(tiny_text_dir, mode="sequential"), tmp_path / "s",
                         progress=False)
    man = read_manifest(out)
    assert man["calibration"]["mode"] == "sequential"
    for v in man["layers"].values():
        assert v["notes"]["objective"] == "block-hessian" and v["loss_final"] <= v["loss_start"]


def test_ignored_linears_get_no_statistics(tiny_model_dir, tiny_text_dir, tmp_path, monkeypatch):
    """--ignore'd linears get no accumulator (no full H), so a block objective runs although b = 16 does not
    divide the ignored MLP's width 72 (it crashed in the blocks accumulator before)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from armor_export import capture
    from armor_export.cli import main

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.intermediate_size = 72
    odd = tmp_path / "odd"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(odd)
    for p in tiny_model_dir.iterdir():
        if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json":
            shutil.copy2(p, odd / p.name)
    widths, real = [], capture.accumulator
    monkeypatch.setattr(capture, "accumulator", lambda d_in, **kw: widths.append(d_in) or real(d_in, **kw))
    loaded = source.load(str(odd))
    tokens = calibrate.calibration_windows(loaded.tokenizer, CalibConfig(text=str(tiny_text_dir / "calib"),
                                                                        samples=2, seqlen=16))
    names = adapters.target_names(loaded.family, 2, ("*.mlp.*",))
    st = calibrate.collect_stats(loaded, names, tokens, full=True, progress=False)
    assert sorted(st) == sorted(names) and widths == [64, 64] * 2  # q/k/v and o of both blocks, no MLP
    widths.clear()
    argv = ["prune", "--model", str(odd), "--block-size", "16", "--iterations", "2", "--objective", "block-hessian",
            "--ignore", "*.mlp.*", "--calib-text", str(tiny_text_dir / "calib"), "--calib-samples", "2",
            "--calib-seqlen", "16", "--out", str(tmp_path / "a")]
    assert main(argv) == 0 and widths == [64, 64] * 2
    assert all(".mlp." not in n for n in read_manifest(tmp_path / "a")["targets"])
    widths.clear()
    assert main(argv[:-1] + [str(tmp_path / "s"), "--calib-mode", "sequential"]) == 0 and widths == [64, 64] * 2
