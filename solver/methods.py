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


@dataclass(frozen=True)
class Method:
    name: str
    needs: str  # "none" | "diag" | "full"
    uses_wrappers: bool
    run: Callable[[list[Problem], SolverConfig], list[LayerResult]]


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


def _sparsegpt(problems: list[Problem], cfg: SolverConfig) -> list[LayerResult]:
    from solver.sparsegpt import solve_layers

    return solve_layers(problems, cfg)


def _armor(problems: list[Problem], cfg: SolverConfig) -> list[LayerResult]:
    from solver.armor import solve_layers

    return solve_layers(problems, cfg)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", "none", False, _mask_only(magnitude_score)),
    "wanda": Method("wanda", "diag", False, _mask_only(wanda_score)),
    "nowag": Method("nowag", "diag", False, _mask_only(nowag_score)),
    "sparsegpt": Method("sparsegpt", "full", False, _sparsegpt),
    "armor": Method("armor", "diag", True, _armor),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def stats_needed(cfg: SolverConfig) -> str:
    """"none" | "diag" | "blocks" | "full": the calibration statistics cfg's method needs with cfg's settings
    ("blocks": h and H's cfg.block_size-wide diagonal blocks, which the full H also provides)."""
    needs = get_method(cfg.method).needs
    if cfg.method == "armor" and cfg.refit != "none":
        return "full"
    if cfg.method == "armor" and cfg.objective != "diag":
        return "blocks"
    return needs


def stats_request(cfg: SolverConfig) -> dict:
    """Keyword arguments for the calibration pass that cfg needs: {"full": bool, "hessian_block": int | None}."""
    needs = stats_needed(cfg)
    return {"full": needs == "full", "hessian_block": cfg.block_size if needs == "blocks" else None}


def solve(method: str, problems: list[Problem], cfg: SolverConfig) -> list[LayerResult]:
    m = get_method(method)
    needs = stats_needed(dataclasses.replace(cfg, method=method))
    for p in problems:
        if needs != "none" and p.stats is None:
            raise ValueError(f"{p.name}: method {method!r} needs calibration statistics")
        if needs == "blocks" and p.stats.hessian_blocks(cfg.block_size) is None:
            raise ValueError(f"{p.name}: objective {cfg.objective!r} needs the input Hessian's {cfg.block_size}-wide "
                             f"diagonal blocks (calibrate with the same block size, or full statistics)")
        if needs == "full" and p.stats.H is None:
            raise ValueError(f"{p.name}: method {method!r} needs the full input Hessian (calibrate with full stats)")
    return m.run(problems, cfg)
