"""The metric of ARMOR's descent: the objective, as data that the BCD loop takes as input.

Every ARMOR objective is the specified proxy (armor-algorithm.md section 2.2) in a metric of the input side:

    L = sum_ij h_j ((W_bar C - A S (B C))_ij)^2 / Z,     C block-diagonal [n1, b, b]

The loop works on the target W' = W_bar C and the wrapper B' = B C, while Adam moves B itself (the chain rule
through B' = B C: dL/dB = dL/dB' C^T). Objectives (``OBJECTIVES``):
- "diag": the paper's proxy, the identity metric (C = I, held as None: no product, no copy, Adam moves B'
  itself);
- "block-hessian": C_q C_q^T = H_qq / mean(diag H) + damp I, the Cholesky factor of H's b x b diagonal blocks,
  and unit h (solver/block_hessian.py), so the error is weighed by the within-block channel correlations.
A ``Metric`` holds C for one layer ([n1, b, b]) or for a batch ([K, n1, b, b]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from solver import block_hessian as bh

# objective -> the calibration statistics it reads ("diag": h only; "blocks": also H's b x b diagonal blocks)
OBJECTIVES = {"diag": "diag", "block-hessian": "blocks"}


@dataclass(frozen=True)
class Metric:
    C: torch.Tensor | None = None  # None: the identity

    @property
    def identity(self) -> bool:
        return self.C is None

    def target(self, W_bar: torch.Tensor) -> torch.Tensor:
        """W' = W_bar C (one layer, rows)."""
        return W_bar if self.C is None else bh.to_metric(W_bar, self.C)

    def start_wrapper(self, B0: torch.Tensor) -> torch.Tensor:
        """B' = B C at the start, B = B0 = I: B0 itself for the identity, else a copy of C."""
        return B0 if self.C is None else self.C.clone()

    def exact_wrapper(self, B: torch.Tensor) -> torch.Tensor:
        """B' = B C in fp64 (the exact loss of stored factors)."""
        return B if self.C is None else bh.in_metric(B, self.C)

    def pull_back(self, gB: torch.Tensor) -> torch.Tensor:
        """dL/dB from dL/dB' (batched)."""
        return gB if self.C is None else torch.matmul(gB, self.C.transpose(-1, -2))

    def push(self, B: torch.Tensor, out: torch.Tensor) -> None:
        """out = B' = B C in place (batched); nothing for the identity, where B and B' are one tensor."""
        if self.C is not None:
            torch.matmul(B, self.C, out=out)

    def to(self, dev) -> "Metric":
        return self if self.C is None else Metric(self.C.to(dev))

    def select(self, keep: torch.Tensor) -> "Metric":
        """The batch rows ``keep``."""
        return self if self.C is None else Metric(self.C[keep])

    @staticmethod
    def stack(metrics: list["Metric"], dev) -> "Metric":
        """One batched metric of same-objective layers."""
        if metrics[0].C is None:
            return Metric()
        return Metric(torch.stack([m.C for m in metrics]).to(dev))


def objective_metric(objective: str, stats, b: int, damp: float, name: str = "layer") -> Metric:
    """The metric of ``objective`` for one layer from its ``solver.stats.LayerStats``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"{name}: unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    if OBJECTIVES[objective] == "diag":
        return Metric()
    Hb = stats.hessian_blocks(b)
    if Hb is None:
        raise ValueError(f"{name}: objective {objective!r} needs the input Hessian's {b}-wide diagonal blocks "
                         f"(calibrate with the same block size, or full statistics)")
    return Metric(bh.hessian_factor(Hb.float(), b, damp, name))
