"""SparseGPT 2:4 (armor-algorithm.md section 6): one-shot OBS pruning with weight updates.

What this module does, for one layer W [d_out, d_in] with the full input Hessian H = 2 X^T X / N:
  1. dead input channels (H_jj == 0) get H_jj = 1 and W[:, j] = 0;
  2. damping H += lam . mean(diag H) . I, lam = cfg.sparsegpt_damp (default 0.01);
  3. U = upper Cholesky factor of H^-1 (so H^-1 = U^T U);
  4. columns are swept left to right in blocks of cfg.sparsegpt_block (default 128). At the start
     of every aligned group of 4 columns, each row keeps the 2 entries with the largest
     w^2 / U_jj^2 (i.e. prunes the 2 smallest) of its *current, already updated* weights. Ties are
     broken by ``solver.sparsity.mask_24``: the leftmost entries are kept, the rightmost pruned.
     For each column j: q_j = kept ? w_j : 0, err = (w_j - q_j) / U_jj, and the not yet
     processed columns of the current block take W[:, j:] -= err . U[j, j:]; the columns after the
     block receive the accumulated update Err . U[block, after] once per block (lazy batching).

Precision: H is read in fp32; the damping, the Cholesky factorisations and the inverse run in
fp64 (cheap, d_in^3 once per layer, and it removes most spurious Cholesky failures on
ill-conditioned H); U is then cast to the sweep precision, fp32 by default, so the per-column
work stays fp32 as in the reference implementations. ``sparsegpt_24`` accepts
``sweep_dtype=torch.float64`` for tests that compare against an exact reference.

Numerical trouble is never silent: if the Cholesky of the damped H (or of its inverse) fails, the
damping is multiplied by 10 (up to ``MAX_DAMP_RETRIES`` times; a zero damping restarts at 0.01)
and the retry count is recorded in ``notes["damp_retries"]``. If it still fails, or the sweep
produces a non-finite value, the layer falls back to the NoWag-P mask with ``status="fallback"``
and the reason in ``notes``. NaN/Inf in W or H raise a ValueError naming the layer.

What this module does not do: propagate pruned outputs through later layers (the caller
recomputes H sequentially if it wants that), or choose which layers to prune.
"""
from __future__ import annotations

import time

import torch

from solver.baselines import nowag_score, prune_by_score
from solver.config import SolverConfig
from solver.factors import Factorization, LayerResult, SolveReport
from solver.objective import proxy_loss
from solver.sparsity import GROUP, check_24_shape, is_24, mask_24, positive_zeros
from solver.stats import repair_h

MAX_DAMP_RETRIES = 4  # damping goes lam, 10 lam, ..., 10^4 lam before falling back
_RESTART_DAMP = 0.01  # first retry value when the configured damping is 0


class CholeskyFailure(RuntimeError):
    """The damped Hessian stayed non positive-definite after every retry."""


def _upper_inverse_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, int, float]:
    """U with U^T U = (H + lam mean(diag H) I)^-1, in fp64; returns (U or None, retries, lam used)."""
    H64 = H.double()
    d_in = H64.shape[0]
    mean_diag = float(torch.diagonal(H64).mean())
    eye = torch.eye(d_in, dtype=torch.float64, device=H64.device)
    lam = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        if attempt > 0:
            lam = lam * 10.0 if lam > 0 else _RESTART_DAMP
        L, info = torch.linalg.cholesky_ex(H64 + (lam * mean_diag) * eye)
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            continue
        H_inv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(H_inv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()) and bool((torch.diagonal(U) > 0).all()):
            return U, attempt, lam
    return None, MAX_DAMP_RETRIES, lam


