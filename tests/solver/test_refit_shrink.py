"""The refit's Hessian shrinkage H_lam = (1 - lam) H + lam T, T = diag H or blockdiag_b(H) (--refit-shrink[-to]):
lam = 0 is today's refit, lam = 1 the block objectives' Hessian, the guarantee holds in H_lam."""
import pytest
import torch

from solver.config import SolverConfig
from solver.methods import Problem, solve
from solver.refit import output_loss, shrunk
from solver.stats import LayerStats


def _problem(d_out=32, d_in=64, n=1000, seed=10):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    X = torch.randn(n, d_in, generator=g) @ (torch.eye(d_in) + 0.4 * torch.randn(d_in, d_in, generator=g) / d_in**0.5)
    H = 2 * X.T @ X / n
    return Problem("layers.0.proj", W, LayerStats(h=H.diagonal().clone(), n_tokens=n, H=H))


def test_shrink_endpoints_are_h_and_the_block_objectives_hessian():
    H = _problem().stats.H
    assert torch.equal(shrunk(H, 0.0, 16), H)
    one = shrunk(H, 1.0, 16)
    blocks = LayerStats(h=H.diagonal(), n_tokens=1, H=H).hessian_blocks(16)  # what the block objectives read
    assert torch.equal(LayerStats(h=H.diagonal(), n_tokens=1, H=one).hessian_blocks(16), blocks)
    assert torch.equal(one, torch.block_diag(*blocks))  # nothing outside the diagonal blocks
    assert torch.equal(shrunk(H, 1.0, 1), torch.diag(H.diagonal()))
    half = shrunk(H, 0.5, 16)
    assert torch.allclose(half, 0.5 * H + 0.5 * one, atol=1e-6)
    assert float(torch.linalg.eigvalsh(half.double()).min()) > 0  # a convex combination of PSD matrices


@pytest.mark.parametrize("lam, b, message", [(-0.1, 16, "in \\[0, 1\\]"), (1.5, 16, "in \\[0, 1\\]"),
                                             (0.5, 24, "does not divide")])
def test_shrink_rejects_bad_arguments(lam, b, message):
    with pytest.raises(ValueError, match=message):
        shrunk(torch.eye(64), lam, b)
    if b == 16:
        with pytest.raises(ValueError, match="refit_shrink"):
            SolverConfig(refit_shrink=lam)
    with pytest.raises(ValueError, match="refit_shrink_to"):
        SolverConfig(refit_shrink_to="eye")


@pytest.mark.parametrize("target, b", [("diag", 1), ("block", 16)])
def test_armor_refit_at_shrink_zero_is_todays_refit_and_shrink_keeps_the_guarantee(target, b):
    p = _problem()
    base = dict(block_size=16, iterations=10, lr=3e-3, sparse_rounds=2, objective="block-hessian", refit="output")
    today = solve("armor", [p], SolverConfig(**base))[0]
    zero = solve("armor", [p], SolverConfig(**base, refit_shrink=0.0))[0]
    assert torch.equal(today.factors.S, zero.factors.S) and torch.equal(today.factors.A_blocks, zero.factors.A_blocks)
    assert zero.report.notes["output_loss_full_h"] == zero.report.loss_final
    r = solve("armor", [p], SolverConfig(**base, refit_shrink=0.5, refit_shrink_to=target))[0]
    Hs = shrunk(p.stats.H, 0.5, b)
    assert r.report.loss_final == pytest.approx(output_loss(p.W, r.factors.to_dense(), Hs), rel=1e-6)
    assert r.report.loss_final <= r.report.loss_start  # the guarantee, in the refit's own objective
    assert r.report.notes["refit_shrink"] == 0.5
    full = r.report.notes["output_loss_full_h"]
    assert full == pytest.approx(output_loss(p.W, r.factors.to_dense(), p.stats.H), rel=1e-6)
