"""Command line: ``armor-export {prune, eval, export, verify, report, run}`` and the one-shot form
``armor-export [--engine ENGINE]`` (= ``run``; ENGINE from the registry in ``engines``): prune the model with ARMOR, evaluate
dense and pruned perplexity, lower the artifact to the engine, verify parity, print a summary.

This file maps flags to stage configs and calls ``armor_export.pipeline``; nothing else.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

from engines import LOWERINGS

ENGINES = tuple(LOWERINGS)  # the registry's names (importing ``engines`` loads no backend)
DEFAULT_OUT = Path("armor-out")
MAX_SEED = 2**63 - 1


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and what is wrong) instead of the usage block; exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def integer(low: int, high: int | None = None, multiple: int = 1):
    """argparse type: an integer in [low, high] (and a multiple of ``multiple``)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low or (high is not None and v > high) or v % multiple:
            what = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {'a multiple of ' + str(multiple) + ' ' if multiple > 1 else ''}"
                                             f"{what}, got {v}")
        return v
    return parse


def number(low: float, high: float, *, low_open: bool = True):
    """argparse type: a finite float in (low, high] (``low_open``) or [low, high]."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or (v <= low if low_open else v < low) or v > high:
            raise argparse.ArgumentTypeError(f"must be a finite number in {'(' if low_open else '['}{low:g}, "
                                             f"{high:g}], got {text}")
        return v
    return parse


def device(text: str) -> str:
    """argparse type: ``cpu`` or an available ``cuda[:N]`` (checked before any work)."""
    if text == "cpu":
        return text
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device for the solver; use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise argparse.ArgumentTypeError(f"{text}: {why} (torch {torch.__version__}); use --device cpu or "
                                         f"install a CUDA build of torch")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return text


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error (also: ARMOR_DEBUG=1)")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")


def _add_calib(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-text", default=None, help=".txt file or folder (default: Shakespeare calibration split)")
    g.add_argument("--calib-samples", type=integer(1), default=64, help="windows (default 64)")
    g.add_argument("--calib-seqlen", type=integer(2), default=512, help="tokens per window (default 512)")
    g.add_argument("--calib-mode", choices=("dense", "sequential"), default="dense",
                   help="dense: one pass through the dense model (the paper's); sequential: blocks see pruned inputs")
    g.add_argument("--seed", type=integer(0, MAX_SEED), default=0, help="seed of window sampling and of the solver")


def _add_solver(p: argparse.ArgumentParser, default_method: str = "armor") -> None:
    from solver.config import DEFAULT_PRESET, OBJECTIVES, PRESETS, SELECTIONS
    from solver.methods import METHODS

    g = p.add_argument_group("solver")
    g.add_argument("--method", choices=sorted(METHODS), default=default_method)
    g.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="quality (default): block-hessian objective, 150 iterations, then the output refit with "
                        "its Hessian shrunk toward diag H (the lowest perplexity in and out of the calibration "
                        "domain; full calibration statistics); cpu: the paper's proxy, 300 iterations, h only; "
                        "paper: b=128, 20000 iterations (the paper's runs)")
    g.add_argument("--block-size", type=integer(4, multiple=4), default=None,
                   help="ARMOR block size b (overrides the preset)")
    g.add_argument("--iterations", type=integer(0), default=None, help="ARMOR iterations (overrides the preset)")
    g.add_argument("--lr", type=number(0, 1), default=None, help="Adam learning rate (overrides the preset)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="Adam step-size schedule (overrides the preset)")
    g.add_argument("--sparse-rounds", type=integer(1), default=None,
                   help="exact sparse-core rounds per ARMOR iteration (overrides the preset)")
    g.add_argument("--selection", choices=SELECTIONS, default=None, help="sparse-core group selection rule")
    g.add_argument("--patience", type=integer(1), default=None, help="early-stop patience in iterations (default 100)")
    g.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="ARMOR proxy: diag (the paper's, default); block-hessian (also the input correlations "
                        "inside each b x b block; needs H's b x b diagonal blocks from calibration)")
    g.add_argument("--hessian-damp", type=number(0, 1e6), default=None,
                   help="block objectives and the refit: damping added to H, relative to mean(diag H) "
                        "(default 0.01)")
    g.add_argument("--refit", choices=("none", "output"), default=None,
                   help="ARMOR: after the BCD, refit S's kept values, A and B to each layer's output error under "
                        "the full input Hessian, mask fixed (output; needs full calibration statistics). "
                        "Default none (the specified solver)")
    g.add_argument("--refit-rounds", type=integer(1), default=None,
                   help="--refit output: rounds of (values, A, B) refits (default 6)")
    g.add_argument("--refit-shrink", type=number(0, 1, low_open=False), default=None,
                   help="--refit output: lambda in [0, 1] of the refit's Hessian (1 - lambda) H + lambda "
                        "T (shrinks the input correlations fitted to the calibration text)")
    g.add_argument("--refit-shrink-to", choices=("diag", "block"), default=None,
                   help="--refit-shrink's target T: diag H (default) or H's b x b diagonal blocks")
    g.add_argument("--device", type=device, default="cpu", help="device for the solver math (cpu, cuda)")
    g.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="do not prune linears whose name matches (repeatable), e.g. 'model.layers.0.*'")
    g.add_argument("--fuse", type=fuse_kinds, default=(), metavar="GROUPS",
                   help="solve each q/k/v (qkv) and/or gate/up (gate_up) group as ONE stacked layer with a shared "
                        "input factor B, e.g. --fuse qkv,gate_up; the PyTorch runtime runs it as one fused linear and "
                        "a split (the other engines, for now, as separate linears sharing B). Default none (every projection its own B)")


def fuse_kinds(spec: str) -> tuple[str, ...]:
    from armor_export.adapters import parse_fuse

    try:
        return parse_fuse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--fuse {spec}: ")) from None


def _add_eval(p: argparse.ArgumentParser) -> None:
    from armor_export.corpus import CORPORA

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", action="append", default=[], metavar="PATH",
                   help=".txt file or folder to evaluate on (repeatable; default: the registered corpora)")
    g.add_argument("--eval-corpus", action="append", default=None, metavar="NAMES",
                   help=f"registered corpora, comma-separated, 'all' or 'none' (repeatable): "
                        f"{', '.join(f'{c.name} ({c.domain})' for c in CORPORA.values())}. "
                        f"Default: all of them, unless --eval-text is given")
    g.add_argument("--eval-windows", type=integer(1), default=None,
                   help="windows per text (default: 32 for a text; per corpus: "
                        f"{', '.join(f'{c.name} {c.run_windows}' for c in CORPORA.values())})")
    g.add_argument("--eval-seqlen", type=integer(2), default=512, help="tokens per window (default 512)")


def _add_out(p: argparse.ArgumentParser, default: Path | None) -> None:
    p.add_argument("--out", type=Path, default=default, required=default is None, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="armor-export", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES, default=None, help="one-shot run ending with this engine")
    _add_debug(p)
    sub = p.add_subparsers(dest="command")

    pr = sub.add_parser("prune", help="calibrate and solve; write a factor artifact")
    _add_model(pr), _add_calib(pr), _add_solver(pr), _add_out(pr, None)
    sc = pr.add_argument_group("scale and reliability")
    sc.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="checkpoint finished layers in OUT.partial/ and reuse them after a crash (default on)")
    sc.add_argument("--layer-by-layer", action="store_true",
                    help="load one decoder layer at a time (bounded memory; dense calibration only)")

    ev = sub.add_parser("eval", help="perplexity of a dense model (--model) or of an artifact (--artifact)")
    _add_model(ev), _add_eval(ev)
    ev.add_argument("--artifact", type=Path, default=None, help="artifact directory to evaluate")
    ev.add_argument("--json", type=Path, default=None, help="also write the result here")

    ex = sub.add_parser("export", help="lower an artifact to an engine")
    ex.add_argument("--artifact", type=Path, required=True)
    ex.add_argument("--engine", dest="sub_engine", choices=ENGINES, required=True)
    ex.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="engine precision")
    _add_out(ex, None)

    ve = sub.add_parser("verify", help="parity of an exported engine against the artifact's PyTorch runtime")
    ve.add_argument("--artifact", type=Path, required=True)
    ve.add_argument("--engine", dest="sub_engine", choices=ENGINES, required=True)
    ve.add_argument("--engine-dir", type=Path, required=True)
    ve.add_argument("--report-dir", type=Path, default=None, help="where parity.json/.md go (default: engine dir)")
    _add_eval(ve)

    rp = sub.add_parser("report", help="summarise an artifact's manifest")
    rp.add_argument("--artifact", type=Path, required=True)

    run = sub.add_parser("run", help="prune -> eval -> export -> verify (the one-shot form)")
    for q in (p, run):
        _add_model(q), _add_calib(q), _add_solver(q), _add_eval(q), _add_out(q, DEFAULT_OUT)
    run.add_argument("--engine", dest="sub_engine", choices=ENGINES, default=None)
    for q in (pr, ev, ex, ve, rp, run):
        _add_debug(q)
    return p


def solver_config(a):
    from armor_export.config import solver_settings

    flags = ("block_size", "iterations", "lr", "selection", "patience", "sparse_rounds", "lr_schedule", "objective",
             "hessian_damp", "refit", "refit_rounds", "refit_shrink", "refit_shrink_to")  # flag name = setting
    return solver_settings(a.preset, method=a.method, seed=a.seed, device=a.device,
                           **{f: getattr(a, f) for f in flags})


def calib_config(a):
    from armor_export.config import CalibConfig

    return CalibConfig(text=a.calib_text, samples=a.calib_samples, seqlen=a.calib_seqlen, seed=a.seed,
                       mode=a.calib_mode)


def eval_configs(a) -> list:
    """One EvalConfig per --eval-text and per --eval-corpus name, texts first."""
    from armor_export.corpus import parse_corpus_list
    from armor_export.eval_suite import eval_configs as build

    corpora = None if a.eval_corpus is None else tuple(n for spec in a.eval_corpus for n in parse_corpus_list(spec))
    return build(a.eval_text, corpora, windows=a.eval_windows, seqlen=a.eval_seqlen)


def eval_config(a):
    """The first evaluation text: the engines' parity check reads its windows."""
    return eval_configs(a)[0]


