"""Streaming calibration statistics (solver.stats) against the one-shot formula H = 2 X^T X / N.

The accumulators run in fp32, so they are compared to a float64 one-shot result with a
float32-level tolerance (rtol 1e-5, atol 1e-6 on O(1) entries).
"""
from __future__ import annotations

import pytest
import torch

from solver.stats import DiagAccumulator, HessianAccumulator, LayerStats, repair_h

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 running mean vs float64 one-shot


def one_shot_H(X: torch.Tensor) -> torch.Tensor:
    X = X.reshape(-1, X.shape[-1]).double()
    return 2.0 * X.T @ X / X.shape[0]


def tokens(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def close(a, b):
    d = (a.double() - b.double()).abs()
    assert torch.allclose(a.double(), b.double(), **TOL), f"max abs err {d.max():.3e}, mean {d.mean():.3e}"


SPLITS = [[37], [1, 36], [36, 1], [5, 1, 20, 11], [1] * 37]


@pytest.mark.parametrize("split", SPLITS)
def test_diag_accumulator_equals_one_shot(split):
    X = tokens(37, 12, seed=0)
    acc = DiagAccumulator(12)
    for chunk in torch.split(X, split):
        acc.add(chunk)
    assert acc.n == 37 and acc.dropped == 0 and acc.h.dtype == torch.float32
    close(acc.h, torch.diagonal(one_shot_H(X)))


@pytest.mark.parametrize("split", SPLITS)
def test_hessian_accumulator_equals_one_shot(split):
    X = tokens(37, 12, seed=1)
    acc = HessianAccumulator(12)
    for chunk in torch.split(X, split):
        acc.add(chunk)
    assert acc.n == 37 and acc.H.dtype == torch.float32
    close(acc.H, one_shot_H(X))
    close(acc.h, torch.diagonal(one_shot_H(X)))


def test_3d_batches_and_other_dtypes():
    # [batch, seq, d_in], rounded to bf16 values so that bf16 batches are lossless
    X = tokens(2 * 3 * 5, 8, seed=2).reshape(2, 3 * 5, 8).to(torch.bfloat16).float()
    d, f = DiagAccumulator(8), HessianAccumulator(8)
    d.add(X[:1])
    d.add(X[1:].to(torch.bfloat16))  # any float dtype is accumulated in fp32
    f.add(X[:1].double())
    f.add(X[1:])
    assert d.n == f.n == 30
    close(d.h, torch.diagonal(one_shot_H(X)))
    close(f.H, one_shot_H(X))


def test_non_finite_tokens_are_dropped_and_counted():
    X = tokens(20, 8, seed=3)
    bad = X.clone()
    bad[3, 2] = float("nan")
    bad[11, 0] = float("inf")
    bad[12, 7] = float("-inf")
    keep = torch.ones(20, dtype=torch.bool)
    keep[[3, 11, 12]] = False
    for acc in (DiagAccumulator(8), HessianAccumulator(8)):
        acc.add(bad[:10])
        acc.add(bad[10:])
        acc.add(torch.full((2, 8), float("nan")))  # a batch with no usable token at all
        assert acc.dropped == 5 and acc.n == 17
        close(acc.h, torch.diagonal(one_shot_H(X[keep])))
        assert bool(torch.isfinite(acc.h).all())


def test_repair_h_replaces_invalid_entries_by_mean_of_valid():
    h = torch.tensor([1.0, float("nan"), 0.0, -1.0, 3.0, float("inf"), float("-inf")])
    fixed, n = repair_h(h, "l")
    assert n == 5
    assert fixed.tolist() == [1.0, 2.0, 2.0, 2.0, 3.0, 2.0, 2.0]  # mean of the valid (1, 3) is 2
    good = torch.tensor([0.5, 2.0])
    same, n = repair_h(good)
    assert n == 0 and torch.equal(same, good)


def test_repair_h_all_invalid_raises_with_layer_name():
    with pytest.raises(ValueError, match=r"model\.layers\.5\.mlp\.gate_proj.*zero or non-finite"):
        repair_h(torch.tensor([0.0, float("nan"), -2.0]), "model.layers.5.mlp.gate_proj")


def test_layer_stats_is_frozen():
    s = LayerStats(h=torch.ones(4), n_tokens=3)
    assert s.H is None and s.dropped_tokens == 0
    with pytest.raises(Exception):
        s.n_tokens = 4


def test_h_is_bit_identical_with_or_without_the_full_hessian():
    # ARMOR reads only h; collecting H beside it (the quality benchmark does) must not change h's bits
    X = tokens(3 * 64, 16, seed=5).reshape(3, 64, 16) * 7.0
    d, f = DiagAccumulator(16), HessianAccumulator(16)
    for batch in X:
        d.add(batch)
        f.add(batch)
    assert torch.equal(d.h, f.h) and d.n == f.n == 192
    close(f.H, one_shot_H(X.reshape(-1, 16)))
