"""2:4 semi-structured sparsity along the input (reduction) axis.

Convention: a weight-like tensor S has shape [d_out, d_in]; groups are the aligned runs of 4
consecutive input columns of each row (a row-major ``view(-1, 4)``), the layout that TensorRT,
cuSPARSELt and CUTLASS expect for the weight operand of ``y = x @ S.T``.

Compact form (``pack_24``): ``values [d_out, d_in // 2]`` holds the two kept entries of every
group in ascending column order, and ``meta [d_out, ceil(d_in / 8)]`` (uint8) holds one 4-bit
code per group, ``i0 | i1 << 2`` with ``i0 < i1`` the kept positions; group 2k sits in the low
nibble of byte k, group 2k+1 in the high nibble. This is 2 bits of metadata per kept value.
Every zero produced here is +0.0 (a -0.0 zero has broken sparse kernels elsewhere).
"""
from __future__ import annotations

import torch

GROUP = 4
KEEP = 2


def check_24_shape(d_in: int, name: str = "layer") -> None:
    if d_in % GROUP != 0:
        raise ValueError(
            f"{name}: input dimension {d_in} is not divisible by {GROUP}; 2:4 sparsity groups run along "
            f"the input axis, so this layer cannot be pruned 2:4 (exclude it with --ignore)."
        )


def mask_24(score: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest scores in every aligned group of 4 along the last axis.

    Ties go to the leftmost column (a stable descending sort), so the result is deterministic
    even on quantised checkpoints where many groups tie. Returns a bool tensor like ``score``.
    """
    check_24_shape(score.shape[-1])
    if not torch.isfinite(score).all():
        raise ValueError("mask_24: score contains NaN or Inf")
    groups = score.reshape(-1, GROUP)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :KEEP]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.reshape(score.shape)


def is_24(S: torch.Tensor) -> bool:
    """True when every aligned group of 4 along the last axis has at most 2 nonzeros."""
    if S.shape[-1] % GROUP != 0:
        return False
    return bool(((S.reshape(-1, GROUP) != 0).sum(-1) <= KEEP).all())


def positive_zeros(S: torch.Tensor) -> torch.Tensor:
    """Return S with every -0.0 turned into +0.0 (x + 0.0 maps -0.0 to +0.0 and keeps all else)."""
    return S + 0.0


def kept_positions(S: torch.Tensor) -> torch.Tensor:
    """Positions [n_groups, 2] (ascending) of the kept entries of a 2:4 tensor.

    Nonzeros are always kept; a group with fewer than two nonzeros is completed with its
    leftmost zero positions, so every group has exactly two distinct positions.
    """
    if not is_24(S):
        bad = int(((S.reshape(-1, GROUP) != 0).sum(-1) > KEEP).sum())
        raise ValueError(f"tensor is not 2:4 along its last axis: {bad} groups have more than 2 nonzeros")
    nz = (S.reshape(-1, GROUP) != 0).to(torch.int16)
    # Prefer nonzeros, then lower positions: key = 8*nz + (3 - idx); unique per group.
    key = nz * 8 + torch.arange(GROUP - 1, -1, -1, dtype=torch.int16, device=S.device)
    pos = torch.topk(key, KEEP, dim=-1).indices
    return torch.sort(pos, dim=-1).values


def pack_24(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 tensor [d_out, d_in] into (values [d_out, d_in//2], meta uint8 [d_out, ceil(d_in/8)])."""
    if S.dim() != 2:
        raise ValueError(f"pack_24 expects a 2-D [d_out, d_in] tensor, got shape {tuple(S.shape)}")
    d_out, d_in = S.shape
    check_24_shape(d_in)
    pos = kept_positions(S)  # [G, 2]
    values = positive_zeros(torch.gather(S.reshape(-1, GROUP), 1, pos)).reshape(d_out, d_in // 2)
    codes = (pos[:, 0] | (pos[:, 1] << 2)).to(torch.uint8).reshape(d_out, d_in // GROUP)
    if codes.shape[1] % 2:
        codes = torch.cat([codes, torch.zeros(d_out, 1, dtype=torch.uint8, device=S.device)], dim=1)
    meta = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def unpack_24(values: torch.Tensor, meta: torch.Tensor, d_in: int) -> torch.Tensor:
    """Inverse of ``pack_24``: dense [d_out, d_in] with +0.0 at pruned positions."""
    d_out = values.shape[0]
    check_24_shape(d_in)
    n_groups = d_in // GROUP
    if values.shape != (d_out, d_in // 2) or meta.shape != (d_out, (n_groups + 1) // 2) or meta.dtype != torch.uint8:
        raise ValueError(
            f"unpack_24: inconsistent shapes values {tuple(values.shape)}, meta {tuple(meta.shape)} {meta.dtype} "
            f"for d_in={d_in}"
        )
    codes = torch.stack([meta & 0x0F, meta >> 4], dim=-1).reshape(d_out, -1)[:, :n_groups]
    i0 = (codes & 0x3).long().reshape(-1)
    i1 = ((codes >> 2) & 0x3).long().reshape(-1)
    if bool((i0 >= i1).any()):
        raise ValueError("unpack_24: corrupt 2:4 metadata (kept positions must be distinct and ascending)")
    out = torch.zeros(d_out * n_groups, GROUP, dtype=values.dtype, device=values.device)
    pos = torch.stack([i0, i1], dim=1)
    out.scatter_(1, pos, values.reshape(-1, KEEP))
    return positive_zeros(out.reshape(d_out, d_in))
