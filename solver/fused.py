"""Fused projection groups (q/k/v, gate/up): one factorisation of the stacked weight, split per member.

The members of a group read the same input, so the stacked weight ``[W_q; W_k; W_v]`` is solved as one
layer ``A . S . B``: one input factor B shared by every member, S 2:4 along the shared input and A
block-diagonal over the stacked output. When the block size b divides every member's d_out (the
pipeline requires it of every pruned linear anyway) the split of the stacked output lands on block
boundaries, so member j's part is exactly ``A_j . S_j . B``: rows of S, whole blocks of A, the shared B.
``split_factorization`` and ``stack_factorizations`` are each other's inverse.
"""
from __future__ import annotations

import torch

from solver.factors import Factorization


def split_factorization(f: Factorization, sizes: list[int]) -> list[Factorization]:
    """Member factorizations of a stacked one (``sizes`` = the members' d_out, in stacking order)."""
    d_out = f.S.shape[0]
    if sum(sizes) != d_out or any(s <= 0 for s in sizes):
        raise ValueError(f"split sizes {sizes} do not sum to the stacked d_out {d_out}")
    b = f.block_size
    if b is not None and any(s % b for s in sizes):
        raise ValueError(f"block size {b} does not divide every member's d_out {sizes}: A's blocks would "
                         f"straddle two members")
    S_parts = torch.split(f.S, sizes, dim=0)
    A_parts = (None,) * len(sizes) if b is None else torch.split(f.A_blocks, [s // b for s in sizes], dim=0)
    return [Factorization(S.contiguous(), None if A is None else A.contiguous(),
                          None if f.B_blocks is None else f.B_blocks.clone())
            for S, A in zip(S_parts, A_parts)]


def shares_input_factor(fs: list[Factorization]) -> bool:
    """True when every member has the same B (all None, or equal tensors) and all or none have A."""
    Bs = [f.B_blocks for f in fs]
    if any(B is None for B in Bs):
        same_b = all(B is None for B in Bs)
    else:
        same_b = all(B.shape == Bs[0].shape and torch.equal(B, Bs[0]) for B in Bs[1:])
    return same_b and len({f.A_blocks is None for f in fs}) == 1 and len({f.block_size for f in fs}) == 1


def stack_factorizations(fs: list[Factorization]) -> Factorization:
    """The stacked factorization of members sharing one B (the inverse of ``split_factorization``)."""
    if not shares_input_factor(fs):
        raise ValueError("the members do not share one input factor B (and one block size); they cannot be "
                         "stacked into one ARMOR layer")
    S = torch.cat([f.S for f in fs], dim=0)
    A = None if fs[0].A_blocks is None else torch.cat([f.A_blocks for f in fs], dim=0)
    return Factorization(S, A, fs[0].B_blocks)


def stack_biases(biases: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """One bias for the stacked output (a member without a bias contributes zeros); None if none has one."""
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    return torch.cat([torch.zeros(s, dtype=ref.dtype) if b is None else b for b, s in zip(biases, sizes)])
