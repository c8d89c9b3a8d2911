"""solver.armor end to end: monotone guarantee, exactness, robustness, batching, determinism."""
from __future__ import annotations

import pytest
import torch

from solver import armor
from solver import bcd_objective as obj
from solver.bcd_state import init_state
from solver.config import SolverConfig
from solver.core_step import group_scores, select, sparse_core_round
from solver.methods import Problem, solve
from solver.objective import proxy_loss
from solver.sparsity import is_24, mask_24
from solver.stats import LayerStats


def _problems(n, d_out=32, d_in=48, seed=0, prefix="l"):
    g = torch.Generator().manual_seed(seed)
    return [Problem(f"{prefix}{i}", torch.randn(d_out, d_in, generator=g),
                    LayerStats(torch.rand(d_in, generator=g) + 0.05, 64)) for i in range(n)]


CFG = SolverConfig(block_size=8, iterations=40, lr=1e-3, patience=10**6)


def test_final_not_worse_than_nowag_and_consistent():
    probs = _problems(3) + _problems(2, d_out=16, d_in=32, seed=1, prefix="m")
    res = solve("armor", probs, CFG)
    for p, r in zip(probs, res):
        rep = r.report
        assert rep.status == "ok" and rep.iterations == 40
        assert rep.loss_final <= rep.loss_start
        assert rep.loss_final < 0.9 * rep.loss_start  # lr 1e-3 for 40 steps: clearly better than NoWag-P
        assert is_24(r.factors.S) and r.factors.is_finite()
        # the reported loss is the loss of the returned factors in the original space (fp32 fold: 1e-5 rel)
        assert proxy_loss(p.W, r.factors.to_dense(), p.stats.h) == pytest.approx(rep.loss_final, rel=1e-5)
        assert rep.notes["mask_changes"] > 0 and rep.notes["failed_solves"] == 0


def test_zero_iterations_is_nowag_p():
    p = _problems(1)[0]
    r = armor.solve_layers([p], SolverConfig(block_size=8, iterations=0))[0]
    nowag = proxy_loss(p.W, p.W * _nowag_mask(p), p.stats.h)
    assert r.report.loss_final == r.report.loss_start
    assert r.report.loss_start == pytest.approx(nowag, rel=1e-5)  # fp32 vs fp64 evaluation
    assert torch.allclose(r.factors.to_dense(), p.W * _nowag_mask(p), atol=1e-5)  # W (.) M up to fp32 fold


def _nowag_mask(p):
    from solver.baselines import nowag_score

    h = p.stats.h / p.stats.h.mean()
    return mask_24(nowag_score(p.W, h)).float()


def test_already_24_weight_is_returned_exactly():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 32, generator=g)
    W = W * mask_24(W.abs()).float()
    p = Problem("sparse", W, LayerStats(torch.rand(32, generator=g) + 0.1, 8))
    r = armor.solve_layers([p], SolverConfig(block_size=8, iterations=20, lr=1e-3))[0]
    assert r.report.loss_start == 0.0 and r.report.loss_final == 0.0
    # only the normaliser round trip (W / c / r * r * c in fp32) separates them: a few ulps
    assert torch.allclose(r.factors.to_dense(), W, rtol=1e-6, atol=1e-7)
    assert torch.equal(r.factors.S != 0, W != 0)


def test_dead_channels_zero_rows_counted_and_finite():
    p = _problems(1, seed=4)[0]
    W = p.W.clone()
    W[3] = 0.0  # an all-zero output row
    W[:, 5] = 0.0  # an all-zero input column
    h = p.stats.h.clone()
    h[[0, 7, 9]] = 0.0  # dead input channels
    h[11] = float("nan")
    r = armor.solve_layers([Problem("dead", W, LayerStats(h, 8))], CFG)[0]
    assert r.report.status == "ok" and r.report.notes["h_replaced"] == 4
    assert r.factors.is_finite() and r.report.loss_final <= r.report.loss_start
    assert torch.all(r.factors.to_dense()[3] == 0)  # r_3 = eps folds the row away: exactly zero


def test_all_zero_weight():
    W = torch.zeros(16, 16)
    r = armor.solve_layers([Problem("zero", W, LayerStats(torch.ones(16), 8))], CFG)[0]
    assert r.report.loss_start == 0.0 and r.report.loss_final == 0.0 and torch.all(r.factors.to_dense() == 0)


