"""Generalisation of the output refit (issue 17): why it fits the calibration domain, and what fixes it.

    python -m benchmarks.generalisation stats  --cache results/gen_stats      # one calibration pass, cached
    python -m benchmarks.generalisation layers --cache results/gen_stats --blocks 3,15,27 --variants ...
    python -m benchmarks.generalisation ppl    --cache results/gen_stats --variants ... --out results/gen_ppl.json

``stats`` collects the full input Hessian of every linear on three sets of windows and saves them: ``fit`` (the
first 48 of the default 64 x 512 Shakespeare calibration windows), ``ho`` (the other 16: held-out windows of the
calibration domain) and ``ood`` (16 random windows of a text of another domain, ``--ood-text``; used only as a
layer-wise diagnostic, never to fit). The default calibration's H is the token-weighted mean of fit and ho.

``layers`` refits the layers of a few decoder blocks from NoWag-P's mask (A = B = I, as
benchmarks/refit_ablation.py does) with each refit variant, fitted on H_fit, and prints each variant's mean output
loss under H_fit, H_ho and H_ood (1 = all-zero weight): the layer-wise gap between fit and ho is the overfitting to
the calibration windows, the one to ood the overfitting to their domain.

``ppl`` refits every linear with each variant on the whole calibration H (fit + ho) and scores the model on every
evaluation corpus (token perplexity, 32 x 512 windows, fp32). A variant is ``key=value,...`` over
``shrink`` (lambda of H_lambda = (1 - lambda) H + lambda blockdiag_b(H)), ``damp`` (relative to mean diag H),
``rounds``, ``PROJ.shrink`` (lambda for the linears named PROJ, e.g. ``down_proj.shrink=0.5``; ``shrink`` for the
rest), ``viters`` / ``witers`` (the refit's value / input-wrapper CG steps per round); several variants are
separated by ``;``. ``--start bcd:PRESET`` starts from the BCD of a preset (its objective, iterations, step and
sparse rounds, no refit), ``--start bcd:PRESET:ROUNDS`` with that many sparse-core rounds per iteration.
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
from armor_export.calibration import TokenWindows, windows
from armor_export.config import CalibConfig
from armor_export.corpus import text_files

FIT_WINDOWS = 48  # of the default 64 calibration windows; the other 16 are the held-out ones


def log(msg: str) -> None:
    print(f"[generalisation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def subset(tw: TokenWindows, sl: slice) -> TokenWindows:
    return TokenWindows(tw.token_ids[sl].contiguous(), tw.source, tw.seed, tw.total_tokens)


def cmd_stats(a) -> None:
    loaded = source.load(a.model)
    fam = loaded.family
    names = target_names(fam, len(loaded.model.get_submodule(fam.layers_path)))
    calib = calibrate.calibration_windows(loaded.tokenizer, CalibConfig())
    ood = windows(loaded.tokenizer, text_files(a.ood_text), 16, 512, seed=1, what="ood")
    sets = {"fit": subset(calib, slice(0, FIT_WINDOWS)), "ho": subset(calib, slice(FIT_WINDOWS, None)), "ood": ood}
    out = Path(a.cache)
    out.mkdir(parents=True, exist_ok=True)
    for key, tw in sets.items():
        t0 = time.perf_counter()
        st = calibrate.collect_stats(loaded, names, tw, full=True, progress=False)
        torch.save({n: {"H": s.H, "h": s.h, "n": s.n_tokens} for n, s in st.items()}, out / f"{key}.pt")
        log(f"{key}: {tw.token_ids.shape[0]} windows, full H of {len(names)} linears in "
            f"{time.perf_counter() - t0:.0f} s")
        del st
    (out / "meta.json").write_text(json.dumps({"calibration_sha256": calib.sha256, "ood_sha256": ood.sha256,
                                               "ood_text": a.ood_text, "fit_windows": FIT_WINDOWS}, indent=2))


def parse_variants(spec: str) -> list[dict]:
    """'shrink=0.5,damp=0.01;shrink=0' -> [{...}, {...}] with every key filled in."""
    out = []
    for v in filter(None, (x.strip() for x in spec.split(";"))):
        d = {"shrink": 0.0, "damp": 0.01, "rounds": 6, "to": "block", "viters": 10, "witers": 5}
        for kv in v.split(","):
            k, _, val = kv.partition("=")
            if k.endswith(".shrink") and k.count(".") == 1:  # per projection: down_proj.shrink=0.5
                d[k] = float(val)
                continue
            if k not in d:
                raise SystemExit(f"variant {v!r}: unknown key {k!r} (known: {sorted(d)})")
            d[k] = val if k == "to" else type(d[k])(val)
        out.append(d)
    return out


def load_set(cache: Path, key: str, names: list[str]) -> dict:
    st = torch.load(cache / f"{key}.pt", weights_only=True)
    return {n: st[n] for n in names}


def merged(a: dict, b: dict) -> dict:
    """The token-weighted mean of two sets' statistics: the whole calibration's H and h."""
    out = {}
    for n in a:
        na, nb = a[n]["n"], b[n]["n"]
        out[n] = {k: (a[n][k] * na + b[n][k] * nb) / (na + nb) for k in ("H", "h")} | {"n": na + nb}
    return out


def nowag_masks(loaded, names: list[str], st: dict) -> dict:
    from solver.config import SolverConfig
    from solver.stats import LayerStats
    stats = {n: LayerStats(st[n]["h"], st[n]["n"], st[n]["H"]) for n in names}
    return {n: lf.factors.S for n, lf in solving.solve_dense(loaded, names, stats, SolverConfig(method="nowag")).items()}


def refit_variant(W, A, S, B, H, v: dict, b: int, name: str):
    from solver.refit import refit, shrunk
    lam = v.get(f"{name.rsplit('.', 1)[-1]}.shrink", v["shrink"])
    Hs = shrunk(H, lam, b if v["to"] == "block" else 1)
    return refit(W, A, S, B, Hs, rounds=v["rounds"], damp=v["damp"], name=name, value_iters=v["viters"],
                 wrapper_iters=v["witers"])


def cmd_layers(a) -> None:
    from solver.blockdiag import identity_blocks, product
    from solver.refit import output_loss
    loaded = source.load(a.model)
    fam = loaded.family
    blocks = {int(x) for x in a.blocks.split(",")}
    names = [n for n in target_names(fam, len(loaded.model.get_submodule(fam.layers_path)))
             if int(n.split(".")[len(fam.layers_path.split("."))]) in blocks]
    cache = Path(a.cache)
    sets = {k: load_set(cache, k, names) for k in ("fit", "ho", "ood")}
    masks = nowag_masks(loaded, names, sets["fit"])
    b, rows = a.block_size, []
    for v in [None] + parse_variants(a.variants):
        t0, losses = time.perf_counter(), {k: [] for k in sets}
        for n in names:
            W = loaded.model.get_submodule(n).weight.detach().float()
            A, B = identity_blocks(W.shape[0] // b, b), identity_blocks(W.shape[1] // b, b)
            S = torch.where(masks[n] != 0, W, torch.zeros(()))
            if v is not None:
                A, S, B, _ = refit_variant(W, A, S, B, sets["fit"][n]["H"], v, b, n)
            Wh = product(A, S, B)
            for k in sets:
                losses[k].append(output_loss(W, Wh, sets[k][n]["H"]))
        proj = [n.rsplit(".", 1)[-1] for n in names]
        per = {p: {k: sum(x for x, q in zip(losses[k], proj) if q == p) / proj.count(p) for k in sets}
               for p in dict.fromkeys(proj)}
        r = {"variant": v or "nowag-p (no refit)", "seconds": round(time.perf_counter() - t0, 1),
             **{k: sum(x) / len(x) for k, x in losses.items()}, "per_projection": per}
        rows.append(r)
        log(json.dumps(r))
    print("| variant | fit | held-out (same domain) | ood | s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['fit']:.5f} | {r['ho']:.5f} | {r['ood']:.5f} | {r['seconds']} |")
    print("\n| variant | projection | fit | held-out | ood |\n|---|---|---|---|---|")
    for r in rows:
        for p, x in r["per_projection"].items():
            print(f"| {r['variant']} | {p} | {x['fit']:.5f} | {x['ho']:.5f} | {x['ood']:.5f} |")


def parse_evals(spec: str, windows: int | None = None) -> dict:
    """'shakespeare,tech,prose' -> {name: EvalConfig} of the registered corpora (armor_export/corpus.py), each with
    the run's window count (32 x 512 Shakespeare, 16 x 512 for the others: what the CLI's summary scores)."""
    from armor_export.config import EvalConfig
    from armor_export.corpus import get_corpus
    return {c: EvalConfig(corpus=c, windows=windows or get_corpus(c).run_windows) for c in filter(None, spec.split(","))}


def score(loaded, layers: dict | None, evals: dict) -> dict:
    from armor_export.evaluate import perplexity
    m = loaded.model if layers is None else solving.with_layers(loaded.model, layers)
    return {k: perplexity(m, tw.token_ids, batch_size=1, progress=False) for k, tw in evals.items()}


def start_factors(loaded, names, st, start: str, cache: Path, b: int) -> dict:
    """name -> (A, S, B): NoWag-P's mask with A = B = I ('nowag'), ARMOR's block-hessian BCD at N
    iterations without refit ('armor:N'), or a preset's BCD without its refit ('bcd:PRESET', 'bcd:PRESET:ROUNDS');
    the BCD results are cached in the stats folder."""
    from solver.blockdiag import identity_blocks
    from solver.config import PRESETS, SolverConfig
    from solver.stats import LayerStats
    if start == "nowag":
        masks = nowag_masks(loaded, names, st)
        out = {}
        for n in names:
            W = loaded.model.get_submodule(n).weight.detach().float()
            out[n] = (identity_blocks(W.shape[0] // b, b), torch.where(masks[n] != 0, W, torch.zeros(())),
                      identity_blocks(W.shape[1] // b, b))
        return out
    kind, _, rest = start.partition(":")
    if kind == "bcd":
        preset, _, rounds = rest.partition(":")
        if preset not in PRESETS:
            raise SystemExit(f"--start {start}: unknown preset {preset!r} (known: {sorted(PRESETS)})")
        over = {"sparse_rounds": int(rounds)} if rounds else {}
        cfg = SolverConfig(**{**PRESETS[preset], **over, "refit": "none", "refit_shrink": 0.0, "block_size": b})
        path = cache / f"bcd_{preset}_{cfg.objective}_{cfg.iterations}_r{cfg.sparse_rounds}_b{b}.pt"
    elif kind == "armor":
        iters = int(rest)
        cfg = SolverConfig(**{**PRESETS["cpu"], "objective": "block-hessian", "iterations": iters, "block_size": b})
        path = cache / f"armor_bh_{iters}.pt"
    else:
        raise SystemExit(f"--start {start}: expected nowag, armor:N or bcd:PRESET[:ROUNDS]")
    if path.exists():
        return torch.load(path, weights_only=True)
    stats = {n: LayerStats(st[n]["h"], st[n]["n"], st[n]["H"]) for n in names}
    t0 = time.perf_counter()
    layers = solving.solve_dense(loaded, names, stats, cfg)
    log(f"ARMOR BCD ({cfg.objective}, {cfg.iterations} iterations, {cfg.sparse_rounds} rounds): "
        f"{time.perf_counter() - t0:.0f} s")
    out = {n: (lf.factors.A_blocks, lf.factors.S, lf.factors.B_blocks) for n, lf in layers.items()}
    torch.save(out, path)
    return out


def cmd_ppl(a) -> None:
    from armor_export.artifact import LayerFactors
    from solver.factors import Factorization
    loaded = source.load(a.model)
    fam = loaded.family
    names = target_names(fam, len(loaded.model.get_submodule(fam.layers_path)))
    cache = Path(a.cache)
    evals = {k: pipeline.eval_windows(loaded.tokenizer, c) for k, c in parse_evals(a.evals, a.eval_windows).items()}
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {"runs": []}
    res["evaluation_sha256"] = {k: tw.sha256 for k, tw in evals.items()}

    def record(r):
        res["runs"].append(r)
        log(json.dumps(r))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")

    if a.dense:
        record({"run": "dense", "ppl": score(loaded, None, evals)})
    st = merged(load_set(cache, "fit", names), load_set(cache, "ho", names))
    b = a.block_size
    starts = start_factors(loaded, names, st, a.start, cache, b)
    if a.no_refit:
        layers = {n: LayerFactors(Factorization(S, A, B).validated(n), source.bias_of(loaded, n), {})
                  for n, (A, S, B) in starts.items()}
        record({"run": f"{a.start} (no refit)", "ppl": score(loaded, layers, evals)})
    for v in parse_variants(a.variants):
        t0, layers, before, after = time.perf_counter(), {}, [], []
        for n in names:
            W = loaded.model.get_submodule(n).weight.detach().float()
            A, S, B = starts[n]
            A, S, B, info = refit_variant(W, A, S, B, st[n]["H"], v, b, n)
            layers[n] = LayerFactors(Factorization(S, A, B).validated(n), source.bias_of(loaded, n), {})
            before.append(info["loss_before"])
            after.append(info["loss_after"])
        secs = round(time.perf_counter() - t0, 1)
        record({"run": f"{a.start} + refit", "variant": v, "refit_seconds": secs,
                "mean_loss_before": sum(before) / len(before), "mean_loss_after": sum(after) / len(after),
                "ppl": score(loaded, layers, evals)})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("stats", "layers", "ppl"))
    p.add_argument("--model", default=None)
    p.add_argument("--cache", default="results/gen_stats")
    p.add_argument("--ood-text", default=None, help="stats: a text of another domain (file or folder)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--blocks", default="3,15,27", help="layers: the decoder blocks whose linears are refitted")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--variants", default="shrink=0", help="refit variants, 'key=value,...;...' (see above)")
    p.add_argument("--evals", default="shakespeare,tech,prose", help="ppl: registered corpora to score on")
    p.add_argument("--eval-windows", type=int, default=None, help="ppl: windows per corpus (default: the run's)")
    p.add_argument("--start", default="nowag",
                   help="ppl: 'nowag', 'armor:ITERATIONS' (block-hessian BCD) or 'bcd:PRESET[:ROUNDS]'")
    p.add_argument("--no-refit", action="store_true", help="ppl: also score the start factors")
    p.add_argument("--dense", action="store_true", help="ppl: also score the dense model")
    p.add_argument("--out", default="results/gen_ppl.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    {"stats": cmd_stats, "layers": cmd_layers, "ppl": cmd_ppl}[a.command](a)


if __name__ == "__main__":
    main()
