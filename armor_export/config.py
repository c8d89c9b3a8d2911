"""Frozen, validated configurations of the pipeline stages (the solver's own is solver.config)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

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
    """One evaluation text: a .txt file / folder (``text``) or a registered corpus (``corpus``, a name of
    armor_export.corpus.CORPORA); neither = the held-out Shakespeare plays."""
    text: str | None = None
    windows: int = 32
    seqlen: int = 512
    batch_size: int = 1
    corpus: str | None = None

    def __post_init__(self):
        if self.windows <= 0 or self.seqlen < 2 or self.batch_size <= 0:
            raise ValueError(f"invalid evaluation settings: windows={self.windows}, seqlen={self.seqlen}, "
                             f"batch_size={self.batch_size}")
        if self.text is not None and self.corpus is not None:
            raise ValueError(f"an evaluation is a text ({self.text}) or a corpus ({self.corpus}), not both")

    @property
    def name(self) -> str:
        """The label in summaries: the corpus name, or the text's file / folder name."""
        if self.text is not None:
            return Path(self.text).name or str(self.text)
        return self.corpus or "shakespeare"


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
