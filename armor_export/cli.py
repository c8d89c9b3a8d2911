"""Command line: ``armor-export {prune, eval, export, verify, report, run}`` and the one-shot form
``armor-export [--engine onnx|tensorrt|trtllm]`` (= ``run``): prune the model with ARMOR, evaluate
dense and pruned perplexity, lower the artifact to the engine, verify parity, print a summary.

This file maps flags to stage configs and calls ``armor_export.pipeline``; nothing else.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ENGINES = ("onnx", "tensorrt", "trtllm")
DEFAULT_OUT = Path("armor-out")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")


def _add_calib(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-text", default=None, help=".txt file or folder (default: Shakespeare calibration split)")
    g.add_argument("--calib-samples", type=int, default=64, help="windows (default 64)")
    g.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--calib-mode", choices=("dense", "sequential"), default="dense",
                   help="dense: one pass through the dense model (the paper's); sequential: blocks see pruned inputs")
    g.add_argument("--seed", type=int, default=0, help="seed of window sampling and of the solver")


def _add_solver(p: argparse.ArgumentParser, default_method: str = "armor") -> None:
    from solver.config import DEFAULT_PRESET, PRESETS, SELECTIONS
    from solver.methods import METHODS

    g = p.add_argument_group("solver")
    g.add_argument("--method", choices=sorted(METHODS), default=default_method)
    g.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="quality (default): block-hessian objective, 150 iterations, then the output refit with "
                        "its Hessian shrunk toward diag H (the lowest perplexity in and out of the calibration "
                        "domain; full calibration statistics); cpu: the paper's proxy, 300 iterations, h only; "
                        "paper: b=128, 20000 iterations (the paper's runs)")
    g.add_argument("--block-size", type=int, default=None, help="ARMOR block size b (overrides the preset)")
    g.add_argument("--iterations", type=int, default=None, help="ARMOR iterations (overrides the preset)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (overrides the preset)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="Adam step-size schedule (overrides the preset)")
    g.add_argument("--sparse-rounds", type=int, default=None,
                   help="exact sparse-core rounds per ARMOR iteration (overrides the preset)")
    g.add_argument("--selection", choices=SELECTIONS, default=None, help="sparse-core group selection rule")
    g.add_argument("--patience", type=int, default=None, help="early-stop patience in iterations (default 100)")
    g.add_argument("--objective", choices=("diag", "block-hessian", "block-output"), default=None,
                   help="ARMOR proxy: diag (the paper's, default); block-hessian (also the input correlations "
                        "inside each b x b block); block-output (the layer's output error with H kept "
                        "block-diagonal). The block ones need full calibration statistics")
    g.add_argument("--hessian-damp", type=float, default=None,
                   help="block objectives and the refit: damping added to H, relative to mean(diag H) "
                        "(default 0.01)")
    g.add_argument("--refit", choices=("none", "output"), default=None,
                   help="ARMOR: after the BCD, refit S's kept values, A and B to each layer's output error under "
                        "the full input Hessian, mask fixed (output; needs full calibration statistics). "
                        "Default none (the specified solver)")
    g.add_argument("--refit-rounds", type=int, default=None,
                   help="--refit output: rounds of (values, A, B) refits (default 6)")
    g.add_argument("--refit-shrink", type=float, default=None,
                   help="--refit output: lambda in [0, 1] of the refit's Hessian (1 - lambda) H + lambda "
                        "T (shrinks the input correlations fitted to the calibration text)")
    g.add_argument("--refit-shrink-to", choices=("diag", "block"), default=None,
                   help="--refit-shrink's target T: diag H (default) or H's b x b diagonal blocks")
    g.add_argument("--device", default="cpu", help="device for the solver math (cpu, cuda)")
    g.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="do not prune linears whose name matches (repeatable), e.g. 'model.layers.0.*'")


def _add_eval(p: argparse.ArgumentParser) -> None:
    from armor_export.corpus import CORPORA

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", action="append", default=[], metavar="PATH",
                   help=".txt file or folder to evaluate on (repeatable; default: the registered corpora)")
    g.add_argument("--eval-corpus", action="append", default=None, metavar="NAMES",
                   help=f"registered corpora, comma-separated, 'all' or 'none' (repeatable): "
                        f"{', '.join(f'{c.name} ({c.domain})' for c in CORPORA.values())}. "
                        f"Default: all of them, unless --eval-text is given")
    g.add_argument("--eval-windows", type=int, default=None,
                   help="windows per text (default: 32 for a text; per corpus: "
                        f"{', '.join(f'{c.name} {c.run_windows}' for c in CORPORA.values())})")
    g.add_argument("--eval-seqlen", type=int, default=512, help="tokens per window (default 512)")


def _add_out(p: argparse.ArgumentParser, default: Path | None) -> None:
    p.add_argument("--out", type=Path, default=default, required=default is None, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="armor-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES, default=None, help="one-shot run ending with this engine")
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
    return p


def solver_config(a):
    from solver.config import PRESETS, SolverConfig

    d = dict(PRESETS[a.preset], method=a.method, seed=a.seed, device=a.device)
    for flag, key in (("block_size", "block_size"), ("iterations", "iterations"), ("lr", "lr"),
                      ("selection", "selection"), ("patience", "patience"),
                      ("sparse_rounds", "sparse_rounds"), ("lr_schedule", "lr_schedule"),
                      ("objective", "objective"), ("hessian_damp", "hessian_damp"), ("refit", "refit"),
                      ("refit_rounds", "refit_rounds"), ("refit_shrink", "refit_shrink"),
                      ("refit_shrink_to", "refit_shrink_to")):
        if getattr(a, flag) is not None:
            d[key] = getattr(a, flag)
    return SolverConfig(**d)


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
                             resume=a.resume, layerwise=a.layer_by_layer, dist=dist)
        if dist.main:
            report.print_artifact(out)
    finally:
        dist.close()
    return 0


def cmd_eval(a) -> int:
    from armor_export import pipeline
    from armor_export.eval_suite import evaluate_all

    cfgs = eval_configs(a)
    if a.artifact is not None:
        model, tok, _ = pipeline.load_artifact_model(a.artifact)
        what = str(a.artifact)
    else:
        loaded = pipeline.load(a.model)
        model, tok, what = loaded.model, loaded.tokenizer, str(loaded.folder)
    evals = evaluate_all(model, tok, cfgs)
    res = {"model": what, "perplexity": {k: v["perplexity"] for k, v in evals.items()}, "evals": evals}
    print(json.dumps(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def cmd_export(a) -> int:
    from engines import get_lowering

    path = get_lowering(a.sub_engine).lower(a.artifact, a.out, dtype=a.dtype, overwrite=a.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_verify(a) -> int:
    from engines import get_lowering

    res = get_lowering(a.sub_engine).verify(a.artifact, a.engine_dir, report_dir=a.report_dir,
                                            eval_cfg=eval_config(a))
    print(json.dumps({"passed": res.get("passed"), "report": res.get("report_path")}))
    return 0 if res.get("passed") else 1


def cmd_report(a) -> int:
    from armor_export import report

    report.print_artifact(a.artifact)
    return 0


def cmd_run(a) -> int:
    from armor_export import pipeline, report

    from armor_export.eval_suite import prepare, score

    engine = getattr(a, "sub_engine", None) or a.engine
    ecfgs = eval_configs(a)
    out: Path = a.out
    if out.exists() and not a.overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict = {"engine": engine}
    loaded = pipeline.load(a.model)
    texts = prepare(loaded.tokenizer, ecfgs)  # the pruned model keeps the tokenizer: tokenise once
    summary["dense"] = score(loaded.model, texts, desc="perplexity (dense)")
    art = pipeline.prune(a.model, solver_config(a), calib_config(a), out / "artifact", ignore=tuple(a.ignore),
                         overwrite=True, loaded=loaded)
    del loaded
    model, _, _ = pipeline.load_artifact_model(art)
    summary["pruned"] = score(model, texts, desc="perplexity (pruned)")
    del model
    if engine is not None:
        from engines import get_lowering

        low = get_lowering(engine)
        engine_dir = low.lower(art, out / engine, overwrite=True)
        summary["verify"] = low.verify(art, engine_dir, report_dir=out / engine, eval_cfg=ecfgs[0])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    report.write_run_summary(out, art, summary)
    report.print_run_summary(art, summary)
    ok = summary.get("verify", {}).get("passed", True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"prune": cmd_prune, "eval": cmd_eval, "export": cmd_export, "verify": cmd_verify,
                "report": cmd_report, "run": cmd_run, None: cmd_run}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; no partial output was left under the final name", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"armor-export: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
