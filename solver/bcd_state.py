"""The typed state of ARMOR's block coordinate descent: one layer's start and a batch's working tensors.

``LayerStart`` is one validated layer at the NoWag-P start (unbatched, fp32, rows); ``BCDState`` is the batched
state that the descent (solver.armor) and the sparse-core rounds (solver.core_step) read and update in place.
Layouts and the cached products are those of solver.bcd_objective. The objective enters only through
``metric`` (solver.metric): W_bar and B hold the target W' and the wrapper B' of the metric, and Adam moves
``B_adam`` (B itself: for the identity metric the very same tensor as ``B``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from solver import bcd_objective as obj
from solver.blockdiag import identity_blocks
from solver.metric import Metric


@dataclass
class LayerStart:
    """One layer at the NoWag-P start. W_bar and h are the solved objective's target and weights (W' = W_bar C,
    unit h for a non-identity metric); spec_W_bar and spec_h those of the specified (diagonal) proxy."""
    W_bar: torch.Tensor  # [d_out, d_in]
    h: torch.Tensor  # [d_in]
    r: torch.Tensor  # [d_out] row norms (normaliser)
    c: torch.Tensor  # [d_in] column norms
    M: torch.Tensor  # [d_out, d_in] bool, NoWag-P's mask
    S: torch.Tensor  # [d_out, d_in] the start's core, W_bar masked
    A: torch.Tensor  # [n0, b, b] (identity)
    B: torch.Tensor  # [n1, b, b] the start's B' (identity, or C)
    h_replaced: int
    metric: Metric
    spec_W_bar: torch.Tensor
    spec_h: torch.Tensor


@dataclass
class BCDState:
    """A batch of K same-shaped layers (columns: S, V, M, Gamma, scratch and V's moments; rows: the rest)."""
    W_bar: torch.Tensor  # [K, d_out, d_in] the target
    h: torch.Tensor  # [K, d_in]
    Z: torch.Tensor  # [K]
    hz: torch.Tensor  # [K, d_in] = (2/Z) h
    A: torch.Tensor  # [K, n0, b, b]
    B: torch.Tensor  # [K, n1, b, b] the wrapper in the product (B' = B_adam C)
    B_adam: torch.Tensor  # what Adam moves (``B`` itself for the identity metric)
    S: torch.Tensor  # [K, n1, d_out, b]
    V: torch.Tensor
    M: torch.Tensor  # 0/1 in S's dtype: S = V M and dL/dV = Gamma M need no bool conversion
    T: torch.Tensor  # S B'
    E: torch.Tensor  # A T - W_bar
    G: torch.Tensor  # (2/Z) E (.) h
    dT: torch.Tensor  # A^T G
    Gamma: torch.Tensor  # dL/dS
    L: torch.Tensor  # [K] fp64
    metric: Metric
    moments: dict  # Adam's (m, v) of "A", "B", "V"
    scratch: torch.Tensor  # Gamma's shape: |Gamma| of the selection scores

    def adam_params(self) -> list[torch.Tensor]:
        return [self.A, self.B_adam, self.V]

    def select(self, keep: torch.Tensor) -> "BCDState":
        """The layers ``keep`` (a copy of each; B_adam stays B itself where it was)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: v[keep] for k, v in fields.items() if isinstance(v, torch.Tensor) and k != "B_adam"}
        out["B_adam"] = out["B"] if self.B_adam is self.B else self.B_adam[keep]
        out["metric"] = self.metric.select(keep)
        out["moments"] = {k: (m[keep], v[keep]) for k, (m, v) in self.moments.items()}
        return BCDState(**out)


def init_state(starts: list[LayerStart], b: int, dev: torch.device) -> BCDState:
    """The batched state of ``starts`` (same shape, same objective) with every cached product computed."""
    stack = lambda k: torch.stack([getattr(s, k) for s in starts]).to(dev)  # noqa: E731
    W_bar, h, A, B = stack("W_bar"), stack("h"), stack("A"), stack("B")
    S = obj.to_cols(stack("S"), b)
    M = obj.to_cols(torch.stack([s.M for s in starts]).to(dev, S.dtype), b)
    metric = Metric.stack([s.metric for s in starts], dev)
    B_adam = B if metric.identity else identity_blocks(B.shape[0] * B.shape[1], b, device=dev).view_as(B).clone()
    Z = obj.loss_scale(W_bar, h)
    hz = h * (2.0 / Z)[:, None]
    T, E = obj.forward(A, S, B, W_bar)
    G = obj.weighted_residual(E, hz)
    dT, Gamma = obj.core_gradient(A, B, G)
    L = obj.loss_from(E, G)
    V = S.clone()
    moments = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in zip("ABV", (A, B_adam, V))}
    return BCDState(W_bar=W_bar, h=h, Z=Z, hz=hz, A=A, B=B, B_adam=B_adam, S=S, V=V, M=M, T=T, E=E, G=G, dT=dT,
                    Gamma=Gamma, L=L, metric=metric, moments=moments, scratch=torch.empty_like(Gamma))
