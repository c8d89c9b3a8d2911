"""SparseGPT 2:4 (solver.sparsegpt) against a plain per-column OBS reference written here.

The reference has no lazy blocks, runs in float64, inverts H with ``torch.linalg.inv`` (the
implementation uses a Cholesky inverse) and picks each row's kept pair with a Python sort, so it
shares no code path with the implementation beyond torch itself.
"""
from __future__ import annotations

import pytest
import torch

from solver.baselines import wanda_score, prune_by_score
from solver.config import SolverConfig
from solver.methods import Problem, solve
from solver.sparsegpt import MAX_DAMP_RETRIES, sparsegpt_24, solve_layers
from solver.sparsity import is_24
from solver.stats import LayerStats


def reference_sparsegpt(W: torch.Tensor, H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Textbook OBS 2:4 sweep: one column at a time, every later column updated immediately."""
    W = W.double().clone()
    H = H.double().clone()
    d_out, d_in = W.shape
    for j in range(d_in):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(d_in, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    keep = torch.zeros(d_out, 4, dtype=torch.bool)
    for j in range(d_in):
        if j % 4 == 0:
            score = (W[:, j : j + 4] / torch.diagonal(U)[j : j + 4]).pow(2)
            keep.zero_()
            for i in range(d_out):
                # largest score first; on equal scores the lower column index first
                order = sorted(range(4), key=lambda k: (-float(score[i, k]), k))
                keep[i, order[:2]] = True
        q = torch.where(keep[:, j % 4], W[:, j], torch.zeros((), dtype=torch.float64))
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
        W[:, j] = q
    return W


def correlated_problem(d_out: int, d_in: int, n_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.6 * torch.randn(d_in, d_in, generator=g) / d_in**0.5
    X = torch.randn(n_tokens, d_in, generator=g) @ mix  # correlated input channels
    H = 2.0 * X.T @ X / n_tokens
    W = torch.randn(d_out, d_in, generator=g)
    return W, H, X


def _report(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"max abs err {d.max().item():.3e}, mean {d.mean().item():.3e}"


@pytest.mark.parametrize(
    "d_out, d_in, block",
    [(8, 16, 4), (8, 16, 8), (6, 12, 4), (6, 12, 8), (8, 16, 128), (5, 20, 12)],
)
def test_matches_per_column_reference_in_float64(d_out, d_in, block):
    W, H, _ = correlated_problem(d_out, d_in, n_tokens=64, seed=d_out * 100 + d_in + block)
    ref = reference_sparsegpt(W, H)
    S, info = sparsegpt_24(W, H, block=block, damp=0.01, sweep_dtype=torch.float64)
    assert info["damp_retries"] == 0 and info["dead_columns"] == 0
    assert torch.equal(S != 0, ref != 0), "masks differ"
    # Same algorithm, same dtype, different update order (lazy vs immediate) and inverse route:
    # float64 rounding differences only.
    assert torch.allclose(S, ref, rtol=1e-9, atol=1e-9), _report(S, ref)


@pytest.mark.parametrize("block", [4, 8])
def test_fp32_sweep_matches_reference(block):
    W, H, _ = correlated_problem(8, 16, n_tokens=64, seed=7)
    ref = reference_sparsegpt(W, H)
    S, _ = sparsegpt_24(W, H, block=block, damp=0.01)  # default fp32 sweep
    assert S.dtype == torch.float32
    assert torch.equal(S != 0, ref != 0), "masks differ"
    # fp32 sweep vs fp64 reference: a few ulps of fp32 accumulated over 16 columns.
    assert torch.allclose(S.double(), ref, rtol=1e-4, atol=1e-5), _report(S, ref)


def test_lazy_block_size_does_not_change_the_result():
    W, H, _ = correlated_problem(12, 32, n_tokens=100, seed=3)
    outs = [sparsegpt_24(W, H, block=b, sweep_dtype=torch.float64)[0] for b in (4, 8, 12, 32, 128)]
    for S in outs[1:]:
        # Only the grouping of float64 additions changes between block sizes.
        assert torch.allclose(S, outs[0], rtol=1e-10, atol=1e-10), _report(S, outs[0])


def test_diagonal_hessian_is_magnitude_pruning_without_updates():
    # H = 3 I: U is diagonal and uniform, so the score is w^2 up to one constant and no weight moves.
    W = torch.tensor([[0.5, -3.0, 2.0, 1.0, 1.0, 1.0, 1.0, -1.0], [4.0, 0.0, -1.0, -5.0, 0.1, 0.2, 0.3, 0.4]])
    S, _ = sparsegpt_24(W, 3.0 * torch.eye(8), block=4)
    expected = torch.tensor(
        # row 0, group 1 is a 4-way tie in |w|: the two leftmost are kept
        [[0.0, -3.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0], [4.0, 0.0, 0.0, -5.0, 0.0, 0.0, 0.3, 0.4]]
    )
    assert torch.equal(S, expected)
    assert not bool(torch.signbit(S[S == 0]).any()), "pruned entries must be +0.0"


def test_dead_columns_are_zeroed_and_match_reference():
    W, H, X = correlated_problem(8, 16, n_tokens=64, seed=11)
    X[:, [2, 9]] = 0.0  # two input channels never fire
    H = 2.0 * X.T @ X / X.shape[0]
    S, info = sparsegpt_24(W, H, block=8, sweep_dtype=torch.float64)
    assert info["dead_columns"] == 2
    assert torch.equal(S[:, [2, 9]], torch.zeros(8, 2, dtype=torch.float64))
    assert is_24(S)
    ref = reference_sparsegpt(W, H)
    # Same comparison as the float64 reference test above.
    assert torch.allclose(S, ref, rtol=1e-9, atol=1e-9), _report(S, ref)


def _problem(name, W, H):
    return Problem(name, W, LayerStats(torch.diagonal(H).clone(), 64, H))


def test_solve_layers_contract():
    W, H, _ = correlated_problem(16, 24, n_tokens=80, seed=5)
    W[0, :4] = torch.tensor([-0.0, -0.0, -0.0, -0.0])
    (res,) = solve("sparsegpt", [_problem("model.layers.0.mlp.up_proj", W, H)], SolverConfig(sparsegpt_block=8))
    S = res.factors.S
    assert S.shape == W.shape and S.dtype == torch.float32 and S.device.type == "cpu"
    assert is_24(S) and bool(torch.isfinite(S).all())
    assert not bool(torch.signbit(S[S == 0]).any()), "zeros must be +0.0"
    assert res.factors.A_blocks is None and res.factors.B_blocks is None
    nowag = solve("nowag", [_problem("x", W, H)], SolverConfig())[0]
    assert res.report.loss_start == pytest.approx(nowag.report.loss_final, rel=0, abs=0)
    assert 0.0 <= res.report.loss_final
    assert res.report.status == "ok" and res.report.notes["damp_retries"] == 0
    assert res.report.seconds >= 0.0


def test_beats_wanda_on_output_error_with_correlated_inputs():
    W, H, X = correlated_problem(32, 64, n_tokens=512, seed=0)
    S_gpt = solve_layers([_problem("l", W, H)], SolverConfig())[0].factors.S
    S_wanda, _ = prune_by_score(W, wanda_score(W, torch.diagonal(H)))
    err_gpt = ((W - S_gpt) @ X.T).pow(2).sum().item()
    err_wanda = ((W - S_wanda) @ X.T).pow(2).sum().item()
    # OBS minimises this error greedily; measured ratio on this seed is 0.81, so 0.9 leaves margin.
    assert err_gpt < 0.9 * err_wanda, (err_gpt, err_wanda)


def _indefinite_hessian(d_in: int, off: float) -> torch.Tensor:
    # Pairs [[1, off], [off, 1]] on the diagonal: eigenvalues 1 + off and 1 - off, mean diag 1.
    H = torch.eye(d_in)
    for k in range(0, d_in, 2):
        H[k, k + 1] = H[k + 1, k] = off
    return H


def test_damping_retries_are_recorded():
    # Smallest eigenvalue -4: needs lam > 4; lam goes 0.01 -> 0.1 -> 1 -> 10, i.e. 3 retries.
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    (res,) = solve_layers([_problem("l", W, _indefinite_hessian(8, 5.0))], SolverConfig())
    assert res.report.status == "ok"
    assert res.report.notes["damp_retries"] == 3
    assert res.report.notes["damp"] == pytest.approx(10.0)
    assert is_24(res.factors.S) and bool(torch.isfinite(res.factors.S).all())


def test_cholesky_failure_falls_back_to_nowag():
    # Smallest eigenvalue -999: even the largest damping (0.01 * 10^MAX_DAMP_RETRIES) cannot fix it.
    assert 0.01 * 10**MAX_DAMP_RETRIES < 999
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    H = _indefinite_hessian(8, 1000.0)
    (res,) = solve_layers([_problem("l", W, H)], SolverConfig())
    nowag = solve("nowag", [_problem("l", W, H)], SolverConfig())[0]
    assert res.report.status == "fallback"
    assert res.report.notes["damp_retries"] == MAX_DAMP_RETRIES
    assert "fallback_reason" in res.report.notes
    assert torch.equal(res.factors.S, nowag.factors.S)
    assert res.report.loss_final == res.report.loss_start
    assert res.report.loss_final == res.report.loss_final  # not NaN


@pytest.mark.parametrize("where", ["W", "H"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_naming_the_layer(where, bad):
    W, H, _ = correlated_problem(4, 8, n_tokens=16, seed=4)
    if where == "W":
        W[1, 3] = bad
    else:
        H[2, 5] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.7\.self_attn\.o_proj.*(NaN|Inf)"):
        solve_layers([_problem("model.layers.7.self_attn.o_proj", W, H)], SolverConfig())


def test_missing_hessian_and_bad_shapes_raise():
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="q_proj.*full input Hessian"):
        solve_layers([Problem("q_proj", W, LayerStats(torch.ones(8), 8, None))], SolverConfig())
    with pytest.raises(ValueError, match="k_proj.*divisible by 4"):
        sparsegpt_24(torch.randn(4, 6), torch.eye(6), name="k_proj")
    with pytest.raises(ValueError, match=r"v_proj.*\[8, 8\]"):
        sparsegpt_24(W, torch.eye(12), name="v_proj")
