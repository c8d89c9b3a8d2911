"""The batched objective: layouts, products and analytic gradients against autograd on dense matrices."""
from __future__ import annotations

import pytest
import torch

from solver import bcd_objective as obj
from solver.blockdiag import to_dense


def _problem(K=2, d_out=12, d_in=16, b=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(W=r(K, d_out, d_in), S=r(K, d_out, d_in), A=r(K, d_out // b, b, b), B=r(K, d_in // b, b, b),
                h=torch.rand(K, d_in, generator=g, dtype=dtype) + 0.1, b=b)


@pytest.mark.parametrize("shape", [(12, 16, 4), (8, 24, 8), (16, 8, 4)])
def test_column_layout_round_trip_and_groups(shape):
    d_out, d_in, b = shape
    X = torch.arange(2 * d_out * d_in, dtype=torch.float32).view(2, d_out, d_in)
    Xc = obj.to_cols(X, b)
    assert Xc.shape == (2, d_in // b, d_out, b)
    assert torch.equal(obj.to_rows(Xc), X)
    assert torch.equal(Xc[1, 1, 3], X[1, 3, b:2 * b])  # column block q of row i is contiguous
    # every group of 4 input columns is 4 consecutive values in both layouts (same set of groups)
    rows = {tuple(v.tolist()) for v in X.reshape(-1, 4)}
    assert rows == {tuple(v.tolist()) for v in Xc.reshape(-1, 4)}


def test_products_equal_dense_block_diagonal():
    p = _problem()
    b, K = p["b"], p["S"].shape[0]
    Ad = torch.stack([to_dense(p["A"][k]) for k in range(K)])
    Bd = torch.stack([to_dense(p["B"][k]) for k in range(K)])
    Sc = obj.to_cols(p["S"], b)
    T, E = obj.forward(p["A"], Sc, p["B"], p["W"])
    torch.testing.assert_close(T, p["S"] @ Bd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(E, Ad @ p["S"] @ Bd - p["W"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(obj.to_rows(obj.rmul_t(p["W"], p["B"])), p["W"] @ Bd.transpose(-1, -2),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(obj.lmul_t(p["A"], p["W"]), Ad.transpose(-1, -2) @ p["W"], rtol=1e-12, atol=1e-12)


def test_analytic_gradients_equal_autograd():
    p = _problem(seed=3)
    b = p["b"]
    A, S, B = (p[k].clone().requires_grad_() for k in ("A", "S", "B"))
    Z = obj.loss_scale(p["W"], p["h"]).double()
    K = S.shape[0]
    Ad = torch.stack([torch.block_diag(*A[k].unbind(0)) for k in range(K)])
    Bd = torch.stack([torch.block_diag(*B[k].unbind(0)) for k in range(K)])
    L_ref = (((Ad @ S @ Bd - p["W"]) ** 2) * p["h"][:, None, :]).sum(dim=(1, 2)) / Z
    L_ref.sum().backward()
    hz = p["h"] * (2.0 / Z)[:, None]
    Sc = obj.to_cols(p["S"], b)
    T, E = obj.forward(p["A"], Sc, p["B"], p["W"])
    G = obj.weighted_residual(E, hz)
    dT, Gamma = obj.core_gradient(p["A"], p["B"], G)
    gA, gB = obj.wrapper_gradients(G, T, Sc, dT, b)
    torch.testing.assert_close(obj.loss_from(E, G), L_ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(obj.to_rows(Gamma), S.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gA, A.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gB, B.grad, rtol=1e-10, atol=1e-12)


def test_exact_loss_is_the_normalised_proxy():
    p = _problem(K=1, seed=5)
    W, A, S, B, h = (p[k][0] for k in ("W", "A", "S", "B", "h"))
    ref = ((to_dense(A) @ S @ to_dense(B) - W) ** 2 * h).sum() / (W**2 * h).sum()
    assert obj.exact_loss(W, A, S, B, h) == pytest.approx(float(ref), rel=1e-12)
    assert obj.exact_loss(W, A, torch.zeros_like(S), B, h) == pytest.approx(1.0)
