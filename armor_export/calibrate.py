"""The calibrate stage: token windows -> the input statistics of every target linear (``Statistics``).

One dense pass over the decoder blocks (the paper's calibration). Where the blocks come from (the whole model
or one layer at a time) is the source's strategy (``Loaded.blocks``); which linears this process collects and
keeps, and whether the windows are shared out over ranks, is the plan's (armor_export.plan.LayerPlan). No math
lives here: the accumulators are solver.stats', the pooling over ranks armor_export.shard's.
"""
from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from armor_export.adapters import split_name
from armor_export.calibration import TokenWindows, windows
from armor_export.config import CalibConfig
from armor_export.corpus import default_split, text_files
from armor_export.plan import LayerPlan
from armor_export.shard import DistContext, all_reduce_accumulators, window_share
from armor_export.source import Loaded
from solver.config import SolverConfig
from solver.methods import stats_request
from solver.stats import LayerStats


@dataclass
class Statistics:
    """What calibrate hands to solve: per linear (a fused group's first member stands for the group) its input
    statistics on the CPU, and how long the pass took."""
    layers: dict[str, LayerStats]
    seconds: float = 0.0


def calibration_windows(tok, cfg: CalibConfig) -> TokenWindows:
    files = default_split()[0] if cfg.text is None else text_files(cfg.text)
    return windows(tok, files, cfg.samples, cfg.seqlen, seed=cfg.seed, what="calibration")


def collect_stats(loaded: Loaded, names: list[str], tokens: TokenWindows, *, full: bool, batch_size: int = 8,
                  progress: bool = True, hessian_block: int | None = None, device="cpu",
                  dist: DistContext | None = None, keep: Collection[str] | None = None) -> dict[str, LayerStats]:
    """Dense one-pass statistics for ``names`` only (the paper's calibration): h, and the full H (``full``) or
    its ``hessian_block``-wide diagonal blocks. Linears outside ``names`` (``--ignore``) get no accumulator.
    ``device``: where the forward passes and accumulators run (the statistics are returned on the CPU).
    ``dist`` with world > 1: this rank runs its ``window_share`` of the windows and the statistics are
    all-reduced block by block (every rank must pass the same ``names``); ``keep``: return only these."""
    wanted, stats = set(names), {}
    if not names:
        return stats
    keep = wanted if keep is None else set(keep)
    token_ids, reduce = tokens.token_ids, None
    if dist is not None and dist.world > 1:
        token_ids = token_ids[window_share(token_ids.shape[0], batch_size, dist.rank, dist.world)]
        reduce = all_reduce_accumulators
    last = max(split_name(loaded.family, n)[0] for n in names)  # later blocks are not needed
    blocks = loaded.blocks(token_ids, full=full, batch_size=batch_size, last=last, progress=progress,
                           hessian_block=hessian_block, targets=wanted, device=device, reduce=reduce)
    for i, bstats in blocks:
        for local, st in bstats.items():
            fqn = f"{loaded.family.layers_path}.{i}.{local}"
            if fqn in keep:
                stats[fqn] = st
        if i >= last:
            break
    return stats


def calibrate(loaded: Loaded, plan: LayerPlan, tokens: TokenWindows, calib: CalibConfig, *, full: bool,
              hessian_block: int | None = None, device="cpu", dist: DistContext | None = None,
              progress: bool = True) -> Statistics:
    """The statistics ``plan`` asks this process for: of ``plan.calibrate`` (every rank the same list), kept for
    ``plan.keep``, on ``device``; h always, and the full H (``full``) or its ``hessian_block``-wide diagonal
    blocks (``request(solver_cfg)`` gives what a solver configuration needs)."""
    t0 = time.perf_counter()
    stats = collect_stats(loaded, plan.calibrate, tokens, batch_size=calib.batch_size, progress=progress,
                          device=device, dist=dist, keep=plan.keep, full=full, hessian_block=hessian_block)
    return Statistics(stats, time.perf_counter() - t0)


def request(solver_cfg: SolverConfig) -> dict:
    """``calibrate``'s keywords for what ``solver_cfg`` needs: full, hessian_block, device."""
    return {**stats_request(solver_cfg), "device": solver_cfg.device}