def cmd_prune(a) -> int:
    """Also the torchrun entry: ``torchrun --nproc-per-node N -m armor_export prune ...``."""
    from armor_export import pipeline, report, shard

    cfg, calib = solver_config(a), calib_config(a)  # validate options before joining the process group
    dist = shard.init_from_env(a.device)
    try:
        out = pipeline.prune(a.model, cfg, calib, a.out, ignore=tuple(a.ignore), overwrite=a.overwrite,
                             resume=a.resume, layerwise=a.layer_by_layer, dist=dist, fuse=a.fuse)
        if dist.main:
            report.print_artifact(out)
    finally:
        dist.close()
    return 0


def cmd_eval(a) -> int:
    from armor_export import pipeline
    from armor_export.eval_suite import evaluate_all

    if a.artifact is not None and a.model is not None:
        raise ValueError("eval: pass either --model (a dense model) or --artifact (a pruned artifact, which "
                         "carries its own config and tokenizer), not both")
    cfgs = eval_configs(a)
    if a.artifact is not None:
        model, tok, _ = pipeline.load_artifact_model(a.artifact)  # checks every file's hash first
        what = str(a.artifact)
    else:
        from armor_export.source import load

        loaded = load(a.model)
        model, tok, what = loaded.model, loaded.tokenizer, str(loaded.folder)
    from armor_export.config import check_positions

    check_positions(model.config, eval_seqlen=a.eval_seqlen)  # before any text is tokenised into windows
    evals = evaluate_all(model, tok, cfgs, what=what)
    res = {"model": what, "perplexity": {k: v["perplexity"] for k, v in evals.items()}, "evals": evals}
    print(json.dumps(res, allow_nan=False))
    if a.json:
        from armor_export.fsutil import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=2, allow_nan=False) + "\n", flag="--json")
    return 0


