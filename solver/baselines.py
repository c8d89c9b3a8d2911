"""One-shot 2:4 baselines that only choose a mask: magnitude, Wanda and NoWag-P.

All three share one selection (``mask_24``: top 2 of every aligned 4 along d_in per row, ties to
the leftmost column) and differ only in the score:
    magnitude  |W_ij|
    Wanda      |W_ij| . sqrt(h_j)                      (h_j proportional to ||X_j||^2)
    NoWag-P    W_bar_ij^2 . h_j, W_bar normalised columns-then-rows (solver.normalizer)
The kept weights are unchanged: S = W * M. SparseGPT, which also updates weights, is in
``solver.sparsegpt``.
"""
from __future__ import annotations

import torch

from solver.normalizer import normalize
from solver.sparsity import mask_24, positive_zeros
from solver.stats import repair_h


def magnitude_score(W: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    return W.float().abs()


def wanda_score(W: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return W.float().abs() * h.float().sqrt()[None, :]


def nowag_score(W: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    W_bar, _, _ = normalize(W)
    return W_bar.pow(2) * h.float()[None, :]


def prune_by_score(W: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (S = W * M, M) for the 2:4 mask chosen by score."""
    M = mask_24(score)
    return positive_zeros(torch.where(M, W.float(), torch.zeros((), dtype=torch.float32))), M


def nowag_start_mask(W: torch.Tensor, h: torch.Tensor, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, int]:
    """ARMOR's start: (NoWag-P's 2:4 mask of W, the repaired h scaled to mean 1, entries of h replaced), on W's
    device. One function for the solve and the refit that compares with this start."""
    h, n_rep = repair_h(h.float().to(W.device), name)
    h = h / h.mean()  # the loss is scale-free in h; this keeps Z far from fp32 overflow
    return mask_24(nowag_score(W, h)), h, n_rep
