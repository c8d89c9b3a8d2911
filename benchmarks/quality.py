"""Quality benchmark: dense vs magnitude, Wanda, SparseGPT, NoWag-P and ARMOR 2:4 on one calibration set.

    python -m benchmarks.quality [--smoke] [--out results/quality.json] [--only PARTS] [--skip PARTS] [--modelopt]

Parts: ``dense`` (the unpruned model), ``main`` (every method, one-pass calibration), ``iters`` (ARMOR iteration
sweep), ``lr`` (Adam learning-rate sweep), ``rounds`` (sparse-core rounds per iteration), ``blocks`` (ARMOR
block-size sweep), ``sequential`` (one-pass vs sequential calibration), ``modelopt``
(NVIDIA ModelOpt cross-check in its own venv, only with --modelopt). One dense calibration pass (full H when a
method needs it; h = diag H; the calibrate stage, armor_export.calibrate) is shared by every one-pass method; each
method's layers are solved by the solve stage (armor_export.solving), put into a copy of the model
(``solving.with_layers``) and the copy is scored on every evaluation text (default: the registered corpora,
in-domain Shakespeare and out-of-domain technical / general English, armor_export.corpus.CORPORA; token
perplexity, mean of window means, fp32, batch 1; ``perplexity`` is the first text's, ``perplexities`` all).
Per run: perplexities, mean proxy loss (SolveReport ``loss_final``; 1 = all-zero weight),
A/B parameter overhead (``report.artifact_summary``), solve time. ARMOR's defaults come from
``solver.config.PRESETS["cpu"]`` at run time, under the CLI's rule (``armor_export.config.solver_settings``). Gap closed = (best baseline ppl - ARMOR ppl) / (best baseline ppl -
dense ppl), best baseline = the lowest one-pass baseline perplexity, per text. A main method ``armor:PRESET``
is ARMOR with that preset's settings (e.g. ``armor:quality``).

The JSON is rewritten after every run (``"partial": true`` until the end). ``--reuse`` takes runs from earlier JSONs
made on the same token windows, so parts can run in separate processes and be merged (``--reuse-only`` computes
nothing). ``--smoke`` builds a tiny random Llama (small BPE tokenizer) and corpus in a temporary folder and runs
every part in seconds. Prints a markdown table, writes the JSON, and prints the JSON as the last line.
The flags are benchmarks/quality_args.py's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from armor_export.adapters import target_names
from armor_export.artifact import LayerFactors
from armor_export.config import CalibConfig, solver_settings
from armor_export.corpus import parse_corpus_list
from armor_export.plan import every_layer
from armor_export.eval_suite import eval_configs, prepare
from armor_export.evaluate import perplexity
from armor_export.report import artifact_summary
from armor_export import calibrate, solving, source, writer
from benchmarks.modelopt_launch import run_modelopt
from benchmarks.quality_args import ROOT, parse_args
from benchmarks.quality_table import gap_closed, method_spec, ppls_str, shrink_key, table
from benchmarks.synth import make_tiny_model_dir, sample_text
from solver.config import PRESETS, SolverConfig
from solver.factors import Factorization
from solver.methods import stats_needed
from solver.objective import proxy_loss
from solver.stats import repair_h

DEFAULT_REFIT_ROUNDS = SolverConfig.refit_rounds  # runs recorded before the rounds were a benchmark setting

SCHEMA = "armor-export/quality/v1"
LABELS = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "nowag": "NoWag-P", "armor": "ARMOR"}


def _solver_commit() -> str | None:
    """HEAD's short hash, '+dirty' when solver/ has uncommitted changes (ARMOR results depend on it)."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--", "solver") else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


SOLVER_COMMIT = _solver_commit()


