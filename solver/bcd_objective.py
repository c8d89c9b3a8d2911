"""Batched proxy objective of ARMOR and its analytic gradients (armor-algorithm.md sections 2, 4.2, 9).

Every tensor carries a leading batch axis K (several same-shaped layers solved together):
    W_bar, S, E, G, T, dT, Gamma : [K, d_out, d_in]
    A : [K, n0, b, b] (output side, left)      B : [K, n1, b, b] (input side, right)
    h : [K, d_in]                                Z : [K]   (Z = sum_ij h_j W_bar_ij^2)
Side convention: W_bar ~= A . S . B. With the residual E = A S B - W_bar the loss is
    L = sum_ij h_j E_ij^2 / Z,   G := dL/d(ASB) = (2/Z) E (.) h,
    dL/dA_p = G_p T_p^T (T = S B, row block p),   dT := A^T G,
    Gamma := dL/dS = dT B^T,                      dL/dB_q = S_q^T dT_q (column block q).
One "unit" below is one block-diagonal product over a dense [d_out, d_in] matrix (2 d_out d_in b FLOP).
No autograd anywhere: every gradient is one explicit batched matmul.
"""
from __future__ import annotations

import torch


def lmul(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A . X for A [K, n0, b, b], X [K, d_out, k] (one unit)."""
    K, n0, b, _ = A.shape
    return torch.matmul(A, X.view(K, n0, b, -1)).view(X.shape)


def lmul_t(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A^T . X (one unit)."""
    return lmul(A.transpose(-1, -2), X)


def rmul(X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X . B for X [K, k, d_in], B [K, n1, b, b] (one unit)."""
    K, n1, b, _ = B.shape
    k = X.shape[1]
    Xv = X.view(K, k, n1, b).transpose(1, 2)  # [K, n1, k, b]
    return torch.matmul(Xv, B).transpose(1, 2).reshape(X.shape)


def rmul_t(X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X . B^T (one unit)."""
    return rmul(X, B.transpose(-1, -2))


def row_block_gram(G: torch.Tensor, T: torch.Tensor, b: int) -> torch.Tensor:
    """[K, n0, b, b]: block p is G_p . T_p^T over row block p (one unit)."""
    K, d_out, d_in = G.shape
    Gv = G.view(K, d_out // b, b, d_in)
    Tv = T.view(K, d_out // b, b, d_in)
    return torch.matmul(Gv, Tv.transpose(-1, -2))


def col_block_gram(S: torch.Tensor, Y: torch.Tensor, b: int) -> torch.Tensor:
    """[K, n1, b, b]: block q is S_q^T . Y_q over column block q (one unit)."""
    K, d_out, d_in = S.shape
    Sv = S.view(K, d_out, d_in // b, b).permute(0, 2, 3, 1)  # [K, n1, b, d_out]
    Yv = Y.view(K, d_out, d_in // b, b).transpose(1, 2)  # [K, n1, d_out, b]
    return torch.matmul(Sv, Yv)


def loss_scale(W_bar: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Z [K] = sum_ij h_j W_bar_ij^2 (1 where W is all zero, so an all-zero layer has loss 0, not NaN)."""
    Z = (W_bar.pow(2) * h[:, None, :]).sum(dim=(1, 2), dtype=torch.float64).float()
    return torch.where(Z > 0, Z, torch.ones_like(Z))


def forward(A, S, B, W_bar):
    """(T = S B, E = A T - W_bar): two units."""
    T = rmul(S, B)
    E = lmul(A, T) - W_bar
    return T, E


def weighted_residual(E: torch.Tensor, h: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """G = (2/Z) E (.) h = dL/d(A S B)."""
    return E * (h * (2.0 / Z)[:, None])[:, None, :]


def loss_from(E: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """L [K] (fp64) = 1/2 sum E (.) G, which equals sum h E^2 / Z."""
    return 0.5 * (E * G).sum(dim=(1, 2), dtype=torch.float64)


def core_gradient(A, B, G):
    """(dT = A^T G, Gamma = dT B^T): two units."""
    dT = lmul_t(A, G)
    return dT, rmul_t(dT, B)


def wrapper_gradients(G, T, S, dT, b: int):
    """(dL/dA, dL/dB) from the cached products: two units."""
    return row_block_gram(G, T, b), col_block_gram(S, dT, b)


def exact_loss(W_bar: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, h: torch.Tensor) -> float:
    """Proxy loss of one layer (unbatched A [n0,b,b], S, B [n1,b,b]) recomputed from scratch in fp64."""
    W64, A64, S64, B64, h64 = (t.double() for t in (W_bar, A, S, B, h))
    E = lmul(A64[None], rmul(S64[None], B64[None]))[0] - W64
    num = (E.pow(2) * h64[None, :]).sum()
    den = (W64.pow(2) * h64[None, :]).sum()
    return float(num / den) if float(den) > 0 else float(num)
