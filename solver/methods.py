"""The closed set of pruning methods, each with the statistics it needs and one entry point.

``solve(method, problems, cfg)`` takes a list of ``Problem`` (one linear each) and returns one
``LayerResult`` per problem, in order. Taking a list lets a method batch problems of the same
shape (ARMOR does). Every result carries the proxy loss of the NoWag-P start and of its own
factors, so methods are comparable on one scale.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from solver.baselines import magnitude_score, nowag_score, prune_by_score, wanda_score
from solver.config import SolverConfig
from solver.factors import Factorization, LayerResult, SolveReport
from solver.objective import proxy_loss
from solver.stats import LayerStats, repair_h


@dataclass(frozen=True)
class Problem:
    name: str
    W: torch.Tensor  # [d_out, d_in] fp32
    stats: LayerStats | None  # None only for methods that need no calibration


NEEDS = ("none", "diag", "blocks", "full")  # calibration statistics, each level including the ones before


def _needs(level: str) -> Callable[[SolverConfig], str]:
    return lambda cfg: level


def _no_check(p: Problem, cfg: SolverConfig) -> None:
    return None


@dataclass(frozen=True)
class Step:
    """One stage of a method: the statistics it reads with a configuration's settings, a check of one problem
    that runs for every problem before any step starts, and the stage itself (the previous step's results in,
    None for the first)."""
    name: str
    needs: Callable[[SolverConfig], str]  # one of NEEDS
    run: Callable[[list[Problem], list[LayerResult] | None, SolverConfig], list[LayerResult]]
    check: Callable[[Problem, SolverConfig], None] = _no_check


@dataclass(frozen=True)
class Method:
    name: str
    uses_wrappers: bool
    steps: tuple[Step, ...]

    def needs(self, cfg: SolverConfig) -> str:
        """The strongest statistics any step reads with cfg's settings."""
        return max((s.needs(cfg) for s in self.steps), key=NEEDS.index)


def _mask_only(score_fn) -> Callable[[list[Problem], SolverConfig], list[LayerResult]]:
    def run(problems: list[Problem], cfg: SolverConfig) -> list[LayerResult]:
        out = []
        for p in problems:
            t0 = time.perf_counter()
            h, notes = None, {}
            if p.stats is not None:
                # Same repaired h as ARMOR and SparseGPT, so every method's losses share one scale (spec 2.1).
                h, notes["h_replaced"] = repair_h(p.stats.h.float(), p.name)
            S, _ = prune_by_score(p.W, score_fn(p.W, h))
            seconds = time.perf_counter() - t0
            if h is not None:
                start = proxy_loss(p.W, prune_by_score(p.W, nowag_score(p.W, h))[0], h)
                final = proxy_loss(p.W, S, h)
            else:
                start = final = None
            out.append(LayerResult(Factorization(S), SolveReport(start, final, 0, seconds, notes=notes)))
        return out

    return run


def _sparsegpt(problems: list[Problem], _prev, cfg: SolverConfig) -> list[LayerResult]:
    from solver.sparsegpt import solve_layers

    return solve_layers(problems, cfg)


def _bcd(problems: list[Problem], _prev, cfg: SolverConfig) -> list[LayerResult]:
    from solver.armor import solve_layers

    return solve_layers(problems, cfg)


def _bcd_needs(cfg: SolverConfig) -> str:
    from solver.metric import OBJECTIVES

    return OBJECTIVES[cfg.objective]


def _bcd_check(p: Problem, cfg: SolverConfig) -> None:
    if _bcd_needs(cfg) == "blocks" and p.stats is not None and p.stats.hessian_blocks(cfg.block_size) is None:
        raise ValueError(f"{p.name}: objective {cfg.objective!r} needs the input Hessian's {cfg.block_size}-wide "
                         f"diagonal blocks (calibrate with the same block size, or full statistics)")


def _refit(problems: list[Problem], prev: list[LayerResult], cfg: SolverConfig) -> list[LayerResult]:
    from solver.refit_step import refit_layers

    return refit_layers(problems, prev, cfg)


def _refit_needs(cfg: SolverConfig) -> str:
    from solver.refit_step import RefitConfig

    return RefitConfig.of(cfg).needs()


def _refit_check(p: Problem, cfg: SolverConfig) -> None:
    from solver.refit_step import check

    check(p, cfg)


def _full_check(p: Problem, cfg: SolverConfig) -> None:
    if p.stats is not None and p.stats.H is None:
        raise ValueError(f"{p.name}: method {cfg.method!r} needs the full input Hessian (calibrate with full stats)")


def _mask_step(score_fn, needs: str) -> Step:
    run = _mask_only(score_fn)
    return Step("mask", _needs(needs), lambda problems, _prev, cfg: run(problems, cfg))


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", False, (_mask_step(magnitude_score, "none"),)),
    "wanda": Method("wanda", False, (_mask_step(wanda_score, "diag"),)),
    "nowag": Method("nowag", False, (_mask_step(nowag_score, "diag"),)),
    "sparsegpt": Method("sparsegpt", False, (Step("sparsegpt", _needs("full"), _sparsegpt, _full_check),)),
    "armor": Method("armor", True, (Step("bcd", _bcd_needs, _bcd, _bcd_check),
                                    Step("refit", _refit_needs, _refit, _refit_check))),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def stats_needed(cfg: SolverConfig) -> str:
    """"none" | "diag" | "blocks" | "full": the calibration statistics cfg's method needs with cfg's settings
    ("blocks": h and H's cfg.block_size-wide diagonal blocks, which the full H also provides); each method's
    steps declare their own."""
    return get_method(cfg.method).needs(cfg)


def stats_request(cfg: SolverConfig) -> dict:
    """Keyword arguments for the calibration pass that cfg needs: {"full": bool, "hessian_block": int | None}."""
    needs = stats_needed(cfg)
    return {"full": needs == "full", "hessian_block": cfg.block_size if needs == "blocks" else None}


def solve(method: str, problems: list[Problem], cfg: SolverConfig) -> list[LayerResult]:
    """Check every problem against every step of ``method``, then run the steps in order."""
    m = get_method(method)
    cfg = dataclasses.replace(cfg, method=method)
    needs = m.needs(cfg)
    for p in problems:
        if needs != "none" and p.stats is None:
            raise ValueError(f"{p.name}: method {method!r} needs calibration statistics")
        for step in m.steps:
            step.check(p, cfg)
    results = None
    for step in m.steps:
        results = step.run(problems, results, cfg)
    return results
