"""Mask-only baselines (solver.baselines), the proxy loss and the method registry (solver.methods).

Hand oracles for magnitude, Wanda and NoWag-P (including the columns-then-rows normaliser order),
the spec identity "NoWag-P in 2:4 = Wanda with each input channel's score divided by the weight
column's L2 norm" (armor-algorithm.md section 6) on random data, and the registry contract.
"""
from __future__ import annotations

import math

import pytest
import torch

from solver.baselines import magnitude_score, nowag_score, prune_by_score, wanda_score
from solver.config import SolverConfig
from solver.methods import Problem, get_method, solve
from solver.normalizer import normalize
from solver.objective import proxy_loss
from solver.sparsity import is_24, mask_24
from solver.stats import LayerStats


def test_magnitude_hand_example():
    W = torch.tensor([[0.5, -3.0, 2.0, 1.0], [4.0, 0.0, -1.0, -5.0]])
    S, M = prune_by_score(W, magnitude_score(W))
    assert torch.equal(S, torch.tensor([[0.0, -3.0, 2.0, 0.0], [4.0, 0.0, 0.0, -5.0]]))
    assert torch.equal(M, S != 0)


def test_wanda_hand_example():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    # |W| * sqrt(h) = [4, 2, 3, 2]: keep columns 0 and 2 (magnitude alone would keep 2 and 3)
    S, _ = prune_by_score(W, wanda_score(W, torch.tensor([16.0, 1.0, 1.0, 0.25])))
    assert S.tolist() == [[1.0, 0.0, 3.0, 0.0]]
    # [4, 4, 3, 4]: three-way tie, the two leftmost win
    S, _ = prune_by_score(W, wanda_score(W, torch.tensor([16.0, 4.0, 1.0, 1.0])))
    assert S.tolist() == [[1.0, -2.0, 0.0, 0.0]]


# Column norms c = [6, 5, sqrt(18), sqrt(2)]. Columns-then-rows: row 0 of W / c squared is
# [16/36, 9/25, 9/18, 1/2] = [0.444, 0.36, 0.5, 0.5] -> keep columns 2, 3 (row scaling is common
# to a row and cannot change its ranking). Rows-first would normalise rows to unit norm first,
# shrinking row 2's share of columns 0, 1 and ranking row 0 as [0.368, 0.340, 0.286, 0.286] -> keep 0, 1.
W_ORDER = torch.tensor([[4.0, 3.0, 3.0, 1.0], [2.0, 0.0, 3.0, 1.0], [4.0, 4.0, 0.0, 0.0]])


def rows_then_columns(W: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    W1 = W / (W.norm(dim=1, keepdim=True) + eps)
    return W1 / (W1.norm(dim=0) + eps)


def test_nowag_uses_columns_then_rows():
    h = torch.ones(4)
    S, M = prune_by_score(W_ORDER, nowag_score(W_ORDER, h))
    assert M.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]]
    assert torch.equal(S, W_ORDER * M)
    wrong = mask_24(rows_then_columns(W_ORDER).pow(2) * h)
    assert wrong[0].int().tolist() == [1, 1, 0, 0], "example must separate the two orders"
    # the score itself is W_bar^2 * h with W_bar normalised columns-then-rows
    c = torch.tensor([6.0, 5.0, math.sqrt(18.0), math.sqrt(2.0)]) + 1e-5
    W1 = W_ORDER / c
    W_bar = W1 / (W1.norm(dim=1, keepdim=True) + 1e-5)
    # fp32, same formula evaluated in a different order: a few ulps
    assert torch.allclose(nowag_score(W_ORDER, h), W_bar.pow(2), rtol=1e-6, atol=1e-7)


def test_nowag_score_weighs_by_h():
    # row 0 with h = [1, 1, 0.5, 1]: [0.444, 0.36, 0.25, 0.5] -> keep columns 0 and 3
    M = mask_24(nowag_score(W_ORDER, torch.tensor([1.0, 1.0, 0.5, 1.0])))
    assert M[0].int().tolist() == [1, 0, 0, 1]


