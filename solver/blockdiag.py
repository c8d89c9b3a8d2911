"""Block-diagonal matrices stored as stacks of blocks, and their products.

``A_blocks: [n0, b, b]`` stands for the d_out x d_out matrix diag(A_0, ..., A_{n0-1});
``B_blocks: [n1, b, b]`` for the d_in x d_in matrix diag(B_0, ...). Side convention used
everywhere in armor-export: W ~= A . S . B, so a layer computes y = ((x . B^T) . S^T) . A^T.
All products are batched matmuls on reshaped views (no einsum, no dense block_diag) except
``to_dense`` which exists for tests and references.
"""
from __future__ import annotations

import torch


def identity_blocks(n_blocks: int, b: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    return torch.eye(b, dtype=dtype, device=device).expand(n_blocks, b, b).clone()


def to_dense(blocks: torch.Tensor) -> torch.Tensor:
    """[n, b, b] -> dense [n*b, n*b] block-diagonal matrix."""
    return torch.block_diag(*blocks.unbind(0))


def check_block_size(d_out: int, d_in: int, b: int, name: str = "layer") -> None:
    if b <= 0:
        raise ValueError(f"block size must be a positive integer, got {b}")
    if d_out % b or d_in % b:
        raise ValueError(
            f"{name}: block size {b} does not divide the layer shape [d_out={d_out}, d_in={d_in}]; "
            f"choose a block size that divides both (e.g. a divisor of gcd={_gcd(d_out, d_in)})."
        )


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def left_mul(A_blocks: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """A . M for M [..., d_out, k] (A block-diagonal over the rows of M)."""
    n0, b, _ = A_blocks.shape
    *lead, d_out, k = M.shape
    Mv = M.reshape(*lead, n0, b, k)
    return torch.matmul(A_blocks, Mv).reshape(*lead, d_out, k)


def right_mul(M: torch.Tensor, B_blocks: torch.Tensor) -> torch.Tensor:
    """M . B for M [..., k, d_in] (B block-diagonal over the columns of M)."""
    n1, b, _ = B_blocks.shape
    *lead, k, d_in = M.shape
    Mv = M.reshape(*lead, k, n1, b).transpose(-3, -2)  # [..., n1, k, b]
    return torch.matmul(Mv, B_blocks).transpose(-3, -2).reshape(*lead, k, d_in)


def apply_input_side(x: torch.Tensor, B_blocks: torch.Tensor) -> torch.Tensor:
    """x . B^T for activations x [..., d_in]: block q of the result is x_q . B_q^T."""
    n1, b, _ = B_blocks.shape
    lead = x.shape[:-1]
    xv = x.reshape(-1, n1, b).transpose(0, 1)  # [n1, T, b]
    out = torch.matmul(xv, B_blocks.transpose(-1, -2))  # [n1, T, b]
    return out.transpose(0, 1).reshape(*lead, n1 * b)


def apply_output_side(z: torch.Tensor, A_blocks: torch.Tensor) -> torch.Tensor:
    """z . A^T for activations z [..., d_out]."""
    return apply_input_side(z, A_blocks)


def product(A_blocks: torch.Tensor | None, S: torch.Tensor, B_blocks: torch.Tensor | None) -> torch.Tensor:
    """Dense A . S . B (either factor may be None, meaning the identity)."""
    out = S
    if B_blocks is not None:
        out = right_mul(out, B_blocks)
    if A_blocks is not None:
        out = left_mul(A_blocks, out)
    return out
