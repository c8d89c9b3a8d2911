"""Optional Triton kernel for the block-diagonal products of ArmorLinear, with a PyTorch fallback.

``block_diag_apply(x, blocks, impl=...)`` computes x . diag(blocks)^T for x [..., n*b] and
blocks [n, b, b] (block q of the result is x_q . blocks_q^T), the operation behind both
``apply_input_side`` (B) and ``apply_output_side`` (A) in ``solver.blockdiag``. With
``impl="triton"`` on a CUDA tensor and Triton importable, one kernel reads x in place and writes
the result in place (a GEMM whose K loop stays inside one diagonal block), avoiding the
transpose/reshape copies of the batched-matmul formulation; anywhere else it falls back to
``solver.blockdiag.apply_input_side``. ``armor_forward(module, x, impl)`` is ArmorLinear's forward
with the two block products routed through it (same buffers, same sparse S). Triton is imported
only when the kernel is first needed, never at import time. Not tuned: one fixed tile config per
block size (benchmarks/bench_layer.py times it as the 'armor-triton' variant).
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from solver.blockdiag import apply_input_side


def triton_usable(device) -> bool:
    return torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None


def describe(device) -> str:
    """Which implementation impl='triton' resolves to on ``device``."""
    return "triton" if triton_usable(device) else "torch-fallback"


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def blockdiag_kernel(x_ptr, w_ptr, y_ptr, T, stride_xt, stride_yt,
                         b: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        q = pid_n // (b // BLOCK_N)  # diagonal block index
        col0 = (pid_n % (b // BLOCK_N)) * BLOCK_N  # first output column inside block q
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = col0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = offs_m[:, None] < T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, b, BLOCK_K):
            xa = tl.load(x_ptr + offs_m[:, None] * stride_xt + (q * b + k0 + offs_k)[None, :], mask=row_ok, other=0.0)
            # w[q, j, k] read as a [BLOCK_K, BLOCK_N] tile of blocks_q^T
            wt = tl.load(w_ptr + q * b * b + offs_n[None, :] * b + (k0 + offs_k)[:, None])
            acc += tl.dot(xa, wt)
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None] * stride_yt + (q * b + offs_n)[None, :], y, mask=row_ok)

    return blockdiag_kernel


def tile_config(T: int, b: int) -> dict:
    """Fixed tiles: BLOCK_N and BLOCK_K divide b (b a multiple of 16), BLOCK_M by token count."""
    if b % 16:
        raise ValueError(f"the Triton block-diagonal kernel needs b % 16 == 0, got b={b}")
    bn = min(b, 128 if b % 128 == 0 else 64 if b % 64 == 0 else 32 if b % 32 == 0 else 16)
    bk = min(b, 64 if b % 64 == 0 else 32 if b % 32 == 0 else 16)
    bm = 16 if T <= 16 else 64 if T <= 256 else 128
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4 if bm * bn <= 64 * 64 else 8,
            "num_stages": 3}


def _triton_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    import triton

    n, b, _ = blocks.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n * b)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = blocks.contiguous().to(x.dtype)
    T = x2.shape[0]
    y = torch.empty((T, n * b), dtype=x.dtype, device=x.device)
    cfg = tile_config(T, b)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), n * (b // cfg["BLOCK_N"]))
    _kernel()[grid](x2, w, y, T, x2.stride(0), y.stride(0), b=b, **cfg)
    return y.reshape(*lead, n * b)


def block_diag_apply(x: torch.Tensor, blocks: torch.Tensor, *, impl: str = "triton") -> torch.Tensor:
    """x . diag(blocks)^T; impl 'triton' (CUDA + Triton, else the PyTorch fallback) or 'torch'."""
    if impl not in ("triton", "torch"):
        raise ValueError(f"unknown block-diagonal implementation {impl!r}; choose 'triton' or 'torch'")
    if impl == "triton" and triton_usable(x.device):
        return _triton_apply(x, blocks)
    return apply_input_side(x, blocks)


def armor_forward(module, x: torch.Tensor, *, impl: str = "triton") -> torch.Tensor:
    """ArmorLinear.forward with the block products through ``block_diag_apply`` (same buffers)."""
    if module.B_blocks is not None:
        x = block_diag_apply(x, module.B_blocks, impl=impl)
    if module._S_sparse is not None:
        lead = x.shape[:-1]
        z = F.linear(x.reshape(-1, module.in_features), module._S_sparse).reshape(*lead, module.out_features)
    else:
        z = F.linear(x, module.S)
    if module.A_blocks is not None:
        z = block_diag_apply(z, module.A_blocks, impl=impl)
    if module.bias is not None:
        z = z + module.bias
    return z
