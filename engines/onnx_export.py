"""The "onnx" engine: write an artifact as ONNX (fp32 / fp16 / bf16; logits or KV-cache form).

``export_onnx`` builds the graph with ``engines.onnx_graph`` (onnx-ir, op by op: see that module
for why not the dynamo exporter or the genai builder), saves ``model.onnx`` + ``model.onnx.data``
(external data, one file) atomically, then runs ``onnx.checker`` on the path, strict shape
inference, and the S-initializer check of ``engines.onnx_checks``. ``dense=True`` writes the
artifact's source model (dense weights from the manifest's source folder; the merged A.S.B when that
folder is gone) through the same graph, so dense and ARMOR compare in the same runtime. A fused group of
the artifact (``--fuse``) is written as one linear (stacked S and A, the shared B; ``engines.onnx_graph``)
unless ``fused=False``; dense exports keep the source model's separate projections.

``requires`` checks the family's features against the graph (``engines.onnx_graph.SUPPORTED``) from
``config.json`` alone, so the one-shot run calls it on the model folder before pruning. The engines
built on this module are ``engines.onnx_engine`` ("onnx"), ``engines.genai`` and ``engines.tensorrt``.
The graph precision is carried by the initializers (strongly typed TensorRT 11 reads it from there).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from armor_export.adapters import model_facts
from armor_export.artifact import BASE_FILE, Artifact, load_artifact
from armor_export.fsutil import atomic_dir
from engines.deferred import Deferred
from engines.onnx_graph import IR_DTYPES, DecoderGraph, FusedGroup, GraphSpec, LinearWeights, \
    check_onnx_features

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "onnx_export.json"


def _file_tensors(files) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor: (file, shape)}`` of safetensors files, from their headers only."""
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = (str(f), tuple(fh.get_slice(k).get_shape()))
    return out


def _read_one(file: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, "pt") as fh:
        return fh.get_tensor(key)


def _source_weights(art: Artifact) -> dict[str, Deferred] | None:
    """Dense weights of the pruned linears in the artifact's source folder (read when written), or None."""
    folder = Path(art.manifest.get("source", {}).get("folder") or "")
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    wanted = {f"{n}.{p}" for n in art.layers for p in ("weight", "bias")}
    out = {k: Deferred(shape, partial(_read_one, f, k)) for k, (f, shape) in _file_tensors(files).items()
           if k in wanted}
    return out if all(f"{n}.weight" in out for n in art.layers) else None


class _LayerReader:
    """One artifact layer's factors at a time (or one fused group's members): the S, A, B and bias initializers of
    a linear are written one after the other, so the last layer (group) read is kept, and only it."""

    def __init__(self, art: Artifact):
        self.art, self.key, self.held = art, None, None

    def __call__(self, name: str):
        return self.many((name,))[0]

    def many(self, names: tuple[str, ...]) -> list:
        if names != self.key:
            self.key, self.held = None, None  # the previous layer is released before the next is read
            self.held, self.key = [self.art.layers[n] for n in names], names
        return self.held

    def clear(self) -> None:
        self.key, self.held = None, None

    def part(self, name: str, get) -> Callable[[], torch.Tensor]:
        return lambda: get(self(name))

    def stacked(self, names: tuple[str, ...], get) -> Callable[[], torch.Tensor]:
        return lambda: get(self.many(names))


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def fused_linear(read: _LayerReader, members: tuple[str, ...]) -> tuple[LinearWeights, FusedGroup]:
    """The stacked ARMOR linear of a fused group (Deferred: S and A rows of the members concatenated in stacking
    order, the members' shared B, their biases stacked with zeros for a member without one) and its split."""
    from solver.fused import stack_biases

    lfs = read.many(members)
    sizes = tuple(int(lf.factors.S.shape[0]) for lf in lfs)
    f0, d_in = lfs[0].factors, int(lfs[0].factors.S.shape[1])
    S = Deferred((sum(sizes), d_in), read.stacked(members, lambda ls: _cat([x.factors.S for x in ls])))
    A = B = bias = None
    if f0.A_blocks is not None:
        n0 = sum(int(lf.factors.A_blocks.shape[0]) for lf in lfs)
        A = Deferred((n0, *f0.A_blocks.shape[1:]), read.stacked(members, lambda ls: _cat([x.factors.A_blocks
                                                                                              for x in ls])))
    if f0.B_blocks is not None:  # shared by every member (load_artifact checked it)
        B = Deferred(tuple(f0.B_blocks.shape), read.stacked(members, lambda ls: ls[0].factors.B_blocks))
    if any(lf.bias is not None for lf in lfs):
        bias = Deferred((sum(sizes),), read.stacked(members, lambda ls: stack_biases([x.bias for x in ls],
                                                                                      list(sizes))))
    return LinearWeights(S, A, B, bias), FusedGroup(tuple(members), sizes)


