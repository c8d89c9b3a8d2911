"""The contract every engine lowering follows, with one export configuration for all of them.

    requires(artifact_dir, cfg)            raise EngineUnsupported / EngineUnavailable with a message naming the
                                           family, the feature and the engine (or the library to install) when
                                           it cannot lower this artifact; called before any work
    lower(artifact_dir, out_dir, cfg) -> Path
                                           write the engine files atomically; return the folder
    verify(artifact_dir, engine_dir, cfg) -> dict
                                           parity against the artifact's PyTorch runtime; writes parity.json /
                                           parity.md / parity.png into cfg.report_dir (default: engine_dir);
                                           returns {"passed": bool, "report_path": str, ...}

Engines read only the artifact directory (armor_export.artifact, armor_export.adapters) and the format helpers
in solver; they never import armor_export.pipeline. Text for parity is tokenised by the caller and passed in
as token ids (``parity_tokens``), so data flows one way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ExportConfig:
    dtype: str | None = None  # "fp32" | "fp16" | "bf16"; None = the engine's default
    overwrite: bool = False  # replace an engine folder armor-export wrote before
    report_dir: Path | None = None  # verify: where parity.* go; None = the engine folder
    # verify: token windows [n][T] chosen by the caller (e.g. held-out text); None = seeded random ids
    parity_tokens: tuple[tuple[int, ...], ...] | None = None
    # verify: tokens per parity sequence; None = the engine's choice, longer than every sliding window
    parity_seqlen: int | None = None


class Lowering(Protocol):
    name: str

    def requires(self, artifact_dir: Path, cfg: ExportConfig) -> None: ...

    def lower(self, artifact_dir: Path, out_dir: Path, cfg: ExportConfig) -> Path: ...

    def verify(self, artifact_dir: Path, engine_dir: Path, cfg: ExportConfig) -> dict: ...
