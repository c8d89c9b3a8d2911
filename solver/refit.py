"""Output refit: the layer's output error under the full input Hessian, minimised with S's 2:4 mask fixed.

ARMOR's proxies weigh the error by diag(H) or by H's b x b diagonal blocks; the layer's output error on the
calibration data is the full quadratic form

    L(A, S, B) = tr(E H E^T) / tr(W H W^T),   E = W - A S B,   H = 2 X^T X / N

(1 = all-zero weight, 0 = exact). With the mask fixed, L is a convex quadratic in each of S's kept values, A and
B separately, so alternating exact (or monotone) minimisation never raises it:
- S: preconditioned conjugate gradients over the kept entries only, on f(S) = tr(P S Q S^T) - 2 tr(S^T K) with
  P = A^T A (block-diagonal), Q = B H B^T, K = A^T W H B^T (Jacobi preconditioner P_ii Q_jj);
- A: closed form per output block, A_p = (W_p H Y_p^T)(Y_p H Y_p^T)^-1 with Y = S B (a b x b solve);
- B: conjugate gradients over B's diagonal blocks, on tr((W - Z B) H (W - Z B)^T) with Z = A S.
The solves use H + damp . mean(diag H) . I (numerical safety; dead input channels stay solvable); the result
is accepted only if the undamped L of the returned factors is not above that of the factors given, checked
in fp64. Pure functions on fp32 tensors of one layer; every product is a dense or block-diagonal matmul.
The defaults (6 rounds of 10 value and 5 wrapper CG steps) come from SmolLM2's layers: short inner solves and
more rounds reach a lower loss for the same work than long inner solves (benchmarks/RESULTS_quality.md).
"""
from __future__ import annotations

import torch

from solver.blockdiag import left_mul, product, right_mul


def output_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T) with E = W - W_hat, in fp64 (1 = all-zero weight)."""
    W64, H64 = W.double(), H.double()
    E = W64 - W_hat.double()
    den = float(((W64 @ H64) * W64).sum())
    if not den > 0:
        raise ValueError("output loss: tr(W H W^T) is not positive (a zero weight or a zero Hessian)")
    return float(((E @ H64) * E).sum()) / den


def damped(H: torch.Tensor, damp: float, name: str = "layer") -> torch.Tensor:
    """H + damp . mean(diag H) . I; raises naming the layer when H is not finite or has no energy."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name}: the input Hessian must be square, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{name}: the input Hessian has non-finite entries; recalibrate (the activations "
                         f"overflowed) or run without the output refit")
    scale = float(H.diagonal().mean())
    if not scale > 0:
        raise ValueError(f"{name}: the input Hessian has no energy (mean diagonal {scale:g}); the calibration "
                         f"data never reached this layer")
    return H + (damp * scale) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def shrunk(H: torch.Tensor, lam: float, b: int) -> torch.Tensor:
    """H_lam = (1 - lam) H + lam blockdiag_b(H): H's b x b diagonal blocks kept, the rest scaled by 1 - lam.

    lam = 0 is H; lam = 1 is the block-diagonal Hessian the block objectives see (b = 1: diag H). A convex
    combination of two positive semidefinite matrices, so H_lam stays PSD; it shrinks the cross-block
    correlations that a few calibration windows estimate worst (a d_in x d_in H from 32 k tokens of one domain)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"Hessian shrinkage must be in [0, 1], got {lam}")
    d = H.shape[0]
    if b <= 0 or d % b:
        raise ValueError(f"Hessian shrinkage block {b} does not divide the input width {d}")
    if lam == 0.0:
        return H
    out = H * (1.0 - lam)
    n = d // b
    out.view(n, b, n, b).diagonal(dim1=0, dim2=2).copy_(H.view(n, b, n, b).diagonal(dim1=0, dim2=2))
    return out


def _t(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.transpose(-1, -2)


def _cg(apply, rhs_residual: torch.Tensor, x: torch.Tensor, precond: torch.Tensor, iters: int, tol: float):
    """Preconditioned CG from x on a symmetric positive (semi)definite operator; r = b - apply(x) is given.

    Stops after ``iters`` steps or when |r| falls below tol . |r_0|; returns x (updated in place)."""
    r = rhs_residual
    z = r / precond
    d = z.clone()
    rz = float((r * z).sum())
    r0 = float(r.norm())
    for _ in range(iters):
        if not r0 > 0 or float(r.norm()) <= tol * r0:
            break
        Ad = apply(d)
        dAd = float((d * Ad).sum())
        if not dAd > 0:  # direction of zero curvature: nothing more to gain along it
            break
        alpha = rz / dAd
        x.add_(d, alpha=alpha)
        r.sub_(Ad, alpha=alpha)
        z = r / precond
        rz_new = float((r * z).sum())
        d.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return x


def refit_values(A, S, B, H, mask, WH, iters: int = 10, tol: float = 1e-4) -> torch.Tensor:
    """S minimising L over the entries where mask is True (A, B fixed); H is the (damped) Hessian, WH = W H."""
    P = _t(A) @ A  # A^T A, block-diagonal [n0, b, b]
    Bt = _t(B)
    Q = left_mul(B, right_mul(H, Bt))  # B H B^T
    K = right_mul(left_mul(_t(A), WH), Bt)  # A^T W H B^T
    m = mask.to(S.dtype)
    apply = lambda D: left_mul(P, D @ Q).mul_(m)  # noqa: E731
    precond = (P.diagonal(dim1=-2, dim2=-1).reshape(-1, 1) * Q.diagonal()[None, :]).clamp_min(1e-30)
    S = S * m
    r = (K - left_mul(P, S @ Q)).mul_(m)
    return _cg(apply, r, S, precond, iters, tol)


def refit_output_wrapper(A, S, B, H, WH, damp: float = 1e-6) -> torch.Tensor:
    """A minimising L with S, B fixed: per output block p, A_p = (W_p H Y_p^T)(Y_p H Y_p^T)^-1, Y = S B.

    A block whose b x b Gram is not positive definite (even with damp . mean diagonal added) keeps its value."""
    n0, b, _ = A.shape
    d_in = S.shape[1]
    Y = right_mul(S, B)
    YH = Y @ H
    Yv, YHv = Y.view(n0, b, d_in), YH.view(n0, b, d_in)
    G = Yv @ _t(YHv)  # Y_p H Y_p^T
    N = WH.view(n0, b, d_in) @ _t(Yv)  # W_p H Y_p^T
    eye = torch.eye(b, dtype=G.dtype, device=G.device)
    G = G + damp * G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None] * eye
    L, info = torch.linalg.cholesky_ex(G.double())
    At = torch.cholesky_solve(_t(N).double(), L).to(A.dtype)  # G^-1 N^T = A_p^T
    ok = (info == 0) & torch.isfinite(At).flatten(1).all(1)
    return torch.where(ok[:, None, None], _t(At), A)


def _diag_blocks(X: torch.Tensor, Y: torch.Tensor, b: int) -> torch.Tensor:
    """The b x b diagonal blocks of X @ Y for X [d, k], Y [k, d]: [d/b, b, b], at d k b cost."""
    d, k = X.shape
    return X.reshape(d // b, b, k) @ Y.reshape(k, d // b, b).transpose(0, 1)


def refit_input_wrapper(A, S, B, H, WH, iters: int = 5, tol: float = 1e-4) -> torch.Tensor:
    """B minimising L over block-diagonal B (A, S fixed), by CG over B's blocks; returns new blocks."""
    n1, b, _ = B.shape
    Z = left_mul(A, S)
    U = Z.T @ Z  # Z^T Z [d_in, d_in]
    apply = lambda D: _diag_blocks(right_mul(U, D), H, b)  # noqa: E731
    rhs = _diag_blocks(Z.T, WH, b)  # blocks of Z^T W H
    precond = (U.diagonal().view(n1, b, 1) * H.diagonal().view(n1, 1, b)).clamp_min(1e-30)
    Bn = B.clone()
    r = rhs - apply(Bn)
    return _cg(apply, r, Bn, precond, iters, tol)