# ---------------------------------------------------------------- tiny model for --smoke
def make_smoke_inputs(root: Path) -> tuple[Path, Path, Path]:
    """A random tiny Llama folder (hidden 64, 2 layers, trained BPE tokenizer) and calib/eval text folders."""
    text = sample_text(80000)
    calib, held = root / "text" / "calib", root / "text" / "eval"
    for d, part in ((calib, text[: len(text) // 2]), (held, text[len(text) // 2:])):
        d.mkdir(parents=True, exist_ok=True)
        (d / "part.txt").write_text(part)
    model_dir = make_tiny_model_dir(root / "tiny-llama", intermediate_size=128, text=text)
    return model_dir, calib, held


# ---------------------------------------------------------------- one run = one set of pruned layers
def layer_summary(method: str, layers: dict, model, stats) -> dict:
    """Mean proxy losses, fallbacks and the A/B overhead, through the artifact manifest's summary."""
    entries = {}
    for name, lf in layers.items():
        info = dict(lf.info)
        if info.get("loss_final") is None and stats is not None:  # no report loss: compute it on the same h
            h, _ = repair_h(stats[name].h.float(), name)
            W = model.get_submodule(name).weight.detach().float()
            info["loss_final"] = proxy_loss(W, lf.factors.to_dense(), h)
        entries[name] = {"shape": list(lf.factors.S.shape), "block_size": lf.factors.block_size,
                         "loss_start": info.get("loss_start"), "loss_final": info.get("loss_final"),
                         "status": info.get("status", "ok"), "early_stopped": info.get("early_stopped")}
    s = artifact_summary({"method": method, "layers": entries})
    diag = [lf.info.get("notes", {}).get("diag_loss_final") for lf in layers.values()]
    return {"mean_loss": s["mean_loss_final"], "mean_loss_start": s["mean_loss_start"],
            # block objectives: the paper's diagonal proxy of the same factors (mean_loss is the solved objective)
            "mean_diag_loss": sum(diag) / len(diag) if diag and None not in diag else None,
            "param_overhead": s["param_overhead"], "fallback_layers": len(s["fallback_layers"]),
            "early_stopped": s["early_stopped"]}


class Bench:
    def __init__(self, args):
        self.args = args
        self.loaded = source.load(args.model)
        fam = self.loaded.family
        self.names = target_names(fam, len(self.loaded.model.get_submodule(fam.layers_path)))
        self.calib_cfg = CalibConfig(text=args.calib_text, samples=args.calib_windows, seqlen=args.calib_seqlen)
        self.calib = calibrate.calibration_windows(self.loaded.tokenizer, self.calib_cfg)
        corpora = None if args.eval_corpus is None else tuple(
            n for spec in args.eval_corpus for n in parse_corpus_list(spec))
        self.evs = {k: w for k, (_, w) in prepare(self.loaded.tokenizer, eval_configs(
            args.eval_text, corpora, windows=args.eval_windows, seqlen=args.eval_seqlen)).items()}
        self.ev = next(iter(self.evs.values()))  # the first text: gap closed, the ModelOpt cross-check
        d = solver_settings("cpu", block_size=args.block_size, iterations=args.iterations, lr=args.lr,
                            sparse_rounds=args.sparse_rounds)  # the CLI's rule: explicit settings over the preset
        self.b, self.iters, self.lr, self.rounds = d.block_size, d.iterations, d.lr, d.sparse_rounds
        self.stats, self.calib_seconds, self.cache, self.not_run = None, None, {}, []
        self.previous_runs, self.previous_modelopt, self.previous_dense = [], None, None
        for prev in args.reuse or ():
            self.load_previous(Path(prev), args.reuse_methods.split(","))
        planned = [method_spec(m) for m in (args.main_methods.split(",") if "main" in args.parts else [])] + (
            [("sparsegpt", {})] if "modelopt" in args.parts else [])
        needs = lambda m, kw: stats_needed(SolverConfig(  # noqa: E731
            method=m, objective=kw.get("objective", args.objective), refit=kw.get("refit", args.refit)))
        self.want_full = any(needs(m, kw) in ("full", "blocks") and not (not kw and self.has(m)) for m, kw in planned)

    @staticmethod
    def key(r: dict) -> tuple:
        armor = r["method"] == "armor"  # runs written before lr/rounds were recorded used lr 1e-4, 1 round
        return (r["method"], r["calibration"], r["block_size"], r["iterations"], r.get("sparsegpt_damp"),
                r.get("mask_only", False), r.get("lr", 1e-4) if armor else None,
                r.get("sparse_rounds", 1) if armor else None, r.get("objective", "diag") if armor else None,
                r.get("refit", "none") if armor else None,
                shrink_key(r.get("refit"), r.get("refit_shrink"), r.get("refit_shrink_to")),
                r.get("refit_rounds", DEFAULT_REFIT_ROUNDS) if armor and r.get("refit", "none") != "none" else None)

    def load_previous(self, path: Path, methods: list[str]) -> None:
        """Seed the cache with runs of ``methods`` from an earlier JSON made on the very same token windows."""
        prev = json.loads(path.read_text())
        self.previous_runs += [{**r, "from": str(path)} for r in prev["runs"]]
        self.previous_dense = self.previous_dense or (prev.get("dense") and {**prev["dense"], "from": str(path)})
        self.previous_modelopt = (prev.get("modelopt") and {**prev["modelopt"], "from": str(path)}
                                  or self.previous_modelopt)
        if prev["calibration"]["sha256"] != self.calib.sha256:
            raise SystemExit(f"--reuse {path}: its calibration windows differ from this run's (sha256)")
        theirs = {k: v["sha256"] for k, v in prev["evaluation"].get("texts", {}).items()}
        if theirs != {k: w.sha256 for k, w in self.evs.items()}:
            raise SystemExit(f"--reuse {path}: its evaluation texts {sorted(theirs) or '(one, before the corpora)'} "
                             f"or their windows differ from this run's {sorted(self.evs)} (sha256)")
        for r in prev["runs"]:
            if r["method"] in methods and not r.get("reused"):
                self.cache.setdefault(self.key(r), {**r, "from": str(path)})
        self.log(f"{len(self.cache)} reusable run(s) of {methods} after reading {path}")

    def has(self, method: str, mode: str = "dense", iterations: int | None = None) -> bool:
        """Whether the default-settings run of ``method`` is already known (e.g. from --reuse)."""
        it = self.iters if iterations is None else iterations
        return any(k[0] == method and k[1] == mode and k[2] in (None, self.b) and k[3] in (None, it)
                   and k[5] is False and k[6] in (None, self.lr) and k[7] in (None, self.rounds) for k in self.cache)

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def ppl(self, model) -> tuple[dict, float]:
        """{text: perplexity} over every evaluation text, and the seconds all of them took."""
        t0 = time.perf_counter()
        p = {k: perplexity(model, w.token_ids, batch_size=1, progress=False) for k, w in self.evs.items()}
        return p, round(time.perf_counter() - t0, 2)

    def get_stats(self, full: bool):
        """One dense pass; full H (which also gives h) when any method of this invocation needs it."""
        if self.stats is None or (full and self.stats[self.names[0]].H is None):
            full = full or self.args.full_stats or self.want_full
            stats = calibrate.calibrate(self.loaded, every_layer(self.names), self.calib, self.calib_cfg, full=full,
                                        progress=not self.args.quiet)
            self.stats, self.calib_seconds = stats.layers, round(stats.seconds, 2)
            self.log(f"calibration statistics ({'full H' if full else 'diag h'}) for {len(self.names)} linears "
                     f"in {self.calib_seconds} s")
        return self.stats

    def run(self, method: str, *, mode: str = "dense", block_size: int | None = None,
            iterations: int | None = None, damp: float | None = None, mask_only: bool = False,
            lr: float | None = None, rounds: int | None = None, objective: str | None = None,
            refit: str | None = None, shrink: float | None = None, shrink_to: str | None = None,
            refit_rounds: int | None = None, preset: str | None = None) -> dict:
        """One pruning run, scored; ``damp``/``mask_only`` give SparseGPT as ModelOpt runs it (see --modelopt)."""
        b = self.b if block_size is None else block_size
        it = self.iters if iterations is None else iterations
        lr = self.lr if lr is None else lr
        rounds = self.rounds if rounds is None else rounds
        objective = self.args.objective if objective is None else objective
        refit = self.args.refit if refit is None else refit
        refits = method == "armor" and refit != "none"  # the shrinkage exists only for ARMOR's refit
        shrink = (self.args.refit_shrink if shrink is None else shrink) if refits else 0.0
        shrink_to = self.args.refit_shrink_to if shrink_to is None else shrink_to
        refit_rounds = (self.args.refit_rounds if refit_rounds is None else refit_rounds) if refits else None
        damp = SolverConfig.sparsegpt_damp if (method == "sparsegpt" and damp is None) else damp
        key = (method, mode, b if method == "armor" else None, it if method == "armor" else None,
               damp if method == "sparsegpt" else None, mask_only, lr if method == "armor" else None,
               rounds if method == "armor" else None, objective if method == "armor" else None,
               refit if method == "armor" else None,
               shrink_key(refit, shrink, shrink_to), refit_rounds)
        if key in self.cache:
            return {**self.cache[key], "reused": True}
        if self.args.reuse_only:  # assembling earlier results: a missing run is reported, not computed
            self.not_run.append({"method": method, "calibration": mode, "block_size": key[2], "iterations": key[3],
                                 "lr": key[6], "sparse_rounds": key[7], "objective": key[8], "refit": key[9],
                                 "refit_shrink": shrink if refits else None})
            return None
        cfg = solver_settings(preset or "cpu", method=method, block_size=b, iterations=it, lr=lr, sparse_rounds=rounds,
                              objective=objective if method == "armor" else "diag",
                              refit=refit if method == "armor" else "none",
                              refit_shrink=shrink, refit_shrink_to=shrink_to, sparsegpt_damp=damp,
                              refit_rounds=refit_rounds or DEFAULT_REFIT_ROUNDS)
        stats = self.get_stats(stats_needed(cfg) in ("full", "blocks")) if mode == "dense" else None
        t0 = time.perf_counter()  # solve time excludes the shared one-pass calibration
        if mode == "dense":
            layers = solving.solve_dense(self.loaded, self.names, stats, cfg)
            if mask_only:  # keep the mask, drop the weight updates: W * (S != 0)
                layers = {n: LayerFactors(Factorization(torch.where(lf.factors.S != 0, self.loaded.weight(n), 0.0)),
                                          lf.bias, {**lf.info, "loss_final": None}) for n, lf in layers.items()}
        else:  # calibrate and solve block by block; the loaded model is the dense one again afterwards
            layers = solving.solve_sequential(self.loaded, self.names, self.calib, cfg,
                                              dataclasses.replace(self.calib_cfg, mode="sequential"), progress=False)
        model = solving.with_layers(self.loaded.model, layers)
        solve_s = round(time.perf_counter() - t0, 2)
        ppls, eval_s = self.ppl(model)
        ppl = next(iter(ppls.values()))
        del model
        label = f"ARMOR --preset {preset}" if preset else (
            LABELS[method] + ("" if damp in (None, SolverConfig.sparsegpt_damp) else f" damp {damp}")
                 + (" mask-only" if mask_only else "") + ("" if cfg.objective == "diag" else f" {cfg.objective}")
                 + ("" if cfg.refit == "none" else f" {cfg.refit}-refit")
                 + (f" shrink {cfg.refit_shrink:g} to {cfg.refit_shrink_to}"
                    if cfg.refit != "none" and cfg.refit_shrink else "")
                 + (f" {cfg.refit_rounds} refit rounds"
                    if cfg.refit != "none" and cfg.refit_rounds != DEFAULT_REFIT_ROUNDS else ""))
        r = {"method": method, "label": label, "calibration": mode,
             "block_size": b if method == "armor" else None, "iterations": it if method == "armor" else None,
             "lr": lr if method == "armor" else None, "sparse_rounds": rounds if method == "armor" else None,
             "objective": objective if method == "armor" else None, "refit": refit if method == "armor" else None,
             "refit_shrink": shrink if refits else None, "refit_shrink_to": shrink_to if refits and shrink else None,
             "refit_rounds": refit_rounds,
             "preset": preset, "perplexity": ppl, "perplexities": ppls, **layer_summary(method, layers, self.loaded.model, stats),
             "sparsegpt_damp": cfg.sparsegpt_damp if method == "sparsegpt" else None, "mask_only": mask_only,
             "solve_seconds": solve_s, "eval_seconds": eval_s, "solver_commit": SOLVER_COMMIT, "reused": False}
        assert self.key(r) == key
        self.cache[key] = r
        self.log(f"{label} ({mode}, b={r['block_size']}, it={r['iterations']}, lr={r['lr']}, "
                 f"rounds={r['sparse_rounds']}): ppl {ppls_str(ppls)}, "
                 f"loss {r['mean_loss']}, solve {solve_s} s, eval {eval_s} s")
        return r


def save(res: dict, path, *, partial: bool) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**res, "partial": partial}, indent=2) + "\n")
    tmp.replace(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_all = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        with tempfile.TemporaryDirectory(prefix="armor-quality-") as tmp:
            if args.smoke and args.model is None:
                args.model, ct, et = make_smoke_inputs(Path(tmp))
                args.calib_text, args.eval_text = args.calib_text or str(ct), args.eval_text or [str(et)]
                if args.eval_corpus is None:  # the smoke text and one registered corpus (stdlib: always there)
                    args.eval_corpus = ["tech"]
            bench = Bench(args)
            res = run_parts(bench, args, Path(args.out).parent, sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)
    res["seconds_total"] = round(time.perf_counter() - t_all, 1)
    save(res, args.out, partial=False)
    if not args.quiet:
        print(table(res["runs"], res["dense"]))
        g = res.get("gap_closed")
        if g and g["value"] is not None:
            print(f"\ngap closed (b={g['block_size']}, {g['iterations']} it): {100 * g['value']:.1f}% "
                  f"(best baseline {g['best_baseline']} {g['best_baseline_ppl']:.3f}, ARMOR {g['armor_ppl']:.3f}, "
                  f"dense {g['dense_ppl']:.3f}; target 60%)")
    print(json.dumps(res, separators=(",", ":")))
    return res


def run_parts(bench: Bench, args, out_dir: Path, argv: list[str]) -> dict:
    res = {"schema": SCHEMA, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
           "library_versions": writer.library_versions(), "solver_commit": SOLVER_COMMIT,
           "command": " ".join(["python -m benchmarks.quality", *argv]), "smoke": args.smoke, "parts": args.parts,
           "model": {"folder": str(bench.loaded.folder), "targets": len(bench.names)},
           "calibration": {**bench.calib.describe(), "mode": "dense one-pass, shared by all one-pass runs"},
           "evaluation": {**bench.ev.describe(), "metric": "token perplexity, exp(mean of window means), fp32, bs 1",
                          "texts": {k: w.describe() for k, w in bench.evs.items()}},
           "armor_defaults": {"preset_cpu": dict(PRESETS["cpu"]), "block_size": bench.b, "iterations": bench.iters,
                              "lr": bench.lr, "sparse_rounds": bench.rounds},
           "dense": None, "runs": [], "gap_closed": None, "sweeps": {}, "modelopt": None}
    if "dense" in args.parts:
        dense_ppls, dense_s = bench.ppl(bench.loaded.model)
        res["dense"] = {"perplexity": next(iter(dense_ppls.values())), "perplexities": dense_ppls,
                        "eval_seconds": dense_s}
        bench.log(f"dense ppl {ppls_str(dense_ppls)} ({dense_s} s)")
    res["dense"] = res["dense"] or bench.previous_dense
    dense_ppl = res["dense"] and res["dense"]["perplexity"]

    def add(group: str, r: dict | None) -> dict | None:
        if r is None:
            return None
        r = {**r, "group": group}
        res["runs"].append(r)
        save(res, args.out, partial=True)  # a run cut short keeps what it finished
        return r

    sweep_it = args.sweep_iterations  # None: the default iterations
    if "main" in args.parts:
        given = {"block_size": args.block_size, "iterations": args.iterations, "lr": args.lr,
                 "rounds": args.sparse_rounds}  # explicit flags win over a preset's numbers, as in the CLI
        main_runs = [r for r in (add("main", bench.run(m, **{k: v for k, v in kw.items() if given.get(k) is None}))
                                 for m, kw in map(method_spec, args.main_methods.split(","))) if r]
        base, arm = [r for r in main_runs if r["method"] != "armor"], [r for r in main_runs if r["method"] == "armor"]
        if base and arm and dense_ppl:
            res["gap_closed"] = gap_closed(dense_ppl, base, arm[0])
    one_variable = (  # (part, sweep key, run group, Bench.run keyword, type, --*-sweep value, default values)
        ("iters", "iterations", "iteration_sweep", "iterations", int, args.iter_sweep,
         (0, 100, bench.iters, 3 * bench.iters)),
        ("lr", "lr", "lr_sweep", "lr", float, args.lr_sweep, (1e-4, 1e-3, bench.lr)),
        ("rounds", "sparse_rounds", "rounds_sweep", "rounds", int, args.rounds_sweep, (1, bench.rounds)))
    for part, key, group, kw, cast, given, default in one_variable:
        if part in args.parts:
            values = sorted(set(map(cast, given.split(",")) if given else default))
            res["sweeps"][key] = [add(group, bench.run("armor", **{kw: v})) for v in values]
    if "blocks" in args.parts:
        res["sweeps"]["block_size"] = [add("block_sweep", bench.run("armor", block_size=b, iterations=sweep_it))
                                       for b in map(int, args.block_sizes.split(","))]
    if "sequential" in args.parts:
        seq = []
        for m in args.seq_methods.split(","):  # the one-pass twin only if this invocation has it (main or --reuse)
            known = "main" in args.parts or bench.has(m, iterations=sweep_it)
            twin = [bench.run(m, iterations=sweep_it)] if known else []
            seq += [add("sequential", r) for r in (*twin, bench.run(m, mode="sequential", iterations=sweep_it))]
        res["sweeps"]["calibration_mode"] = seq
    base = [r for r in res["runs"] if r["group"] == "main" and r["method"] != "armor"]
    if base and dense_ppl:  # gap closed of every ARMOR variant against the same best one-pass baseline
        for r in res["runs"]:
            if r["method"] == "armor":
                r["gap_closed"] = gap_closed(dense_ppl, base, r)["value"]
                r["gap_closed_per_text"] = {t: gap_closed(d, base, r, t)["value"]
                                            for t, d in res["dense"].get("perplexities", {}).items()}
    if "modelopt" not in args.parts and bench.previous_modelopt:  # carried over from --reuse
        res["modelopt"] = bench.previous_modelopt
        res["runs"] += [r for r in bench.previous_runs if r["group"] == "modelopt_repro"]
    if "modelopt" in args.parts:
        ours = {"dense": dense_ppl,
                "magnitude": bench.run("magnitude")["perplexity"],
                "sparsegpt": bench.run("sparsegpt")["perplexity"]}
        res["modelopt"] = run_modelopt(bench, out_dir, ours)
        # ModelOpt's sparsegpt mode: damping 0.1 and only the mask kept. Reproduce it with our solver.
        repro = add("modelopt_repro", bench.run("sparsegpt", damp=0.1, mask_only=True))
        if "comparison" in res["modelopt"] and (res["modelopt"].get("sparsegpt") or {}).get("perplexity"):
            theirs = res["modelopt"]["sparsegpt"]["perplexity"]
            res["modelopt"]["comparison"]["sparsegpt_damp0.1_mask_only"] = {
                "ours": repro["perplexity"], "modelopt": theirs, "rel_diff": (repro["perplexity"] - theirs) / theirs}
    for group in res["sweeps"].values():
        group[:] = [r for r in group if r]
    res["not_run"] = bench.not_run
    if bench.stats is not None:
        res["calibration"].update(seconds=bench.calib_seconds,
                                  stats="full H" if bench.stats[bench.names[0]].H is not None else "diag h")
    return res


if __name__ == "__main__":
    main()