PARITY_WINDOWS = 4  # verify: held-out windows (of --eval-seqlen tokens) compared engine vs PyTorch


def parity_tokens(artifact: Path, ecfg) -> tuple[tuple[int, ...], ...]:
    """The held-out text tokenised with the artifact's tokenizer, for ExportConfig.parity_tokens."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from armor_export import pipeline

    tok = AutoTokenizer.from_pretrained(artifact, local_files_only=True)
    ids = pipeline.eval_windows(tok, replace(ecfg, windows=min(ecfg.windows, PARITY_WINDOWS))).token_ids
    return tuple(tuple(int(t) for t in row) for row in ids.tolist())


def cmd_export(a) -> int:
    from armor_export import fsutil
    from armor_export.artifact import check_artifact
    from engines import check_available, get_lowering
    from engines.base import ExportConfig

    check_available(a.sub_engine)
    check_artifact(a.artifact)
    cfg = ExportConfig(dtype=a.dtype, overwrite=a.overwrite)
    low = get_lowering(a.sub_engine)
    low.requires(a.artifact, cfg)
    fsutil.check_output(a.out, overwrite=a.overwrite, inputs=(a.artifact,))
    with fsutil.output_lock(a.out):
        path = low.lower(a.artifact, a.out, cfg)
    print(f"wrote {path}")
    return 0


def cmd_verify(a) -> int:
    from armor_export.artifact import check_artifact
    from armor_export.config import check_positions, model_config
    from armor_export.hashes import verify_hashes
    from engines import check_available, get_lowering
    from engines.base import ExportConfig

    check_available(a.sub_engine)
    check_artifact(a.artifact)
    check_positions(model_config(a.artifact), eval_seqlen=a.eval_seqlen)
    verify_hashes(a.engine_dir)  # the engine folder's files.sha256 first: parity of a modified folder means nothing
    cfg = ExportConfig(report_dir=a.report_dir, parity_tokens=parity_tokens(a.artifact, eval_config(a)))
    res = get_lowering(a.sub_engine).verify(a.artifact, a.engine_dir, cfg)
    print(json.dumps({"passed": res.get("passed"), "report": res.get("report_path")}))
    return 0 if res.get("passed") else 1


def cmd_report(a) -> int:
    from armor_export import report

    report.print_artifact(a.artifact)
    return 0


def cmd_run(a) -> int:
    from armor_export import fsutil

    engine = getattr(a, "sub_engine", None) or a.engine
    cfgs = solver_config(a), calib_config(a), eval_configs(a)  # every option checked before any work
    low = None
    if engine is not None:  # the engine's library and family/feature checks run before any work
        from armor_export.models import resolve_model
        from engines import check_available, get_lowering
        from engines.base import ExportConfig

        check_available(engine)
        low = get_lowering(engine)
        low.requires(resolve_model(a.model), ExportConfig())
    inputs = (a.model, a.calib_text, *a.eval_text)
    with fsutil.run_folder(a.out, overwrite=a.overwrite, inputs=inputs) as out:
        return _run(a, out, engine, low, *cfgs)


def _run(a, out: Path, engine: str | None, low, scfg, ccfg, ecfgs) -> int:
    from armor_export import pipeline, report, source
    from armor_export.eval_suite import prepare, score
    from armor_export.config import check_positions
    from engines.base import ExportConfig
    from solver.methods import stats_needed

    t0 = time.perf_counter()
    summary: dict = {"engine": engine, "peak_rss_mb": {}}
    loaded = source.load(a.model)
    calibrates = stats_needed(scfg) != "none"
    check_positions(loaded.model.config, calib_seqlen=ccfg.seqlen if calibrates else None, eval_seqlen=ecfgs[0].seqlen)
    source.prunable(loaded, scfg, tuple(a.ignore))  # block size, 2:4 shapes, --ignore: before the dense eval
    texts = prepare(loaded.tokenizer, ecfgs)  # the pruned model keeps the tokenizer: tokenise once
    # One model in memory at a time: dense (eval, then prune), pruned (eval), then the engine's own.
    summary["dense"] = score(loaded.model, texts, desc="perplexity (dense)", what=str(loaded.folder))
    _stage_done(summary, "dense eval")
    art = pipeline.prune(a.model, scfg, ccfg, out / "artifact", ignore=tuple(a.ignore),
                         overwrite=True, loaded=loaded, fuse=a.fuse)
    del loaded
    _stage_done(summary, "prune")
    model, _, _ = pipeline.load_artifact_model(art)
    summary["pruned"] = score(model, texts, desc="perplexity (pruned)", what=str(art))
    del model
    _stage_done(summary, "pruned eval")
    if low is not None:
        engine_dir = low.lower(art, out / engine, ExportConfig(overwrite=True))
        _stage_done(summary, "lower")
        summary["verify"] = low.verify(art, engine_dir, ExportConfig(report_dir=out / engine,
                                                                     parity_tokens=parity_tokens(art, ecfgs[0])))
        _stage_done(summary, "verify")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    report.write_run_summary(out, art, summary)
    report.print_run_summary(art, summary)
    ok = summary.get("verify", {}).get("passed", True)
    return 0 if ok else 1


def _stage_done(summary: dict, stage: str) -> None:
    """Release what the stage left (cycles included) and record the process's peak RSS so far (MB): the
    first stage whose number rises is the one that set the peak."""
    import gc
    import resource

    gc.collect()
    summary["peak_rss_mb"][stage] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> int:
    """Every error ends here: one line and exit code 2 for what a user can fix (armor_export.errors), the
    traceback only with --debug or ARMOR_DEBUG=1."""
    from armor_export.errors import debug_requested, user_message

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    handlers = {"prune": cmd_prune, "eval": cmd_eval, "export": cmd_export, "verify": cmd_verify,
                "report": cmd_report, "run": cmd_run, None: cmd_run}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; no partial output was left under the final name", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become messages
        if debug_requested(getattr(args, "debug", False)):
            raise
        code, line = user_message(e)
        print(f"armor-export: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