def refit(W: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, H: torch.Tensor, *,
          rounds: int = 6, value_iters: int = 10, wrapper_iters: int = 5, damp: float = 0.01,
          name: str = "layer", loss_before: float | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Alternate S (CG), A (closed form), B (CG) for ``rounds`` rounds with S's sparsity pattern fixed.

    W [d_out, d_in], A [d_out/b, b, b], S [d_out, d_in] (its nonzeros are the mask), B [d_in/b, b, b], H
    [d_in, d_in]; every factor fp32. Returns (A, S, B, info) with info["loss_before"], info["loss_after"] (the
    undamped output loss, fp64) and info["accepted"]; when the refit does not lower the loss or produces
    non-finite values, the given factors come back unchanged (accepted False). ``loss_before``: the output loss
    of the given factors when the caller has it already (skips one fp64 evaluation)."""
    W, A, S, B, H = (x.float() for x in (W, A, S, B, H))
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: the input Hessian must be square [d_in, d_in] = [{W.shape[1]}, {W.shape[1]}], "
                         f"got {tuple(H.shape)}")
    Hd = damped(H, damp, name)
    mask = S != 0
    before = output_loss(W, product(A, S, B), H) if loss_before is None else loss_before
    WH = W @ Hd
    A1, S1, B1 = A.clone(), S.clone(), B.clone()
    for _ in range(rounds):
        S1 = refit_values(A1, S1, B1, Hd, mask, WH, value_iters)
        A1 = refit_output_wrapper(A1, S1, B1, Hd, WH)
        if wrapper_iters:
            B1 = refit_input_wrapper(A1, S1, B1, Hd, WH, wrapper_iters)
    finite = all(bool(torch.isfinite(x).all()) for x in (A1, S1, B1))
    after = output_loss(W, product(A1, S1, B1), H) if finite else float("nan")
    if not after <= before:
        return A, S, B, {"loss_before": before, "loss_after": before, "accepted": False}
    S1 = torch.where(mask, S1, torch.zeros((), dtype=S1.dtype, device=S1.device))
    return A1, S1, B1, {"loss_before": before, "loss_after": after, "accepted": True}