def test_normalizer_rows_have_unit_norm():
    W = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    W_bar, r, c = normalize(W)
    assert torch.allclose(torch.diag(r) @ W_bar @ torch.diag(c), W, rtol=1e-5, atol=1e-6)  # fp32 round trip
    assert torch.allclose(W_bar.norm(dim=1), torch.ones(20), atol=1e-4)  # eps = 1e-5 on O(1) norms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nowag_is_wanda_divided_by_column_norm(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 64, generator=g) * torch.rand(64, generator=g) * 3  # columns of very different norms
    h = torch.rand(64, generator=g) * 2 + 0.01
    nowag = mask_24(nowag_score(W, h))
    wanda_div = mask_24(wanda_score(W, h) / W.norm(dim=0))
    assert torch.equal(nowag, wanda_div), f"{int((nowag != wanda_div).sum())} entries differ"
    assert not torch.equal(nowag, mask_24(wanda_score(W, h))), "data must separate NoWag-P from plain Wanda"


def test_proxy_loss_endpoints():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(20, 12, generator=g)
    h = torch.rand(12, generator=g) + 0.1
    # fp32 ratio of two sums computed in a different order
    assert proxy_loss(W, torch.zeros_like(W), h) == pytest.approx(1.0, rel=1e-6)
    assert proxy_loss(W, W.clone(), h) == 0.0
    S, _ = prune_by_score(W, nowag_score(W, h))
    assert 0.0 < proxy_loss(W, S, h) < 1.0
    # scale of h does not matter
    assert proxy_loss(W, S, 7.0 * h) == pytest.approx(proxy_loss(W, S, h), rel=1e-6)


def _problems(with_stats=True):
    g = torch.Generator().manual_seed(5)
    out = []
    for name, shape in [("model.layers.0.self_attn.q_proj", (20, 12)), ("model.layers.0.mlp.down_proj", (8, 16))]:
        W = torch.randn(*shape, generator=g)
        h = torch.rand(shape[1], generator=g) + 0.1
        out.append(Problem(name, W, LayerStats(h, 32) if with_stats else None))
    return out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "nowag"])
def test_registry_mask_only_methods(method):
    problems = _problems()
    results = solve(method, problems, SolverConfig(method=method))
    assert len(results) == len(problems)
    for p, res in zip(problems, results):
        S = res.factors.S
        assert S.shape == p.W.shape and is_24(S)
        assert torch.equal(S[S != 0], p.W[S != 0]), "mask-only methods keep weights unchanged"
        assert res.report.loss_final >= 0.0 and res.report.status == "ok"
        if method == "nowag":
            assert res.report.loss_final == res.report.loss_start
        else:
            assert res.report.loss_final >= res.report.loss_start * (1 - 1e-6)  # NoWag-P is optimal here
    assert get_method(method).uses_wrappers is False


def test_magnitude_needs_no_stats():
    (res,) = solve("magnitude", _problems(with_stats=False)[:1], SolverConfig())
    assert is_24(res.factors.S) and res.report.loss_final is None


def test_missing_statistics_raise_clear_errors():
    with pytest.raises(ValueError, match=r"q_proj.*'wanda' needs calibration statistics"):
        solve("wanda", _problems(with_stats=False), SolverConfig())
    with pytest.raises(ValueError, match=r"q_proj.*'sparsegpt' needs the full input Hessian"):
        solve("sparsegpt", _problems(), SolverConfig())
    with pytest.raises(ValueError, match="unknown method 'obs'"):
        solve("obs", _problems(), SolverConfig())


def test_invalid_h_entries_are_repaired_and_counted():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(8, 12, generator=g)
    h = torch.rand(12, generator=g) + 0.1
    h_bad = h.clone()
    h_bad[[1, 7]] = torch.tensor([float("nan"), 0.0])
    h_fixed = h.clone()
    h_fixed[[1, 7]] = h[[0, 2, 3, 4, 5, 6, 8, 9, 10, 11]].mean()
    for method in ("wanda", "nowag"):
        (bad,) = solve(method, [Problem("l", W, LayerStats(h_bad, 32))], SolverConfig())
        (ref,) = solve(method, [Problem("l", W, LayerStats(h_fixed, 32))], SolverConfig())
        assert bad.report.notes["h_replaced"] == 2
        assert torch.equal(bad.factors.S, ref.factors.S)
        assert bad.report.loss_final == ref.report.loss_final