def test_collinear_and_zero_b_rows_are_counted_not_nan():
    b = 4
    starts = [armor.prepare("c", torch.randn(8, 16, generator=torch.Generator().manual_seed(5)), torch.ones(16), b)]
    cfg = SolverConfig(block_size=b)
    starts[0].B[0, 1] = starts[0].B[0, 0]  # two identical rows of B_0
    starts[0].B[1, :2] = 0.0  # two zero rows of B_1: any pattern using only them is singular
    starts[0].B[1, 2:] = 0.0
    st = init_state(starts, cfg.block_size, torch.device("cpu"))
    failed = 0
    for t in range(30):
        cand, _ = select(group_scores(st.Gamma, b), torch.rand(1, 2, 4, generator=torch.Generator().manual_seed(t)),
                         "uniform")
        failed += int(sparse_core_round(st, cand, b)["failed_solves"].sum())
    assert failed > 0  # block 1 has an all-zero B: every solve there fails and is counted
    for key in ("S", "G", "Gamma"):
        assert torch.isfinite(getattr(st, key)).all()


def test_nan_weight_is_a_clear_error():
    p = _problems(1)[0]
    W = p.W.clone()
    W[2, 3] = float("nan")
    with pytest.raises(ValueError, match="bad_layer.*NaN"):
        armor.solve_layers([Problem("bad_layer", W, p.stats)], CFG)


def test_block_size_error_names_layer():
    p = _problems(1, d_out=20, d_in=48)[0]
    with pytest.raises(ValueError, match="l0.*block size 8"):
        armor.solve_layers([p], CFG)


def test_nonfinite_solve_falls_back(monkeypatch):
    real = armor.continuous_step

    def poisoned(st, step, lr, b):
        real(st, step, lr, b)
        if step == 3:
            st.V[0].fill_(float("nan"))
            st.S[0].fill_(float("nan"))
            st.E[0].fill_(float("nan"))

    monkeypatch.setattr(armor, "continuous_step", poisoned)
    probs = _problems(2)
    res = armor.solve_layers(probs, CFG)
    assert res[0].report.status == "fallback" and res[1].report.status == "ok"
    assert res[0].factors.is_finite() and res[0].report.loss_final == res[0].report.loss_start
    assert torch.allclose(res[0].factors.to_dense(), probs[0].W * _nowag_mask(probs[0]), atol=1e-5)


def test_batched_equals_one_by_one_and_deterministic():
    probs = _problems(4, seed=9)
    batched = armor.solve_layers(probs, CFG)
    again = armor.solve_layers(probs, CFG)
    single = armor.solve_layers(probs, SolverConfig(**{**CFG.to_dict(), "max_batch": 1}))
    for a, b_, c in zip(batched, again, single):
        assert torch.equal(a.factors.S, b_.factors.S) and torch.equal(a.factors.A_blocks, b_.factors.A_blocks)
        # same per-layer generator and kernels per layer; batching may only reorder fp32 sums: 1e-5 abs
        assert torch.allclose(a.factors.to_dense(), c.factors.to_dense(), atol=1e-5)
        assert a.report.loss_final == pytest.approx(c.report.loss_final, rel=1e-5)


def test_early_stopping_fires_with_no_progress():
    cfg = SolverConfig(block_size=8, iterations=200, lr=1e-9, patience=5)  # Adam barely moves
    r = armor.solve_layers(_problems(1, seed=2), cfg)[0]
    # the sparse step alone converges (each pair re-solved exactly), then patience 5 runs out
    assert r.report.early_stopped and r.report.iterations < 200
    assert r.report.loss_final <= r.report.loss_start


def test_more_sparse_rounds_per_iteration_lower_the_loss():
    probs = _problems(2, seed=4)
    # the NoWag-P start is the exact optimum of every group while A = B = I, so the Adam step must run
    base = dict(block_size=8, iterations=20, lr=1e-3, patience=10**6)
    four = armor.solve_layers(probs, SolverConfig(sparse_rounds=4, **base))
    one = armor.solve_layers(probs, SolverConfig(sparse_rounds=1, **base))
    for f, o, p in zip(four, one, probs):
        assert f.report.loss_final < o.report.loss_final <= o.report.loss_start
        assert f.report.notes["mask_changes"] > o.report.notes["mask_changes"]
        assert proxy_loss(p.W, f.factors.to_dense(), p.stats.h) == pytest.approx(f.report.loss_final, rel=1e-5)
    with pytest.raises(ValueError, match="sparse_rounds"):
        SolverConfig(sparse_rounds=0)


def test_cosine_schedule_decays_to_zero_and_keeps_the_guarantee():
    cfg = SolverConfig(block_size=8, iterations=21, lr=1e-3, lr_schedule="cosine", patience=10**6)
    assert armor.learning_rate(cfg, 1) == pytest.approx(1e-3)
    assert armor.learning_rate(cfg, 11) == pytest.approx(5e-4)
    assert armor.learning_rate(cfg, 21) == pytest.approx(0.0, abs=1e-12)
    assert armor.learning_rate(SolverConfig(lr=1e-3), 7) == 1e-3  # constant is the default
    for r in solve("armor", _problems(2, seed=6), cfg):
        assert r.report.status == "ok" and r.report.loss_final < r.report.loss_start
    with pytest.raises(ValueError, match="lr_schedule"):
        SolverConfig(lr_schedule="linear")
