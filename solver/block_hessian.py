"""The block-Hessian proxy: ARMOR's loss with the input Hessian kept inside each of B's b x b blocks.

The specified proxy (armor-algorithm.md section 2.2) weighs the normalised error E = W_bar - A S B by diag(H):
L = sum_ij h_j E_ij^2 / Z. This variant keeps, for every input block q, the whole b x b block H_qq of the
layer Hessian H = 2 X^T X / N (its diagonal is h, so the variant adds exactly the within-block channel
correlations):

    L_blk = sum_q tr(E_q H_qq E_q^T) / sum_q tr(W_bar_q H_qq W_bar_q^T).

With H_qq + damp I = C_q C_q^T (Cholesky, block-diagonal C), E_q H_qq E_q^T = |E_q C_q|_F^2, and
E C = W_bar C - A S (B C). So the variant is the specified proxy with unit h, target W' = W_bar C and input
wrapper B' = B C: the same solver, the same exact 2:4 group solves (each tile still depends only on A_p, B'_q
and its core tile), started from B' = C (that is B = I, the NoWag-P start), while Adam moves B itself
(the chain rule through B' = B C), so that with a diagonal H the solve is the specified one.

Pure functions; fp32 in, the Cholesky in fp64.
"""
from __future__ import annotations

import torch

from solver.blockdiag import right_mul


def hessian_factor(H_blocks: torch.Tensor, b: int, damp: float, name: str = "layer") -> torch.Tensor:
    """C [n1, b, b] lower-triangular with C_q C_q^T = H_qq / mean(diag H) + damp I (fp32), from H's diagonal
    blocks H_blocks [n1, b, b] (``LayerStats.hessian_blocks``).

    Raises naming the layer when the blocks are not finite or a block is not positive definite."""
    if H_blocks.dim() != 3 or H_blocks.shape[1:] != (b, b):
        raise ValueError(f"{name}: the input-Hessian blocks have shape {tuple(H_blocks.shape)}; expected "
                         f"[d_in/{b}, {b}, {b}]")
    if not bool(torch.isfinite(H_blocks).all()):
        raise ValueError(f"{name}: the input Hessian has non-finite entries; recalibrate (the activations "
                         f"overflowed) or use --objective diag")
    H64 = H_blocks.double()
    scale = H64.diagonal(dim1=1, dim2=2).mean()
    if not float(scale) > 0:
        raise ValueError(f"{name}: the input Hessian is zero (the calibration data never reached this layer) or "
                         f"not a Hessian (negative diagonal)")
    blocks = H64 / scale
    blocks = 0.5 * (blocks + blocks.transpose(1, 2)) + damp * torch.eye(b, dtype=torch.float64, device=H64.device)
    C, info = torch.linalg.cholesky_ex(blocks)
    bad = (info != 0).nonzero()[:, 0].tolist()
    if bad:
        raise ValueError(f"{name}: input-Hessian block(s) {bad[:5]} are not positive definite even with damping "
                         f"{damp}; raise --hessian-damp or use --objective diag")
    return C.float()


def to_metric(W_bar: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """W' = W_bar C (C block-diagonal over the input columns)."""
    return right_mul(W_bar, C)


def in_metric(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """B' = B C in fp64 (for the exact fp64 loss of stored factors)."""
    return torch.matmul(B.double(), C.double())
