"""The ARMOR proxy loss (armor-algorithm.md section 2), as a pure evaluation function.

L = sum_ij h_j (W_bar_ij - W_hat_bar_ij)^2 / sum_ij h_j W_bar_ij^2, with W_bar the normalised
weight. In the original space this is sum_ij h_j (W_ij - W_hat_ij)^2 / (r_i^2 c_j^2), divided by
the same sum for W_hat = 0. L = 1 at W_hat = 0; L = 0 at W_hat = W.
"""
from __future__ import annotations

import torch

from solver.normalizer import normalize


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Normalised diagonal-Hessian proxy loss of W_hat against W (both [d_out, d_in]); h [d_in]."""
    W = W.float()
    W_bar, r, c = normalize(W)
    err_bar = (W - W_hat.float()) / (r[:, None] * c[None, :])
    num = (err_bar.pow(2) * h[None, :]).sum()
    den = (W_bar.pow(2) * h[None, :]).sum()
    return float(num / den)
