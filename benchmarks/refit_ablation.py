"""Ablation of the output refit: how much of ARMOR's --refit output gain is the refit, how much the BCD.

    python -m benchmarks.refit_ablation [--methods nowag,sparsegpt] [--out results/refit_ablation.json]

Applies ``solver.refit.refit`` (the same function and settings as ``--refit output``, A = B = I to start) to
baselines' factors: NoWag-P's mask refitted is ARMOR's refit without its BCD; SparseGPT's mask refitted is
SparseGPT's own mask with ARMOR's wrappers. Same calibration and held-out windows as benchmarks/quality.py
(defaults of ``CalibConfig``/``EvalConfig``, one dense pass with full H); prints and writes, per method,
perplexity before and after, mean output loss before and after, and the refit's time. ARMOR with the refit is
benchmarks/quality.py's run (``--objective block-hessian --refit output``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from armor_export import calibrate, pipeline, solving, source
from armor_export.adapters import target_names
from armor_export.artifact import LayerFactors
from armor_export.config import CalibConfig, EvalConfig
from armor_export.evaluate import perplexity
from solver.blockdiag import identity_blocks
from solver.config import SolverConfig
from solver.factors import Factorization
from solver.refit import refit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--methods", default="nowag,sparsegpt")
    p.add_argument("--block-size", type=int, default=32, help="b of the refitted wrappers")
    p.add_argument("--out", default="results/refit_ablation.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calib-text", default=None)
    p.add_argument("--calib-samples", type=int, default=CalibConfig.samples)
    p.add_argument("--calib-seqlen", type=int, default=CalibConfig.seqlen)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--eval-windows", type=int, default=EvalConfig.windows)
    p.add_argument("--eval-seqlen", type=int, default=EvalConfig.seqlen)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    log = lambda m: print(f"[refit-ablation {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa
    loaded = source.load(a.model)
    fam = loaded.family
    names = target_names(fam, len(loaded.model.get_submodule(fam.layers_path)))
    calib = calibrate.calibration_windows(loaded.tokenizer, CalibConfig(text=a.calib_text, samples=a.calib_samples,
                                                                       seqlen=a.calib_seqlen))
    ev = pipeline.eval_windows(loaded.tokenizer, EvalConfig(text=a.eval_text, windows=a.eval_windows,
                                                           seqlen=a.eval_seqlen))
    t0 = time.perf_counter()
    stats = calibrate.collect_stats(loaded, names, calib, full=True, progress=False)
    log(f"full-H calibration of {len(names)} linears in {time.perf_counter() - t0:.0f} s")
    cfg = SolverConfig(refit="output")  # the refit's settings as --refit output uses them
    b = a.block_size
    runs = []
    for method in a.methods.split(","):
        t0 = time.perf_counter()
        layers = solving.solve_dense(loaded, names, stats, SolverConfig(method=method))
        solve_s = time.perf_counter() - t0
        ppl_before = perplexity(solving.with_layers(loaded.model, layers), ev.token_ids, batch_size=1, progress=False)
        t0, refitted, before, after = time.perf_counter(), {}, [], []
        for n, lf in layers.items():
            W = loaded.model.get_submodule(n).weight.detach().float()
            A, S, B, info = refit(W, identity_blocks(W.shape[0] // b, b), lf.factors.S,
                                  identity_blocks(W.shape[1] // b, b), stats[n].H, rounds=cfg.refit_rounds,
                                  damp=cfg.hessian_damp, name=n)
            refitted[n] = LayerFactors(Factorization(S, A, B).validated(n), lf.bias, {})
            before.append(info["loss_before"])
            after.append(info["loss_after"])
        refit_s = time.perf_counter() - t0
        ppl_after = perplexity(solving.with_layers(loaded.model, refitted), ev.token_ids, batch_size=1, progress=False)
        r = {"method": method, "block_size": b, "refit_rounds": cfg.refit_rounds, "ppl_before": ppl_before,
             "ppl_after": ppl_after, "mean_output_loss_before": sum(before) / len(before),
             "mean_output_loss_after": sum(after) / len(after), "solve_seconds": round(solve_s, 1),
             "refit_seconds": round(refit_s, 1)}
        runs.append(r)
        log(json.dumps(r))
    res = {"schema": "armor-export/refit-ablation/v1", "calibration_sha256": calib.sha256,
           "evaluation_sha256": ev.sha256, "torch_threads": torch.get_num_threads(), "runs": runs}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    print("| method | ppl | + output refit | mean output loss | + output refit | refit s |\n|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['method']} | {r['ppl_before']:.3f} | {r['ppl_after']:.3f} | {r['mean_output_loss_before']:.5f} "
              f"| {r['mean_output_loss_after']:.5f} | {r['refit_seconds']} |")
    return res


if __name__ == "__main__":
    main()
