"""The "onnx" engine: ``<out>/logits`` (the logits graph in the requested dtype, default fp32) and
``<out>/genai`` (the fp32 KV-cache graph as an onnxruntime-genai folder), per ``engines.base``.

``requires`` reads only ``config.json`` (family features against ``engines.onnx_graph.SUPPORTED``);
``verify`` is ``engines.onnx_verify.verify_onnx``.
"""
from __future__ import annotations

from pathlib import Path

from armor_export.fsutil import atomic_dir
from engines.base import ExportConfig
from engines.genai import build_genai_folder
from engines.onnx_export import export_onnx, requires


class OnnxLowering:
    name = "onnx"

    def requires(self, artifact_dir, cfg: ExportConfig = ExportConfig()) -> None:
        requires(artifact_dir, self.name, dtype=cfg.dtype)

    def lower(self, artifact_dir, out_dir, cfg: ExportConfig = ExportConfig()) -> Path:
        self.requires(artifact_dir, cfg)
        with atomic_dir(Path(out_dir), overwrite=cfg.overwrite) as tmp:
            export_onnx(artifact_dir, tmp / "logits", dtype=cfg.dtype or "fp32", form="logits")
            build_genai_folder(artifact_dir, tmp / "genai")
        return Path(out_dir)

    def verify(self, artifact_dir, engine_dir, cfg: ExportConfig = ExportConfig()) -> dict:
        from engines.onnx_verify import verify_onnx

        return verify_onnx(Path(artifact_dir), Path(engine_dir), cfg)
