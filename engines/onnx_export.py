"""The "onnx" engine: write an artifact as ONNX (fp32 / fp16 / bf16; logits or KV-cache form).

``export_onnx`` builds the graph with ``engines.onnx_graph`` (onnx-ir, op by op: see that module
for why not the dynamo exporter or the genai builder), saves ``model.onnx`` + ``model.onnx.data``
(external data, one file) atomically, then runs ``onnx.checker`` on the path, strict shape
inference, and the S-initializer check of ``engines.onnx_checks``. ``dense=True`` writes the
artifact's source model (dense weights from the manifest's source folder; the merged A.S.B when that
folder is gone) through the same graph, so dense and ARMOR compare in the same runtime.

``OnnxLowering.lower`` writes ``<out>/logits`` (the requested dtype, default fp32) and
``<out>/genai`` (fp32 KV-cache decoder as an onnxruntime-genai folder); ``verify`` lives in
``engines.onnx_verify``. The graph precision is carried by the initializers (strongly typed
TensorRT 11 reads it from there).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from armor_export.artifact import Artifact, load_artifact
from armor_export.fsutil import atomic_dir
from engines.onnx_graph import DTYPES, FAMILIES, DecoderGraph, GraphSpec, LinearWeights

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "onnx_export.json"


def _source_weights(art: Artifact) -> dict[str, torch.Tensor] | None:
    """Dense weights of the pruned linears from the artifact's source folder, or None if unavailable."""
    from safetensors import safe_open

    folder = Path(art.manifest.get("source", {}).get("folder") or "")
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    wanted = {f"{n}.weight" for n in art.layers} | {f"{n}.bias" for n in art.layers}
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if k in wanted:
                    out[k] = fh.get_tensor(k)
    return out if all(f"{n}.weight" in out for n in art.layers) else None


def collect_linears(art: Artifact, config, *, dense: bool) -> tuple[dict[str, LinearWeights], str]:
    """Every linear the graph needs: ARMOR factors for pruned ones, base weights for the others."""
    from solver.blockdiag import product

    lin: dict[str, LinearWeights] = {}
    src = _source_weights(art) if dense else None
    how = "armor" if not dense else ("source" if src is not None else "merged A.S.B")
    for name, lf in art.layers.items():
        f = lf.factors
        if not dense:
            lin[name] = LinearWeights(f.S, f.A_blocks, f.B_blocks, lf.bias)
        elif src is not None:
            lin[name] = LinearWeights(src[f"{name}.weight"], None, None, src.get(f"{name}.bias", lf.bias), dense=True)
        else:
            lin[name] = LinearWeights(product(f.A_blocks, f.S, f.B_blocks), None, None, lf.bias, dense=True)
    proj = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
           [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    for i in range(config.num_hidden_layers):
        for p in proj:
            name = f"model.layers.{i}.{p}"
            if name not in lin:
                w = art.base.get(f"{name}.weight")
                if w is None:
                    raise ValueError(f"{name}: neither pruned factors nor a dense weight in the artifact")
                lin[name] = LinearWeights(w, None, None, art.base.get(f"{name}.bias"), dense=True)
    return lin, how


def requires(artifact_dir) -> None:
    """Raise ValueError when this artifact cannot be lowered to ONNX (family, 2:4 of S)."""
    from armor_export.artifact import read_manifest

    man = read_manifest(Path(artifact_dir))
    mt = man.get("source", {}).get("model_type") or json.loads((Path(artifact_dir) / "config.json").read_text())[
        "model_type"]
    if mt not in FAMILIES:
        raise ValueError(f"ONNX lowering supports model types {FAMILIES}; this artifact is {mt!r}")


def export_onnx(artifact_dir, out_dir, *, dtype: str = "fp32", form: str = "logits", dense: bool = False,
                overwrite: bool = False, check: bool = True) -> Path:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data``, ``onnx_export.json``); return ``out_dir``."""
    import onnx_ir as ir
    from transformers import AutoConfig

    t0 = time.perf_counter()
    spec = GraphSpec(dtype=dtype, form=form)
    requires(artifact_dir)
    art = load_artifact(Path(artifact_dir))
    config = AutoConfig.from_pretrained(art.path)
    linears, how = collect_linears(art, config, dense=dense)
    model = DecoderGraph(config, spec, linears, art.base).build()
    t_build = time.perf_counter() - t0
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        ir.save(model, tmp / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=1024)
        t_save = time.perf_counter() - t0 - t_build
        checks = check_written(tmp / MODEL_FILE, dense=dense) if check else {}
        meta = {"dtype": dtype, "form": form, "dense": dense, "weights": how, "opset": model.opset_imports[""],
                "model_type": config.model_type, "num_layers": config.num_hidden_layers,
                "num_key_value_heads": getattr(config, "num_key_value_heads", None),
                "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                "inputs": [v.name for v in model.graph.inputs], "outputs": [v.name for v in model.graph.outputs],
                "artifact": str(Path(artifact_dir).resolve()), "checks": checks,
                "seconds": {"build": round(t_build, 2), "save": round(t_save, 2),
                            "total": round(time.perf_counter() - t0, 2)},
                "bytes": {f: (tmp / f).stat().st_size for f in (MODEL_FILE, DATA_FILE) if (tmp / f).exists()}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def check_written(path: Path, *, dense: bool) -> dict:
    """Checker on the path, strict shape inference, and (ARMOR graphs) every S initializer's 2:4 and feed."""
    import onnx

    from engines.onnx_checks import check_s_initializers

    onnx.checker.check_model(str(path), full_check=False)
    onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred", strict_mode=True)
    Path(str(path) + ".inferred").unlink()
    out = {"checker": "pass", "strict_shape_inference": "pass"}
    if not dense:
        rep = check_s_initializers(path)
        if not rep["passed"]:
            raise ValueError(f"{path}: S initializers fail the 2:4 / direct-MatMul check: {rep['failures'][:5]}")
        out["s_initializers"] = rep["count"]
    return out


def read_meta(folder) -> dict:
    p = Path(folder) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


class OnnxLowering:
    """The "onnx" engine (see the module docstring)."""

    name = "onnx"

    def requires(self, artifact_dir) -> None:
        requires(artifact_dir)

    def lower(self, artifact_dir, out_dir, *, dtype: str | None = None, overwrite: bool = False,
              genai: bool = True) -> Path:
        from engines.genai import build_genai_folder

        dtype = dtype or "fp32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        artifact_dir = Path(getattr(artifact_dir, "path", artifact_dir))
        with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
            export_onnx(artifact_dir, tmp / "logits", dtype=dtype, form="logits")
            if genai:
                build_genai_folder(artifact_dir, tmp / "genai")
        return Path(out_dir)

    def verify(self, artifact_dir, engine_dir, *, report_dir=None, eval_cfg=None, **kw) -> dict:
        from engines.onnx_verify import verify_onnx

        artifact_dir = Path(getattr(artifact_dir, "path", artifact_dir))
        return verify_onnx(artifact_dir, Path(engine_dir), report_dir=report_dir, eval_cfg=eval_cfg, **kw)
