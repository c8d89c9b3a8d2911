"""Named shape suites for the layer benchmark: the seven linears of one decoder block of real models.

A suite is data: hidden size, intermediate size, KV width (n_kv_heads * head_dim) and the default
ARMOR block size b that divides every d_in and d_out of the suite. ``layers(suite)`` expands it to
(name, d_in, d_out) in the order q, k, v, o, gate, up, down. ``overhead`` and ``limit`` are the FLOP
overhead of A and B over the dense GEMM and the resulting best-case ARMOR speedup over dense when
2:4 runs at exactly 2x (reference-numbers.md section 1e). Shapes are from the models' public
configs; nothing here touches torch or a device.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    name: str
    hidden: int
    intermediate: int
    kv: int
    block_size: int

    def layers(self) -> list[tuple[str, int, int]]:
        h, i, kv = self.hidden, self.intermediate, self.kv
        return [("q", h, h), ("k", h, kv), ("v", h, kv), ("o", h, h),
                ("gate", h, i), ("up", h, i), ("down", i, h)]

    def fused_layers(self) -> list[tuple[str, int, int]]:
        """The fused groups (``--fuse qkv,gate_up``): one stacked layer over the members' shared input."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return [("qkv", h, h + 2 * kv), ("gate_up", h, 2 * i)]


# fused group -> its members, in stacking order
FUSED_MEMBERS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("tiny", 64, 96, 32, 16),  # smoke tests only
    Suite("smollm2-135m", 576, 1536, 192, 32),
    Suite("llama-2-7b", 4096, 11008, 4096, 128),
    Suite("llama-3-8b", 4096, 14336, 1024, 128),
    Suite("qwen2.5-7b", 3584, 18944, 512, 128),
    Suite("qwen2.5-14b", 5120, 13824, 1024, 128),
)}

DEFAULT_M = (1, 16, 128, 512, 2048, 4096)
GPU_SUITES = ("smollm2-135m", "llama-2-7b", "llama-3-8b", "qwen2.5-7b", "qwen2.5-14b")


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown shape suite {name!r}; known: {', '.join(SUITES)}") from None


def select_layers(suite: Suite, names: str | None) -> list[tuple[str, int, int]]:
    """The suite's layers, optionally filtered by a comma list such as 'gate,down' (the fused groups 'qkv' and
    'gate_up' only when named)."""
    rows = suite.layers()
    if not names:
        return rows
    rows += suite.fused_layers()
    want = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(want) - {r[0] for r in rows})
    if unknown:
        raise ValueError(f"unknown layer name(s) {unknown}; choose from q,k,v,o,gate,up,down,qkv,gate_up")
    return [r for r in rows if r[0] in want]


def overhead(b: int, d_in: int, d_out: int) -> float:
    """Extra FLOPs (and parameters) of A and B relative to the dense GEMM: b(d_in + d_out)/(d_in d_out)."""
    return b * (d_in + d_out) / (d_in * d_out)


def limit(b: int, d_in: int, d_out: int) -> float:
    """Best-case ARMOR speedup over dense when the 2:4 GEMM is exactly 2x faster: 1/(0.5 + overhead)."""
    return 1.0 / (0.5 + overhead(b, d_in, d_out))