def sparsegpt_24(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    block: int = 128,
    damp: float = 0.01,
    name: str = "layer",
    sweep_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict]:
    """Prune W [d_out, d_in] to 2:4 along d_in with SparseGPT, given H [d_in, d_in].

    Returns (S, info): S [d_out, d_in] in ``sweep_dtype`` on W's device, 2:4 with +0.0 zeros;
    info holds ``dead_columns``, ``damp_retries`` and ``damp`` (the relative damping used).
    Raises ValueError on bad shapes or non-finite inputs and CholeskyFailure when the damped
    Hessian cannot be factorised.
    """
    if W.dim() != 2:
        raise ValueError(f"{name}: W must be 2-D [d_out, d_in], got shape {tuple(W.shape)}")
    d_out, d_in = W.shape
    check_24_shape(d_in, name)
    if tuple(H.shape) != (d_in, d_in):
        raise ValueError(f"{name}: Hessian has shape {tuple(H.shape)}, expected [{d_in}, {d_in}]")
    if block <= 0 or block % GROUP:
        raise ValueError(f"{name}: SparseGPT block size must be a positive multiple of {GROUP}, got {block}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name}: weight contains NaN or Inf; cannot prune with SparseGPT")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{name}: input Hessian contains NaN or Inf; recalibrate this layer")

    W = W.to(sweep_dtype).clone()
    H = H.float().clone()
    dead = torch.diagonal(H) == 0  # [d_in]
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    U64, retries, lam = _upper_inverse_factor(H, damp)
    info = {"dead_columns": int(dead.sum()), "damp_retries": retries, "damp": lam}
    if U64 is None:
        raise CholeskyFailure(
            f"{name}: damped Hessian is not positive definite after {retries} retries (last damping {lam:g})"
        )
    U = U64.to(sweep_dtype)  # [d_in, d_in], upper triangular

    S = torch.zeros_like(W)
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        W1 = W[:, i1:i2].clone()  # [d_out, nb]: current weights of this block
        Err1 = torch.zeros_like(W1)  # [d_out, nb]: err of every processed column
        U1 = U[i1:i2, i1:i2]  # [nb, nb]
        d1 = torch.diagonal(U1)  # [nb]
        keep = None
        for j in range(i2 - i1):
            g = j % GROUP
            if g == 0:
                # Keep the 2 largest w^2 / U_jj^2 of the next 4 (already updated) columns; ties keep leftmost.
                keep = mask_24((W1[:, j : j + GROUP] / d1[j : j + GROUP]).pow(2))  # [d_out, 4]
            w = W1[:, j]
            q = torch.where(keep[:, g], w, torch.zeros((), dtype=w.dtype, device=w.device))
            err = (w - q) / d1[j]
            # In-block update of the columns after j; column j itself becomes exactly q.
            W1[:, j + 1 :] -= err[:, None] * U1[j, j + 1 :][None, :]
            W1[:, j] = q
            Err1[:, j] = err
        S[:, i1:i2] = W1
        if i2 < d_in:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update of every later column
    return positive_zeros(S), info


def _fallback_reason(S: torch.Tensor) -> str | None:
    if not bool(torch.isfinite(S).all()):
        return "SparseGPT sweep produced NaN or Inf"
    if not is_24(S):  # cannot happen by construction; checked so a regression cannot slip through
        return "SparseGPT output is not 2:4"
    return None


def solve_layers(problems: list, cfg: SolverConfig) -> list[LayerResult]:
    """Run SparseGPT 2:4 on each ``Problem`` (name, W [d_out, d_in], stats with H); CPU results.

    loss_start is the NoWag-P proxy loss and loss_final the proxy loss of S, both with
    h = diag(H) repaired by ``repair_h`` (so every method is on the same scale).
    """
    results = []
    for p in problems:
        t0 = time.perf_counter()
        if p.stats is None or p.stats.H is None:
            raise ValueError(f"{p.name}: SparseGPT needs the full input Hessian (calibrate with full stats)")
        W = p.W.detach().float().cpu()
        H = p.stats.H.detach().float()
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"{p.name}: weight contains NaN or Inf; cannot prune with SparseGPT")
        if not bool(torch.isfinite(H).all()):
            raise ValueError(f"{p.name}: input Hessian contains NaN or Inf; recalibrate this layer")
        h, n_repaired = repair_h(torch.diagonal(H).cpu().clone(), p.name)
        S_nowag, _ = prune_by_score(W, nowag_score(W, h))
        loss_start = proxy_loss(W, S_nowag, h)

        notes: dict = {"h_replaced": n_repaired}
        status = "ok"
        try:
            S, info = sparsegpt_24(
                W.to(cfg.device), H.to(cfg.device), block=cfg.sparsegpt_block, damp=cfg.sparsegpt_damp, name=p.name
            )
            S = S.cpu()
            notes.update(info)
            reason = _fallback_reason(S)
        except CholeskyFailure as exc:
            notes["damp_retries"] = MAX_DAMP_RETRIES
            reason = str(exc)
        if reason is not None:
            status = "fallback"
            notes["fallback"] = "nowag"
            notes["fallback_reason"] = reason
            S = S_nowag
        loss_final = loss_start if status == "fallback" else proxy_loss(W, S, h)
        report = SolveReport(
            loss_start=loss_start,
            loss_final=loss_final,
            seconds=time.perf_counter() - t0,
            status=status,
            notes=notes,
        )
        results.append(LayerResult(Factorization(positive_zeros(S)), report))
    return results
