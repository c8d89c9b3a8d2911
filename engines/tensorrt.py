"""The 'tensorrt' engine: TensorRT engines built from the artifact's fp16/bf16 ONNX graph.

``lower(artifact, out, cfg)`` (``engines.base``) writes
  out/onnx/               model.onnx + data from ``engines.onnx_export.export_onnx`` (checked: checker,
                          shape inference, 2:4 of every S initializer along K, direct MatMul feed)
  out/engine_sparse.plan  built with ``BuilderFlag.SPARSE_WEIGHTS``
  out/engine_dense.plan   the same graph without it (the comparison engine)
  out/layers_{sparse,dense}.json   engine-inspector JSON (``ProfilingVerbosity.DETAILED``)
  out/sparsity.json       per S MatMul: engine layers, tactic names, sparse keys, verdict (engines.trt_inspect)
  out/build.json          TensorRT version, profiles, flags, build times, status
Networks are strongly typed (TensorRT 11: ``create_network(0)``, always strong; TensorRT 10: the
STRONGLY_TYPED creation flag), so precision comes from the ONNX initializers; optimisation profiles
cover dynamic batch and sequence (``choose_profiles``); an optional timing cache is reused and saved.
Without TensorRT the ONNX is still written and checked, ``build.json`` records why no engine was
built, and ``lower`` raises ``EngineUnavailable`` with the install instructions.
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from armor_export.fsutil import atomic_dir
from engines import trt_inspect
from engines.base import ExportConfig
from engines.onnx_export import requires

INSTALL_HINT = ("TensorRT is not installed, so no engine was built. On a Linux machine with an NVIDIA GPU "
                "(sm80+ for 2:4 sparse tactics): `pip install tensorrt` (a stub that fetches NVIDIA's wheel) or "
                "the NGC container nvcr.io/nvidia/tensorrt, then rerun the command below, or build from the "
                "written ONNX with `trtexec --onnx={onnx} --sparsity=enable`.")
BATCH_WORDS, SEQ_WORDS = ("batch",), ("seq", "length", "total", "past")


def missing_tensorrt_message(onnx_path: str | Path = "<out>/onnx/model.onnx") -> str | None:
    return INSTALL_HINT.format(onnx=onnx_path) if importlib.util.find_spec("tensorrt") is None else None


@dataclass(frozen=True)
class BuildSettings:
    """Optimisation profiles: one per (opt_batch, opt_seq) in ``opt_points``; all share min 1 and the
    max batch / sequence (sequence capped by the model's max_position_embeddings)."""
    max_batch: int = 8
    max_seq: int = 1024
    opt_points: tuple[tuple[int, int], ...] = ((1, 64), (4, 512))  # decode-like small M, prefill-like large M
    workspace_gib: float = 4.0
    timing_cache: str | None = None  # path: read if present, written after the build
    builder_optimization_level: int | None = None

    def __post_init__(self):
        if self.max_batch < 1 or self.max_seq < 1 or not self.opt_points:
            raise ValueError(f"invalid TensorRT build settings: {self}")


def onnx_inputs(onnx_path: Path) -> dict[str, list]:
    """Graph inputs -> dims (int for static, the dim_param string for dynamic, None if unnamed)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        out[i.name] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                       for d in i.type.tensor_type.shape.dim]
    return out


def _dim_role(dim, position: int) -> str:
    if isinstance(dim, int):
        return "static"
    name = (dim or "").lower()
    if any(w in name for w in BATCH_WORDS):
        return "batch"
    if any(w in name for w in SEQ_WORDS):
        return "seq"
    return {0: "batch", 1: "seq"}.get(position, "unknown")


def choose_profiles(inputs: dict[str, list], settings: BuildSettings = BuildSettings(),
                    max_position: int | None = None) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
    """One {input: (min, opt, max) shape} dict per optimisation profile."""
    max_seq = min(settings.max_seq, max_position or settings.max_seq)
    profiles = []
    for opt_b, opt_s in settings.opt_points:
        ob, os_ = min(opt_b, settings.max_batch), min(opt_s, max_seq)
        prof = {}
        for name, dims in inputs.items():
            lo, opt, hi = [], [], []
            for pos, d in enumerate(dims):
                role = _dim_role(d, pos)
                if role == "static":
                    lo.append(d), opt.append(d), hi.append(d)
                elif role == "batch":
                    lo.append(1), opt.append(ob), hi.append(settings.max_batch)
                elif role == "seq":
                    lo.append(1), opt.append(os_), hi.append(max_seq)
                else:
                    raise ValueError(f"input {name!r} dim {pos} ({d!r}) is dynamic but neither batch nor sequence; "
                                     "TensorRT needs explicit profile bounds for it")
            prof[name] = (tuple(lo), tuple(opt), tuple(hi))
        profiles.append(prof)
    return profiles


def network_flags(trt) -> int:
    """0 on TensorRT >= 11 (always strongly typed); the STRONGLY_TYPED bit on TensorRT 10."""
    major = int(str(trt.__version__).split(".")[0])
    if major >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _logger(trt, sink: list[str]):
    class _Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            sink.append(str(msg))
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}")

    return _Capture()


def build_engine(onnx_path: Path, profiles: list[dict], *, sparse: bool, settings: BuildSettings) -> dict:
    """Build one serialized engine; returns {"plan": bytes, "layers": [...], "log": [...], "seconds"}."""
    import tensorrt as trt

    log: list[str] = []
    logger = _logger(trt, log)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs[:5]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if settings.builder_optimization_level is not None:
        config.builder_optimization_level = settings.builder_optimization_level
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    cache = None
    if settings.timing_cache:
        tc = Path(settings.timing_cache)
        cache = config.create_timing_cache(tc.read_bytes() if tc.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; last log lines: {log[-5:]}")
    if cache is not None:
        Path(settings.timing_cache).write_bytes(bytes(cache.serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return {"plan": bytes(plan), "layers": trt_inspect.parse_layers(info), "log": log,
            "seconds": round(time.perf_counter() - t0, 2), "version": trt.__version__}


def run_engine(plan: bytes, input_ids: torch.Tensor, profile: int = 0) -> torch.Tensor:
    """Logits of a serialized engine for int64 ``input_ids`` [batch, seq] (CUDA, via torch buffers)."""
    import tensorrt as trt

    to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    stream = torch.cuda.Stream()
    ctx.set_optimization_profile_async(profile, stream.cuda_stream)
    feeds = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "position_ids": torch.arange(input_ids.shape[1]).expand_as(input_ids)}
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dt = to_torch[engine.get_tensor_dtype(name)]
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = feeds[name].to(device="cuda", dtype=dt).contiguous()
            feeds[name] = t
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=to_torch[engine.get_tensor_dtype(name)],
                            device="cuda")
            outputs[name] = t
            ctx.set_tensor_address(name, t.data_ptr())
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return outputs.get("logits", next(iter(outputs.values()))).float().cpu()


class TensorRTLowering:
    name = "tensorrt"

    def __init__(self, settings: BuildSettings | None = None):
        self.settings = settings or BuildSettings()

    def requires(self, artifact_dir: Path, cfg: ExportConfig = ExportConfig()) -> None:
        """Family features against the ONNX graph and the dtype, from config.json (before any work)."""
        requires(artifact_dir, self.name, dtypes=("fp16", "bf16"), dtype=cfg.dtype)

    def lower(self, artifact_dir: Path, out_dir: Path, cfg: ExportConfig = ExportConfig()) -> Path:
        from engines import EngineUnavailable
        from engines.onnx_export import MODEL_FILE, export_onnx

        self.requires(artifact_dir, cfg)
        dtype = cfg.dtype or "fp16"
        out_dir = Path(out_dir)
        missing = None
        with atomic_dir(out_dir, overwrite=cfg.overwrite) as tmp:
            export_onnx(artifact_dir, tmp / "onnx", dtype=dtype, form="logits")  # checks S 2:4 + feed, raises if bad
            onnx_path = tmp / "onnx" / MODEL_FILE
            s_nodes = trt_inspect.s_matmul_nodes(onnx_path)
            build = {"dtype": dtype, "settings": asdict(self.settings), "s_matmuls": len(s_nodes)}
            missing = missing_tensorrt_message(out_dir / "onnx" / MODEL_FILE)
            if missing:
                build["status"] = "not built: tensorrt not installed"
                build["message"] = missing
            else:
                build.update(self._build(onnx_path, tmp, s_nodes, artifact_dir))
            (tmp / "build.json").write_text(json.dumps(build, indent=2) + "\n")
        if missing:
            raise EngineUnavailable(f"{missing} The checked ONNX graph is at {out_dir / 'onnx'}. With TensorRT "
                                    f"installed: armor-export export --artifact {artifact_dir} --engine tensorrt "
                                    f"--out {out_dir} --overwrite (the folder is armor-export's, so it is replaced)")
        return out_dir

    def _build(self, onnx_path: Path, tmp: Path, s_nodes: dict, artifact_dir: Path) -> dict:
        cfg = json.loads((Path(artifact_dir) / "config.json").read_text())
        profiles = choose_profiles(onnx_inputs(onnx_path), self.settings, cfg.get("max_position_embeddings"))
        out = {"profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]}
        sparsity = {}
        for kind in ("sparse", "dense"):
            res = build_engine(onnx_path, profiles, sparse=kind == "sparse", settings=self.settings)
            (tmp / f"engine_{kind}.plan").write_bytes(res["plan"])
            (tmp / f"layers_{kind}.json").write_text(json.dumps({"Layers": res["layers"]}, indent=1))
            (tmp / f"build_{kind}.log").write_text("\n".join(res["log"]) + "\n")
            rep = trt_inspect.s_sparsity_report(s_nodes, res["layers"], trt_inspect.parse_sparsity_log(res["log"]))
            sparsity[kind] = {"summary": trt_inspect.summarise(rep), "layers": rep}
            out[f"{kind}_seconds"], out["tensorrt"] = res["seconds"], res["version"]
        (tmp / "sparsity.json").write_text(json.dumps(sparsity, indent=1, default=str) + "\n")
        out["status"] = "built"
        return out

    def verify(self, artifact_dir: Path, engine_dir: Path, cfg: ExportConfig = ExportConfig()) -> dict:
        from armor_export.adapters import model_facts
        from engines.onnx_checks import s_check
        from engines.onnx_export import MODEL_FILE, armor_linears, read_config
        from engines.parity import TOLERANCES, Check, logits_checks, model_logits, parity_tokens, write_report
        from engines.torch_module import load_armor_model

        engine_dir = Path(engine_dir)
        build = json.loads((engine_dir / "build.json").read_text())
        model, art = load_armor_model(artifact_dir)
        checks = [s_check(engine_dir / "onnx" / MODEL_FILE, armor_linears(art), "TensorRT ONNX")]
        meta = {"engine": "tensorrt", "build": build}
        report_dir = cfg.report_dir or engine_dir
        if build.get("status") != "built":
            checks.append(Check("TensorRT engine", build.get("status"), "needs tensorrt + GPU", False))
            return write_report(report_dir, "ARMOR TensorRT parity", checks, meta)
        sparsity = json.loads((engine_dir / "sparsity.json").read_text())
        for kind in ("sparse", "dense"):
            s = sparsity[kind]["summary"]
            checks.append(Check(f"{kind} engine: S MatMuls with a sparse tactic", f"{s['sparse']}/{s['s_matmuls']} "
                                f"(dense {s['dense']}, unknown {s['unknown']})", "informational", True, s))
        if torch.cuda.is_available():
            tokens = parity_tokens(cfg.parity_tokens, model_facts(read_config(artifact_dir)), cfg.parity_seqlen)
            ref = model_logits(model, tokens)
            tol = TOLERANCES[build["dtype"]]
            for kind in ("sparse", "dense"):
                got = torch.cat([run_engine((engine_dir / f"engine_{kind}.plan").read_bytes(), t[None])
                                 for t in tokens])
                checks += logits_checks(ref, got, tokens, tol, f"{kind} engine vs PyTorch fp32")
        else:
            checks.append(Check("engine logits parity", "no CUDA device: skipped", "needs a GPU", True))
        return write_report(report_dir, "ARMOR TensorRT parity", checks, meta)
