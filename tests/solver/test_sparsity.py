"""2:4 masks and the compact (values, meta) form of solver.sparsity, on hand oracles and odd shapes.

Storage round trips are compared bit for bit (int32 views), never with a tolerance.
"""
from __future__ import annotations

import pytest
import torch

from solver.baselines import magnitude_score, prune_by_score
from solver.sparsity import check_24_shape, is_24, kept_positions, mask_24, pack_24, positive_zeros, unpack_24


def random_24(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    return torch.where(mask_24(torch.rand(d_out, d_in, generator=g)), W, torch.zeros(()))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_mask_24_hand_example():
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0], [4.0, 1.0, 3.0, 2.0, -1.0, -5.0, 0.0, -2.0]])
    expected = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    M = mask_24(score)
    assert M.dtype == torch.bool and M.shape == score.shape
    assert torch.equal(M, expected)


@pytest.mark.parametrize(
    "group, kept",
    [
        ([1.0, 1.0, 1.0, 1.0], [0, 1]),  # four-way tie: the two leftmost
        ([0.0, 2.0, 2.0, 2.0], [1, 2]),  # three-way tie for two places
        ([5.0, 5.0, 0.0, 5.0], [0, 1]),
        ([0.0, 3.0, 1.0, 3.0], [1, 3]),  # a tie that is not at the boundary keeps both
        ([0.0, 0.0, 0.0, 0.0], [0, 1]),
    ],
)
def test_mask_24_ties_go_to_the_leftmost_column(group, kept):
    M = mask_24(torch.tensor([group]))
    assert M[0].nonzero().flatten().tolist() == kept


def test_mask_24_on_3d_scores_works_per_row():
    score = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).flip(-1)
    M = mask_24(score)
    assert torch.equal(M, torch.tensor([True, True, False, False]).expand(2, 3, 4))


def test_mask_24_rejects_nan_score():
    with pytest.raises(ValueError, match="NaN or Inf"):
        mask_24(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        mask_24(torch.tensor([[1.0, float("inf"), 0.0, 2.0]]))


def test_indivisible_input_dimension_names_the_layer():
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj.*10.*not divisible by 4"):
        check_24_shape(10, "model.layers.3.mlp.down_proj")
    with pytest.raises(ValueError, match="not divisible by 4"):
        mask_24(torch.ones(2, 10))
    with pytest.raises(ValueError, match="not divisible by 4"):
        pack_24(torch.zeros(2, 6))
    check_24_shape(12, "fine")  # no error


@pytest.mark.parametrize(
    "d_out, d_in, values_shape, meta_shape",
    [
        (2, 8, (2, 4), (2, 1)),  # 2 groups: one full byte
        (3, 12, (3, 6), (3, 2)),  # 3 groups: odd, high nibble of the last byte is padding
        (20, 12, (20, 6), (20, 2)),
        (5, 4, (5, 2), (5, 1)),  # 1 group: padding nibble only
        (7, 20, (7, 10), (7, 3)),  # 5 groups
        (1, 16, (1, 8), (1, 2)),
    ],
)
def test_pack_unpack_round_trip_is_bit_exact(d_out, d_in, values_shape, meta_shape):
    S = random_24(d_out, d_in, seed=d_out * 31 + d_in)
    values, meta = pack_24(S)
    assert tuple(values.shape) == values_shape and values.dtype == S.dtype
    assert tuple(meta.shape) == meta_shape and meta.dtype == torch.uint8
    if (d_in // 4) % 2:
        assert bool((meta[:, -1] >> 4 == 0).all()), "padding nibble must be zero"
    back = unpack_24(values, meta, d_in)
    assert torch.equal(bits(back), bits(S)), "round trip must be bit exact"
    values2, meta2 = pack_24(back)
    assert torch.equal(bits(values2), bits(values)) and torch.equal(meta2, meta)


def test_pack_layout_hand_example():
    # group 0 keeps positions (1, 3): code 1 | 3 << 2 = 13; group 1 keeps (0, 1): code 0 | 1 << 2 = 4.
    # byte 0 = 13 | 4 << 4 = 77. Group 2 keeps (2, 3): code 2 | 3 << 2 = 14, padded high nibble 0.
    S = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 5.0, 6.0]])
    values, meta = pack_24(S)
    assert values.tolist() == [[1.5, -2.0, 3.0, 4.0, 5.0, 6.0]]
    assert meta.tolist() == [[77, 14]]


def test_groups_with_fewer_than_two_nonzeros():
    S = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0, 0.0]])
    assert is_24(S)
    # nonzeros first, then the leftmost zeros; every group gets two distinct ascending positions
    assert kept_positions(S).tolist() == [[0, 3], [0, 1], [0, 1]]
    values, meta = pack_24(S)
    assert values.tolist() == [[0.0, 5.0, 0.0, 0.0, 0.0, 7.0]]
    assert torch.equal(bits(unpack_24(values, meta, 12)), bits(S))


def test_negative_zeros_become_positive():
    S = torch.tensor([[-0.0, 1.0, -0.0, -3.0, -0.0, -0.0, -0.0, -0.0]])
    assert bool(torch.signbit(S[S == 0]).all())
    values, meta = pack_24(S)
    assert not bool(torch.signbit(values[values == 0]).any())
    back = unpack_24(values, meta, 8)
    assert not bool(torch.signbit(back[back == 0]).any())
    assert torch.equal(back, S)  # equal as numbers
    fixed = positive_zeros(S)
    assert not bool(torch.signbit(fixed[fixed == 0]).any()) and torch.equal(fixed, S)
    # a kept -0.0 weight (all-zero group) and the pruned ones come out +0.0 from the pruner too
    W = torch.tensor([[-0.0, -0.0, -0.0, -0.0, -1.0, -0.0, 2.0, -0.0]])
    P, M = prune_by_score(W, magnitude_score(W))
    assert M[0].tolist() == [True, True, False, False, True, False, True, False]
    assert not bool(torch.signbit(P[P == 0]).any())


def test_non_24_input_is_rejected():
    S = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    assert not is_24(S)
    assert not is_24(torch.ones(2, 6))
    with pytest.raises(ValueError, match="not 2:4.*1 groups"):
        pack_24(S)
    with pytest.raises(ValueError, match="2-D"):
        pack_24(torch.zeros(2, 2, 4))


@pytest.mark.parametrize(
    "code",
    [
        1 | (1 << 2),  # i0 == i1
        2 | (0 << 2),  # i0 > i1
        3 | (3 << 2),
    ],
)
def test_corrupt_metadata_is_rejected(code):
    S = random_24(2, 8, seed=0)
    values, meta = pack_24(S)
    bad = meta.clone()
    bad[1, 0] = (bad[1, 0] & 0xF0) | code
    with pytest.raises(ValueError, match="corrupt 2:4 metadata"):
        unpack_24(values, bad, 8)


def test_inconsistent_packed_shapes_are_rejected():
    values, meta = pack_24(random_24(3, 12, seed=1))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        unpack_24(values, meta[:, :1], 12)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        unpack_24(values, meta.to(torch.int16), 12)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        unpack_24(values, meta, 16)
