"""ARMOR's output refit as a step of its own (the method table runs it after the BCD; solver.methods).

With ``RefitConfig.kind == "output"`` (an option of ours, solver/refit.py) each layer's BCD result, or the NoWag-P
start when that has the lower output error, is refitted to the layer's output error under the full input
Hessian with its mask fixed; the report's losses are then that output loss (1 = all-zero weight), so
loss_final <= loss_start still holds, and the BCD's go to notes. "none" returns the results unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from solver.baselines import nowag_start_mask
from solver.blockdiag import identity_blocks, product
from solver.config import SolverConfig
from solver.factors import Factorization, LayerResult, SolveReport
from solver.refit import output_loss, refit, shrunk
from solver.sparsity import positive_zeros

KINDS = ("none", "output")


@dataclass(frozen=True)
class RefitConfig:
    kind: str = "none"  # "none" | "output"
    rounds: int = 6  # rounds of (values, output wrapper, input wrapper)
    damp: float = 0.01  # added to H's diagonal, relative to mean(diag H)
    shrink: float = 0.0  # lambda of the refit's Hessian (1 - lambda) H + lambda T (solver/refit.py shrunk)
    shrink_block: int = 1  # T's diagonal block width: 1 = diag H, b = H's b x b diagonal blocks
    device: str = "cpu"

    @classmethod
    def of(cls, cfg: SolverConfig) -> "RefitConfig":
        """The refit settings of a solver configuration (its refit_* fields, hessian_damp and device)."""
        return cls(kind=cfg.refit, rounds=cfg.refit_rounds, damp=cfg.hessian_damp, shrink=cfg.refit_shrink,
                   shrink_block=cfg.block_size if cfg.refit_shrink_to == "block" else 1, device=cfg.device)

    def needs(self) -> str:
        return "full" if self.kind != "none" else "none"


def check(p, cfg: SolverConfig) -> None:
    """Raise naming the layer when the refit cannot run on problem ``p`` (before any step starts)."""
    if RefitConfig.of(cfg).kind != "none" and (p.stats is None or p.stats.H is None):
        raise ValueError(f"{p.name}: --refit output needs the layer's full input Hessian (calibrate with "
                         f"full statistics, or run without the refit)")


def output_refit(name: str, W: torch.Tensor, H: torch.Tensor, M0: torch.Tensor, res: LayerResult,
                 rc: RefitConfig) -> LayerResult:
    """Refit the factors with the lower output loss, ``res``'s or the NoWag-P start's (W masked by M0), with their
    mask fixed; the report's losses become output losses and the previous ones go to notes."""
    t0 = time.perf_counter()
    dev = torch.device(rc.device)
    W, H_full = W.float().to(dev), H.float().to(dev)
    H = shrunk(H_full, rc.shrink, rc.shrink_block)  # = H_full at shrink 0
    f = res.factors
    W0 = torch.where(M0.to(dev), W, torch.zeros((), device=dev))  # the NoWag-P start, A = B = I
    loss_start = output_loss(W, W0, H)
    A, S, B = (x.to(dev) for x in (f.A_blocks, f.S, f.B_blocks))
    loss_bcd = output_loss(W, f.to_dense().to(dev), H)
    origin, loss_from = "armor", loss_bcd
    if not loss_bcd <= loss_start:
        A, B = (identity_blocks(*x.shape[:2], device=dev) for x in (A, B))
        S, origin, loss_from = W0, "nowag", loss_start
    A, S, B, info = refit(W, A, S, B, H, rounds=rc.rounds, damp=rc.damp, name=name, loss_before=loss_from)
    loss_final = info["loss_after"]
    if not loss_final <= loss_start:
        raise AssertionError(f"{name}: refitted output loss {loss_final} exceeds the NoWag-P start {loss_start}")
    seconds = time.perf_counter() - t0
    fact = Factorization(positive_zeros(S.cpu()), A.cpu().contiguous(), B.cpu().contiguous()).validated(name)
    r = res.report
    notes = {**r.notes, "bcd_loss_start": r.loss_start, "bcd_loss_final": r.loss_final, "output_loss_bcd": loss_bcd,
             "refit": rc.kind, "refit_from": origin, "refit_accepted": info["accepted"],
             "refit_shrink": rc.shrink, "output_loss_full_h": (
                 loss_final if rc.shrink == 0 else output_loss(W, product(A, S, B), H_full)),
             "refit_seconds": round(seconds, 4)}
    report = SolveReport(loss_start, loss_final, r.iterations, r.seconds + seconds, r.early_stopped, r.status, notes)
    return LayerResult(fact, report)


def refit_layers(problems, results: list[LayerResult], cfg: SolverConfig) -> list[LayerResult]:
    """The refit step of the method table: every result refitted (kind "output"), or returned as is ("none")."""
    rc = RefitConfig.of(cfg)
    if rc.kind == "none":
        return results
    dev = torch.device(rc.device)
    out = []
    for p, res in zip(problems, results):
        M0 = nowag_start_mask(p.W.float().to(dev), p.stats.h, p.name)[0]
        out.append(output_refit(p.name, p.W, p.stats.H, M0, res, rc))
    return out
