"""The quality benchmark's command line (benchmarks/quality.py): its flags, parts and the --smoke settings."""
from __future__ import annotations

import argparse
from pathlib import Path

from solver.config import SHRINK_TARGETS, SolverConfig

DESCRIPTION = "Quality benchmark: dense vs magnitude, Wanda, SparseGPT, NoWag-P and ARMOR 2:4 on one calibration set."
PARTS = ("dense", "main", "iters", "lr", "rounds", "blocks", "sequential", "modelopt")
BASELINES = ("magnitude", "wanda", "sparsegpt", "nowag")
ROOT = Path(__file__).resolve().parent.parent
SMOKE = dict(calib_windows=8, calib_seqlen=64, eval_windows=8, eval_seqlen=64, block_size=16, iterations=20,
             block_sizes="8,16,32", iter_sweep="0,5,20,60", lr_sweep="1e-4,3e-3",
             rounds_sweep="1,2", threads=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=DESCRIPTION)
    p.add_argument("--smoke", action="store_true", help="tiny random model and corpus, every part, seconds")
    p.add_argument("--model", default=None, help="HF folder or GGUF (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="results/quality.json")
    p.add_argument("--calib-text", default=None, help="calibration text file/folder (default: Shakespeare split)")
    p.add_argument("--eval-text", action="append", default=[], help="evaluation text file/folder (repeatable)")
    p.add_argument("--eval-corpus", action="append", default=None,
                   help="registered corpora, comma-separated (default: all, unless --eval-text is given)")
    for name, default in (("calib-windows", 64), ("calib-seqlen", 512), ("eval-windows", 32), ("eval-seqlen", 512)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--block-size", type=int, default=None, help="ARMOR b (default: PRESETS['cpu'])")
    p.add_argument("--iterations", type=int, default=None, help="ARMOR iterations (default: PRESETS['cpu'])")
    p.add_argument("--lr", type=float, default=None, help="ARMOR Adam learning rate (default: PRESETS['cpu'])")
    p.add_argument("--sparse-rounds", type=int, default=None,
                   help="ARMOR sparse-core rounds per iteration (default: PRESETS['cpu'])")
    p.add_argument("--objective", default="diag", choices=("diag", "block-hessian"),
                   help="ARMOR proxy of the main table (block-hessian needs full H; solver/block_hessian.py)")
    p.add_argument("--refit", default="none", choices=("none", "output"),
                   help="ARMOR's output refit after the BCD (needs full H; solver/refit.py)")
    p.add_argument("--refit-shrink", type=float, default=SolverConfig.refit_shrink,
                   help="the refit's Hessian shrinkage lambda (armor:PRESET takes the preset's)")
    p.add_argument("--refit-rounds", type=int, default=SolverConfig.refit_rounds,
                   help="rounds of the output refit (values, output wrapper, input wrapper)")
    p.add_argument("--refit-shrink-to", default=SolverConfig.refit_shrink_to, choices=SHRINK_TARGETS)
    p.add_argument("--lr-sweep", default=None, help="learning-rate sweep (default: 1e-4,1e-3,D with D the default)")
    p.add_argument("--rounds-sweep", default=None, help="sparse-rounds sweep (default: 1,D with D the default)")
    p.add_argument("--main-methods", default=",".join((*BASELINES, "armor", "armor:quality")),
                   help="methods of the main table; armor:PRESET = ARMOR with a preset's settings")
    p.add_argument("--block-sizes", default="16,32,64", help="block-size sweep")
    p.add_argument("--iter-sweep", default=None, help="iteration sweep (default: 0,100,D,3D with D the default)")
    p.add_argument("--seq-methods", default="nowag,armor", help="methods compared one-pass vs sequential")
    p.add_argument("--only", default=None, help=f"comma list of parts to run, of {PARTS}")
    p.add_argument("--skip", default="", help="comma list of parts to skip")
    p.add_argument("--modelopt", action="store_true", help="also run the ModelOpt cross-check (part 'modelopt')")
    p.add_argument("--modelopt-python", default=str(ROOT / ".venv-modelopt" / "bin" / "python"))
    p.add_argument("--modelopt-timeout", type=int, default=3600)
    p.add_argument("--modelopt-threads", type=int, default=1,
                   help="torch threads of the cross-check (its SparseGPT sweep is column by column: 1 is faster)")
    p.add_argument("--reuse", action="append", help="earlier quality JSON (same windows) whose runs to reuse; "
                   "repeatable; the first file holding a run wins")
    p.add_argument("--reuse-methods", default="magnitude,wanda,sparsegpt,nowag",
                   help="methods whose runs --reuse takes (ARMOR results depend on the solver version)")
    p.add_argument("--sweep-iterations", type=int, default=None,
                   help="ARMOR iterations of the block-size sweep and the sequential comparison (default: the default)")
    p.add_argument("--reuse-only", action="store_true", help="compute nothing new: report runs missing from --reuse")
    p.add_argument("--full-stats", action="store_true", help="collect full H even when no method needs it")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --smoke: 1)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    parts = set(PARTS if a.only is None else a.only.split(",")) - set(a.skip.split(","))
    if not a.modelopt and a.only is None:
        parts.discard("modelopt")
    unknown = parts - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    a.parts = [x for x in PARTS if x in parts]
    return a
