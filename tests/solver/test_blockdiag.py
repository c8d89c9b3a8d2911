"""Block-diagonal products of solver.blockdiag against dense ``torch.block_diag`` matrices.

Shapes are odd on purpose (d_out = 20, d_in = 12, b = 4; leading batch dims). Comparisons run in
float64 so that the only difference between the batched and the dense product is the order of
additions (the dense one also adds exact zeros): rtol = atol = 1e-12.
"""
from __future__ import annotations

import pytest
import torch

from solver.blockdiag import (
    apply_input_side,
    apply_output_side,
    check_block_size,
    identity_blocks,
    left_mul,
    product,
    right_mul,
    to_dense,
)

TOL = dict(rtol=1e-12, atol=1e-12)  # float64, same products summed in a different order


def blocks(n: int, b: int, seed: int) -> torch.Tensor:
    return torch.randn(n, b, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense(bl: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*bl)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    d = (a - b).abs()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, **TOL), f"max abs err {d.max().item():.3e}, mean {d.mean().item():.3e}"


@pytest.mark.parametrize("d_out, d_in, b", [(20, 12, 4), (8, 24, 8), (12, 12, 12), (6, 9, 3)])
def test_products_equal_dense_block_diag(d_out, d_in, b):
    g = torch.Generator().manual_seed(d_out + d_in + b)
    A = blocks(d_out // b, b, seed=1)
    B = blocks(d_in // b, b, seed=2)
    S = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    Ad, Bd = dense(A), dense(B)
    close(left_mul(A, S), Ad @ S)
    close(right_mul(S, B), S @ Bd)
    close(product(A, S, B), Ad @ S @ Bd)
    close(product(None, S, B), S @ Bd)
    close(product(A, S, None), Ad @ S)
    assert torch.equal(product(None, S, None), S)
    assert torch.equal(to_dense(A), Ad)


def test_leading_batch_dimensions():
    A, B = blocks(5, 4, seed=3), blocks(3, 4, seed=4)
    M = torch.randn(2, 3, 20, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    close(left_mul(A, M), dense(A) @ M)
    close(right_mul(M, B), M @ dense(B))


def test_activation_side_products():
    A, B = blocks(5, 4, seed=6), blocks(3, 4, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)  # [batch, T, d_in]
    z = torch.randn(7, 20, generator=g, dtype=torch.float64)  # [T, d_out]
    close(apply_input_side(x, B), x @ dense(B).T)
    close(apply_output_side(z, A), z @ dense(A).T)
    close(apply_input_side(x[0, 0], B), x[0, 0] @ dense(B).T)  # a single token, 1-D
    # The layer identity y = ((x B^T) S^T) A^T = x (A S B)^T
    S = torch.randn(20, 12, generator=g, dtype=torch.float64)
    y = apply_output_side(apply_input_side(x, B) @ S.T, A)
    close(y, x @ product(A, S, B).T)


def test_identity_blocks():
    I = identity_blocks(3, 4)
    assert I.shape == (3, 4, 4) and I.dtype == torch.float32
    assert torch.equal(to_dense(I), torch.eye(12))
    I[0, 0, 1] = 5.0  # a real tensor, not an expanded view sharing memory
    assert I[1, 0, 1] == 0.0
    S = torch.randn(8, 12, generator=torch.Generator().manual_seed(9))
    assert torch.equal(product(identity_blocks(2, 4), S, identity_blocks(3, 4)), S)  # exact: x*1 + zeros


def test_check_block_size_messages():
    check_block_size(20, 12, 4)  # valid
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*block size 8.*d_out=20, d_in=12.*gcd=4"):
        check_block_size(20, 12, 8, "model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="block size 5 does not divide"):
        check_block_size(20, 12, 5)
    with pytest.raises(ValueError, match="positive integer"):
        check_block_size(20, 12, 0)