def collect_linears(art: Artifact, config, *, dense: bool, fused: bool = True
                    ) -> tuple[dict[str, LinearWeights], str, dict[str, FusedGroup]]:
    """Every linear the graph needs: ARMOR factors for pruned ones, base weights for the others, as
    ``Deferred`` tensors (shapes now, data read from the artifact tensor by tensor while the model is
    saved): the exporter never holds more than one layer's factors (one fused group's). With ``fused`` (and not
    ``dense``) each fused group of the artifact is one stacked linear under the group's name instead of its
    members; the groups are returned for the graph."""
    from solver.blockdiag import product

    lin: dict[str, LinearWeights] = {}
    src = _source_weights(art) if dense else None
    how = "armor" if not dense else ("source" if src is not None else "merged A.S.B")
    read = _LayerReader(art)
    groups: dict[str, FusedGroup] = {}
    if fused and not dense:
        for g, members in art.groups.items():
            lin[g], groups[g] = fused_linear(read, members)
    grouped = {m for fg in groups.values() for m in fg.members}
    for name in art.layers:
        if name in grouped:
            continue
        lf = read(name)  # one layer in memory, for its shapes
        f, shape = lf.factors, lambda t: None if t is None else tuple(t.shape)
        S, A, B, bias = (None if shape(t) is None else Deferred(shape(t), read.part(name, g)) for t, g in (
            (f.S, lambda x: x.factors.S), (f.A_blocks, lambda x: x.factors.A_blocks),
            (f.B_blocks, lambda x: x.factors.B_blocks), (lf.bias, lambda x: x.bias)))
        if not dense:
            lin[name] = LinearWeights(S, A, B, bias)
        elif src is not None:
            lin[name] = LinearWeights(src[f"{name}.weight"], None, None, src.get(f"{name}.bias", bias), dense=True)
        else:
            W = Deferred(shape(f.S), read.part(name, lambda x: product(x.factors.A_blocks, x.factors.S,
                                                                       x.factors.B_blocks)))
            lin[name] = LinearWeights(W, None, None, bias, dense=True)
    read.clear()
    base = deferred_base(art)
    facts = model_facts(config)
    fam = facts.family
    for i in range(facts.num_layers):
        for p in (*fam.qkv, fam.o_proj, *fam.gate_up, fam.down_proj):
            name = facts.layer(i, p)
            if name not in lin and name not in grouped:
                w = base.get(f"{name}.weight")
                if w is None:
                    raise ValueError(f"{name}: neither pruned factors nor a dense weight in the artifact")
                lin[name] = LinearWeights(w, None, None, base.get(f"{name}.bias"), dense=True)
    return lin, how, groups


def armor_linears(art: Artifact, *, fused: bool = True) -> int:
    """The ARMOR linears (S initializers) of the artifact's graph: one per layer, a fused group counting once."""
    groups = art.groups if fused else {}
    return len(art.layers) - sum(len(m) for m in groups.values()) + len(groups)


def deferred_base(art: Artifact) -> dict[str, Deferred]:
    """The artifact's base tensors (embeddings, norms, unpruned linears) as ``Deferred``, read when written."""
    base = art.base

    def load(key):
        return lambda: base[key]

    shapes = _file_tensors([art.path / BASE_FILE]) if (art.path / BASE_FILE).is_file() else \
        {k: ("", tuple(v.shape)) for k, v in base.items()}
    return {k: Deferred(shape, load(k)) for k, (_, shape) in shapes.items()}


def read_config(folder):
    """The transformers config of an artifact or model folder (config.json is all ``requires`` reads)."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (pass an artifact or model folder)")
    return AutoConfig.from_pretrained(folder)


def requires(folder, engine: str = "onnx", dtypes=tuple(IR_DTYPES), dtype: str | None = None):
    """Raise (UnsupportedFeature / ValueError, one line naming family, feature and engine) when the model in
    ``folder`` (artifact or source model) cannot be lowered to this engine's ONNX graph; return its facts."""
    if dtype is not None and dtype not in dtypes:
        raise ValueError(f"--dtype {dtype}: the {engine!r} engine writes {'/'.join(dtypes)} graphs")
    return check_onnx_features(read_config(folder), engine, str(Path(folder) / "config.json"))


def export_onnx(artifact_dir, out_dir, *, dtype: str = "fp32", form: str = "logits", dense: bool = False,
                overwrite: bool = False, check: bool = True, fused: bool = True) -> Path:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data``, ``onnx_export.json``); return ``out_dir``.
    ``fused=False`` writes the members of the artifact's fused groups as separate linears."""
    import onnx_ir as ir
    from transformers import AutoConfig

    t0 = time.perf_counter()
    spec = GraphSpec(dtype=dtype, form=form)
    requires(artifact_dir)
    art = load_artifact(Path(artifact_dir))
    config = AutoConfig.from_pretrained(art.path)
    facts = model_facts(config)
    linears, how, groups = collect_linears(art, config, dense=dense, fused=fused)
    model = DecoderGraph(config, spec, linears, deferred_base(art), groups).build()
    t_build = time.perf_counter() - t0
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        ir.save(model, tmp / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=1024)
        t_save = time.perf_counter() - t0 - t_build
        checks = check_written(tmp / MODEL_FILE, dense=dense) if check else {}
        meta = {"dtype": dtype, "form": form, "dense": dense, "weights": how, "opset": model.opset_imports[""],
                "fused_groups": {g: {"members": list(fg.members), "split": list(fg.sizes)}
                                 for g, fg in groups.items()},
                "model_type": config.model_type, "num_layers": facts.num_layers,
                "num_key_value_heads": facts.kv_heads, "head_dim": facts.head_dim,
                "sliding_windows": list(facts.windows), "features": sorted(facts.features()),
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
