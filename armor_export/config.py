"""Frozen, validated configurations of the pipeline stages (the solver's own is solver.config)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from armor_export.capture import MODES


@dataclass(frozen=True)
class CalibConfig:
    text: str | None = None  # None = default Shakespeare calibration split
    samples: int = 64  # windows
    seqlen: int = 512  # tokens per window
    seed: int = 0
    mode: str = "dense"  # "dense" (one pass, the paper's) | "sequential"
    batch_size: int = 8

    def __post_init__(self):
        if self.samples <= 0:
            raise ValueError(f"calibration samples must be > 0, got {self.samples}")
        if self.seqlen < 2:
            raise ValueError(f"calibration seqlen must be >= 2, got {self.seqlen}")
        if self.batch_size <= 0:
            raise ValueError(f"calibration batch size must be > 0, got {self.batch_size}")
        if self.mode not in MODES:
            raise ValueError(f"calibration mode must be one of {MODES}, got {self.mode!r}")


@dataclass(frozen=True)
class EvalConfig:
    text: str | None = None  # None = default held-out Shakespeare split
    windows: int = 32
    seqlen: int = 512
    batch_size: int = 1

    def __post_init__(self):
        if self.windows <= 0 or self.seqlen < 2 or self.batch_size <= 0:
            raise ValueError(f"invalid evaluation settings: windows={self.windows}, seqlen={self.seqlen}, "
                             f"batch_size={self.batch_size}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
