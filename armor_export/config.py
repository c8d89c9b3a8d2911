"""Frozen, validated configurations of the pipeline stages (the solver's own is solver.config)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from armor_export.capture import MODES

MAX_SEED = 2**63 - 1


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
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"calibration seed must be in [0, 2**63 - 1], got {self.seed}")
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


def model_config(folder: Path) -> dict:
    """config.json of a model or artifact folder as a dict (a clear error naming the file otherwise)."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; pass a model or artifact folder with its config.json") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte offset {e.start}); restore the model's config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); restore the "
                         f"model's config.json") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(cfg).__name__}; restore the model's config.json")
    return cfg


def check_positions(config, *, calib_seqlen: int | None = None, eval_seqlen: int | None = None) -> None:
    """Fail before any work when a window is longer than the model's positions (``max_position_embeddings``
    of an HF config or a config dict)."""
    limit = config.get("max_position_embeddings") if isinstance(config, dict) else \
        getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for flag, n in (("--calib-seqlen", calib_seqlen), ("--eval-seqlen", eval_seqlen)):
        if n is not None and n > limit:
            raise ValueError(f"{flag} {n} is longer than the model's {limit} positions (max_position_embeddings "
                             f"in its config.json); use {flag} {limit} or less")


def solver_settings(preset: str, **overrides):
    """The solver.config.SolverConfig of preset ``preset`` with every override that is not None on top: the one
    way the CLI and the benchmarks turn a preset and explicit settings into a solver configuration."""
    from solver.config import PRESETS, SolverConfig

    return SolverConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
