"""The output refit (solver/refit.py): each step's optimum against a direct solve, monotonicity, bad input,
and ARMOR's --refit output (report in the output loss, guarantee kept, full statistics required)."""
import pytest
import torch

from solver import methods
from solver.blockdiag import identity_blocks, left_mul, product, right_mul, to_dense
from solver.config import SolverConfig
from solver.methods import Problem, solve, stats_needed
from solver.refit import (damped, output_loss, refit, refit_input_wrapper, refit_output_wrapper,
                          refit_values)
from solver.sparsity import is_24, mask_24
from solver.stats import LayerStats


def _problem(d_out=16, d_in=24, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    X = torch.randn(n, d_in, generator=g) @ (torch.eye(d_in) + 0.4 * torch.randn(d_in, d_in, generator=g) / d_in**0.5)
    return W, 2 * X.T @ X / n


def _loss64(W, A, S, B, H):
    """tr(E H E^T) in fp64 with dense A, B (the reference formulation)."""
    E = W.double() - to_dense(A).double() @ S.double() @ to_dense(B).double()
    return float(((E @ H.double()) * E).sum())


def _wrappers(d_out, d_in, b, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = identity_blocks(d_out // b, b) + 0.2 * torch.randn(d_out // b, b, b, generator=g)
    B = identity_blocks(d_in // b, b) + 0.2 * torch.randn(d_in // b, b, b, generator=g)
    return A, B


def test_values_step_is_the_masked_least_squares_optimum():
    # With A, B fixed, L is a quadratic in the kept entries: solve its normal equations directly (Kronecker form,
    # fp64) and compare. Tolerance 1e-4 relative: fp32 CG run to convergence on a well-conditioned problem.
    W, H = _problem(8, 16)
    b = 4
    A, B = _wrappers(8, 16, b)
    M = mask_24(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)).abs())
    Hd = damped(H, 0.01)
    S = refit_values(A, W * M, B, Hd, M, W @ Hd, iters=400, tol=1e-9)
    Ad, Bd = to_dense(A).double(), to_dense(B).double()
    # vec(A S B) = (B^T kron A) vec(S) in column-major vec; loss = |(Hd^1/2 kron I)(vec W - K vec S)|^2
    K = torch.kron(Bd.T.contiguous(), Ad)
    G = torch.kron(Hd.double(), torch.eye(8, dtype=torch.float64))
    idx = M.T.reshape(-1).nonzero()[:, 0]  # column-major positions of the kept entries
    Ks = K[:, idx]
    lhs = Ks.T @ G @ Ks
    rhs = Ks.T @ G @ W.double().T.reshape(-1)
    s = torch.linalg.solve(lhs, rhs)
    got = S.double().T.reshape(-1)[idx]
    assert torch.allclose(got, s, rtol=1e-4, atol=1e-4 * float(s.abs().max()))
    assert bool((S[~M] == 0).all())


def test_output_wrapper_step_zeroes_the_gradient_in_A():
    W, H = _problem(16, 24)
    b = 8
    A, B = _wrappers(16, 24, b)
    S = W * mask_24(W.abs())
    A2 = refit_output_wrapper(A, S, B, H, W @ H)
    # dL/dA = -2 (W - A S B) H (S B)^T, restricted to A's diagonal blocks, must vanish at the optimum
    Y = right_mul(S, B).double()
    E = W.double() - left_mul(A2.double(), Y)
    grad = (E @ H.double() @ Y.T).view(2, b, 2, b).diagonal(dim1=0, dim2=2)
    assert float(grad.abs().max()) < 1e-6 * float((W.double() @ H.double() @ W.double().T).abs().max())
    assert _loss64(W, A2, S, B, H) <= _loss64(W, A, S, B, H)


def test_input_wrapper_step_converges_to_the_block_optimum():
    W, H = _problem(16, 24)
    b = 8
    A, B = _wrappers(16, 24, b)
    S = W * mask_24(W.abs())
    B2 = refit_input_wrapper(A, S, B, H, W @ H, iters=300, tol=1e-10)
    Z = left_mul(A, S).double()
    E = W.double() - Z @ to_dense(B2).double()
    grad = torch.stack([(Z.T @ E @ H.double())[q * b:(q + 1) * b, q * b:(q + 1) * b] for q in range(3)])
    assert float(grad.abs().max()) < 1e-4 * float((Z.T @ W.double() @ H.double()).abs().max())
    assert _loss64(W, A, S, B2, H) <= _loss64(W, A, S, B, H)


def test_refit_lowers_the_output_loss_keeps_the_mask_and_reports_it():
    W, H = _problem(32, 64, n=2000)
    b = 16
    A, B = identity_blocks(2, b), identity_blocks(4, b)
    S = W * mask_24(W.abs())
    A2, S2, B2, info = refit(W, A, S, B, H, rounds=3)
    assert info["accepted"]
    assert info["loss_before"] == pytest.approx(output_loss(W, S, H), rel=1e-12)
    assert info["loss_after"] == pytest.approx(output_loss(W, product(A2, S2, B2), H), rel=1e-12)
    assert info["loss_after"] < 0.8 * info["loss_before"]  # measured 0.53x on this problem
    assert is_24(S2) and bool((S2[S == 0] == 0).all())
    # more rounds never raise it (every step is a minimisation from the current point)
    losses = [refit(W, A, S, B, H, rounds=r)[3]["loss_after"] for r in (1, 2, 4)]
    assert losses[0] >= losses[1] >= losses[2]


def test_refit_keeps_exact_factors():
    # an already 2:4 weight with A = B = I has output loss 0; the refit must not move away from it
    W, H = _problem(8, 16)
    W = W * mask_24(W.abs())
    A, S, B, info = refit(W, identity_blocks(2, 4), W.clone(), identity_blocks(4, 4), H)
    assert info["loss_before"] == 0.0
    assert info["loss_after"] <= 1e-12
    assert torch.allclose(product(A, S, B), W, atol=1e-5)


@pytest.mark.parametrize("bad, message", [("nan", "non-finite"), ("zero", "no energy"), ("shape", "square")])
def test_refit_bad_hessian_names_the_layer(bad, message):
    W, H = _problem(8, 16)
    if bad == "nan":
        H[3, 3] = float("nan")
    elif bad == "zero":
        H = torch.zeros_like(H)
    else:
        H = H[:8]
    with pytest.raises(ValueError, match=f"model.layers.7.mlp.up_proj.*{message}"):
        refit(W, identity_blocks(2, 4), W * mask_24(W.abs()), identity_blocks(4, 4), H,
              name="model.layers.7.mlp.up_proj")


def test_refit_with_dead_input_channels_stays_finite():
    W, H = _problem(8, 16)
    H[:, 5] = 0
    H[5, :] = 0  # channel 5 never active: the damping keeps every solve defined
    A, S, B, info = refit(W, identity_blocks(2, 4), W * mask_24(W.abs()), identity_blocks(4, 4), H)
    assert all(bool(torch.isfinite(x).all()) for x in (A, S, B))
    assert info["loss_after"] <= info["loss_before"]


def _armor_problems(n=2, d_out=32, d_in=64, full=True):
    out = []
    for i in range(n):
        W, H = _problem(d_out, d_in, n=1000, seed=10 + i)
        out.append(Problem(f"layers.{i}.proj", W, LayerStats(h=H.diagonal().clone(), n_tokens=1000,
                                                             H=H if full else None)))
    return out


def test_armor_refit_reports_output_losses_and_beats_plain_armor():
    probs = _armor_problems()
    base = SolverConfig(block_size=16, iterations=30, lr=3e-3, sparse_rounds=2, objective="block-hessian")
    plain = solve("armor", probs, base)
    fitted = solve("armor", probs, SolverConfig(**{**base.to_dict(), "refit": "output"}))
    for p, r0, r1 in zip(probs, plain, fitted):
        W, H = p.W, p.stats.H
        out0 = output_loss(W, r0.factors.to_dense(), H)
        out1 = output_loss(W, r1.factors.to_dense(), H)
        assert r1.report.loss_final == pytest.approx(out1, rel=1e-6)
        assert r1.report.loss_final <= r1.report.loss_start
        assert out1 < out0  # the refit lowers what the BCD reached
        n = r1.report.notes
        assert n["output_loss_bcd"] == pytest.approx(out0, rel=1e-6)
        assert n["bcd_loss_final"] == pytest.approx(r0.report.loss_final, rel=1e-9)
        assert n["refit"] == "output" and n["refit_from"] in ("armor", "nowag")
        assert is_24(r1.factors.S)


def _nowag_mask(p):
    from solver.baselines import nowag_score

    return mask_24(nowag_score(p.W, p.stats.h))


def test_armor_refit_start_loss_is_the_nowag_start():
    p = _armor_problems(1)[0]
    r = solve("armor", [p], SolverConfig(block_size=16, iterations=5, refit="output"))[0]
    assert r.report.loss_start == pytest.approx(output_loss(p.W, p.W * _nowag_mask(p), p.stats.H), rel=1e-9)


def test_refit_needs_full_statistics():
    cfg = SolverConfig(block_size=16, iterations=5, refit="output")
    assert stats_needed(cfg) == "full"
    assert methods.stats_request(cfg) == {"full": True, "hessian_block": None}
    probs = _armor_problems(1, full=False)
    with pytest.raises(ValueError, match="layers.0.proj.*full input Hessian"):
        methods.solve("armor", probs, cfg)
    with pytest.raises(ValueError, match="refit must be one of"):
        SolverConfig(refit="always")
