"""Result types every pruning method returns for one linear layer.

``Factorization`` is the deployable triple W_hat = A . S . B with the normaliser already folded
into A and B; ``A_blocks``/``B_blocks`` are None for methods that do not use wrappers
(magnitude, Wanda, NoWag-P, SparseGPT), meaning the identity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from solver.blockdiag import product
from solver.sparsity import is_24, positive_zeros


@dataclass(frozen=True)
class Factorization:
    S: torch.Tensor  # [d_out, d_in], 2:4 along d_in, +0.0 zeros
    A_blocks: torch.Tensor | None = None  # [d_out // b, b, b]
    B_blocks: torch.Tensor | None = None  # [d_in // b, b, b]

    def __post_init__(self):
        if self.S.dim() != 2:
            raise ValueError(f"S must be 2-D, got {tuple(self.S.shape)}")
        d_out, d_in = self.S.shape
        if self.A_blocks is not None and self.A_blocks.shape[0] * self.A_blocks.shape[1] != d_out:
            raise ValueError(f"A_blocks {tuple(self.A_blocks.shape)} does not cover d_out={d_out}")
        if self.B_blocks is not None and self.B_blocks.shape[0] * self.B_blocks.shape[1] != d_in:
            raise ValueError(f"B_blocks {tuple(self.B_blocks.shape)} does not cover d_in={d_in}")

    @property
    def block_size(self) -> int | None:
        return None if self.A_blocks is None else int(self.A_blocks.shape[-1])

    def to_dense(self) -> torch.Tensor:
        return product(self.A_blocks, self.S, self.B_blocks)

    def is_finite(self) -> bool:
        parts = [self.S] + [t for t in (self.A_blocks, self.B_blocks) if t is not None]
        return all(bool(torch.isfinite(t).all()) for t in parts)

    def validated(self, name: str = "layer") -> "Factorization":
        if not is_24(self.S):
            raise ValueError(f"{name}: S is not 2:4 along the input axis")
        if not self.is_finite():
            raise ValueError(f"{name}: factors contain NaN or Inf")
        return Factorization(positive_zeros(self.S), self.A_blocks, self.B_blocks)


@dataclass
class SolveReport:
    """Per-layer facts recorded in the artifact manifest."""

    loss_start: float  # proxy loss of the NoWag-P start (normalised, 1 = all-zero weight)
    loss_final: float  # proxy loss of the returned factors
    iterations: int = 0
    seconds: float = 0.0
    early_stopped: bool = False
    status: str = "ok"  # "ok" | "fallback"
    notes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "loss_start": self.loss_start,
            "loss_final": self.loss_final,
            "iterations": self.iterations,
            "seconds": round(self.seconds, 4),
            "early_stopped": self.early_stopped,
            "status": self.status,
            "notes": self.notes,
        }


@dataclass
class LayerResult:
    factors: Factorization
    report: SolveReport
