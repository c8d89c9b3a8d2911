"""Streaming calibration statistics of one linear layer's input, in fp32.

Both accumulators keep a count-weighted running mean, exact for any split into batches:
    h <- h . n/(n+m) + (2/(n+m)) . sum_t x_t^2           (DiagAccumulator, h = diag(2 X^T X / N))
    H <- H . n/(n+m) + (2/(n+m)) . X_new^T X_new          (HessianAccumulator, H = 2 X^T X / N)
Non-finite activations are counted and excluded (their tokens are dropped), never averaged in.
Accumulators split over several processes (each a share of the tokens) are pooled exactly by the same rule:
mean = sum_r n_r . mean_r / sum_r n_r over their ``moments()`` (``armor_export.shard.all_reduce_accumulators``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _flatten_finite(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    X = x.detach().reshape(-1, x.shape[-1]).float()
    finite = torch.isfinite(X).all(dim=1)
    dropped = int((~finite).sum())
    if dropped:
        X = X[finite]
    return X, dropped


class DiagAccumulator:
    """h = diag(2 X^T X / N) over every token seen."""

    def __init__(self, d_in: int, device=None):
        self.h = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.n = 0
        self.dropped = 0

    def add(self, x: torch.Tensor) -> None:
        X, dropped = _flatten_finite(x)
        self.dropped += dropped
        self.add_rows(X)

    def add_rows(self, X: torch.Tensor) -> None:
        """Add already flattened, finite fp32 rows X [m, d_in]."""
        m = X.shape[0]
        if m == 0:
            return
        total = self.n + m
        self.h.mul_(self.n / total).add_(X.pow(2).sum(0), alpha=2.0 / total)
        self.n = total

    def moments(self) -> list[torch.Tensor]:
        """The running means this accumulator holds (the tensors themselves: pooling updates them in place)."""
        return [self.h]

    def set_count(self, n: int, dropped: int) -> None:
        """After pooling: the tokens behind the pooled means."""
        self.n, self.dropped = int(n), int(dropped)


class HessianAccumulator:
    """H = 2 X^T X / N over every token seen, and h accumulated exactly as DiagAccumulator does.

    h is not read off diag(H): the GEMM sums in another order, and at the cpu preset's step size those
    last-bit differences flip pattern choices. With one accumulation for h, a method that needs only h
    gets bit-identical statistics whether or not the full H was collected beside it."""

    def __init__(self, d_in: int, device=None):
        self.H = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self._diag = DiagAccumulator(d_in, device)

    @property
    def n(self) -> int:
        return self._diag.n

    @property
    def dropped(self) -> int:
        return self._diag.dropped

    @property
    def h(self) -> torch.Tensor:
        return self._diag.h

    def moments(self) -> list[torch.Tensor]:
        return [self.H, self.h]

    def set_count(self, n: int, dropped: int) -> None:
        self._diag.set_count(n, dropped)

    def add(self, x: torch.Tensor) -> None:
        X, dropped = _flatten_finite(x)
        self._diag.dropped += dropped
        n, m = self._diag.n, X.shape[0]
        if m == 0:
            return
        self._diag.add_rows(X)
        self._update(X, n / (n + m), 2.0 / (n + m))

    def _update(self, X: torch.Tensor, keep: float, alpha: float) -> None:
        """Second moment <- keep . second moment + alpha . X^T X."""
        self.H.mul_(keep).addmm_(X.T, X, alpha=alpha)


class BlockHessianAccumulator(HessianAccumulator):
    """Only the b x b diagonal blocks of H = 2 X^T X / N ([d_in/b, b, b]), and h exactly as DiagAccumulator:
    what the block-Hessian objectives read (solver/block_hessian.py), at b/d_in of the full H's cost and memory."""

    def __init__(self, d_in: int, b: int, device=None):
        if b <= 0 or d_in % b:
            raise ValueError(f"Hessian block {b} does not divide the input width {d_in}")
        self.b = b
        self.H_blocks = torch.zeros(d_in // b, b, b, dtype=torch.float32, device=device)
        self._diag = DiagAccumulator(d_in, device)

    @property
    def H(self) -> None:
        return None

    def moments(self) -> list[torch.Tensor]:
        return [self.H_blocks, self.h]

    def _update(self, X: torch.Tensor, keep: float, alpha: float) -> None:
        Xb = X.view(X.shape[0], -1, self.b).transpose(0, 1)  # [n1, m, b]
        self.H_blocks.mul_(keep).baddbmm_(Xb.transpose(1, 2), Xb, alpha=alpha)


def accumulator(d_in: int, *, full: bool = False, hessian_block: int | None = None, device=None):
    """The accumulator of one shared input: full H, H's b x b diagonal blocks, or h only."""
    if full:
        return HessianAccumulator(d_in, device)
    if hessian_block:
        return BlockHessianAccumulator(d_in, hessian_block, device)
    return DiagAccumulator(d_in, device)


@dataclass(frozen=True)
class LayerStats:
    """What a solver may read about one layer's inputs: h [d_in], optionally H [d_in, d_in] or only its
    b x b diagonal blocks H_blocks [d_in/b, b, b]."""

    h: torch.Tensor
    n_tokens: int
    H: torch.Tensor | None = None
    dropped_tokens: int = 0
    H_blocks: torch.Tensor | None = None

    def hessian_blocks(self, b: int) -> torch.Tensor | None:
        """H's b x b diagonal blocks [d_in/b, b, b] from H or H_blocks (None when neither holds them)."""
        if self.H is not None:
            d_in = self.H.shape[0]
            return self.H.view(d_in // b, b, d_in // b, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        if self.H_blocks is not None and self.H_blocks.shape[-1] == b:
            return self.H_blocks
        return None


def repair_h(h: torch.Tensor, name: str = "layer") -> tuple[torch.Tensor, int]:
    """Replace non-finite or <= 0 entries of h by the mean of the valid ones; return (h, n_replaced).

    Raises when no entry is valid (the layer saw no usable activations)."""
    valid = torch.isfinite(h) & (h > 0)
    n_bad = int((~valid).sum())
    if n_bad == 0:
        return h, 0
    if not bool(valid.any()):
        raise ValueError(
            f"{name}: every input channel has zero or non-finite calibration energy; the calibration data "
            f"never reached this layer with usable activations (check the corpus and the model weights)."
        )
    fixed = torch.where(valid, h, h[valid].mean())
    return fixed, n_bad
