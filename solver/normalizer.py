"""The NoWag normaliser: column norms first, then row norms of the column-normalised weight.

W_bar = diag(r)^-1 . W . diag(c)^-1 with c_j = ||W[:, j]|| + eps and r_i = ||(W diag(c)^-1)[i, :]|| + eps.
The order (columns, then rows) is part of the specification. ``fold`` moves r and c into the
block-diagonal wrappers: A' = diag(r) . A and B' = B . diag(c), both still block-diagonal.
"""
from __future__ import annotations

import torch

EPS = 1e-5


def normalize(W: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (W_bar, r [d_out], c [d_in]) for W [d_out, d_in], computed in fp32."""
    W = W.float()
    c = W.norm(dim=0) + eps
    W1 = W / c
    r = W1.norm(dim=1) + eps
    return W1 / r[:, None], r, c


def fold(A_blocks: torch.Tensor, B_blocks: torch.Tensor, r: torch.Tensor, c: torch.Tensor):
    """(diag(r) . A, B . diag(c)) as block stacks, in the dtype of the inputs (use fp32)."""
    n0, b0, _ = A_blocks.shape
    n1, b1, _ = B_blocks.shape
    A_f = A_blocks * r.reshape(n0, b0, 1)
    B_f = B_blocks * c.reshape(n1, 1, b1)
    return A_f, B_f
