"""The contract every engine lowering follows.

    requires(artifact_dir)                     raise with a clear reason when it cannot lower this artifact
                                               (missing library, unsupported dtype or shape)
    lower(artifact_dir, out_dir, *, dtype=None, overwrite=False) -> Path
                                               write the engine files atomically; return the folder
    verify(artifact_dir, engine_dir, *, report_dir=None, eval_cfg=None) -> dict
                                               parity against the artifact's PyTorch runtime; writes
                                               parity.json / parity.md / parity.png; returns
                                               {"passed": bool, "report_path": str, ...}
Engines read only the artifact directory (armor_export.artifact) and the format helpers in solver.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Lowering(Protocol):
    name: str

    def requires(self, artifact_dir: Path) -> None: ...

    def lower(self, artifact_dir: Path, out_dir: Path, *, dtype: str | None = None, overwrite: bool = False) -> Path: ...

    def verify(self, artifact_dir: Path, engine_dir: Path, *, report_dir: Path | None = None, eval_cfg=None) -> dict: ...
