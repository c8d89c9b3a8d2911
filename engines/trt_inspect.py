"""Pure-Python reading of TensorRT build evidence: which S MatMuls got a sparse implementation.

Three sources, none of which needs TensorRT to parse:
  * the ONNX graph: ``s_matmul_nodes`` maps every ``*.S`` initializer to the MatMul/Gemm node that
    consumes it (through Cast / Transpose / Q / DQ only: the eligibility rule of deployment-facts §2.2);
  * the engine inspector's JSON (``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``
    at ``ProfilingVerbosity.DETAILED``): ``parse_layers`` accepts the {"Layers": [...]} document, a bare
    list, or per-layer JSON strings; layers may be dicts or plain names (non-detailed verbosity);
  * the builder log: ``parse_sparsity_log`` reads the "(Sparsity) Layers eligible for sparse math:" and
    "(Sparsity) TRT inference plan picked sparse implementation for layers:" lines.
Key names and tactic names vary across TensorRT versions, so matching is by substring (any key that
contains "sparse"; tactic names containing "sparse", "_sp_" or "sptensorop"), and every matched
layer's raw record is kept in the report. ``s_sparsity_report`` combines the three into one verdict
per S: "sparse" / "dense" / "unknown" (e.g. a layer fused into a Myelin region with no tactic name).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

PASS_THROUGH = ("Cast", "Transpose", "QuantizeLinear", "DequantizeLinear", "Identity")
SPARSE_TACTIC = re.compile(r"sparse|sptensorop|(^|_)sp(_|$)|_sp\d|spmma", re.IGNORECASE)
LOG_ELIGIBLE = re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math:\s*(.*)", re.IGNORECASE)
LOG_PICKED = re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation for layers:\s*(.*)",
                        re.IGNORECASE)
RECORD_SEP = "\x1e"  # TensorRT joins the ONNX names of fused layers in "Metadata" with this


def s_matmul_nodes(model_or_path, suffix: str = ".S") -> dict[str, str | None]:
    """``{S initializer name: consuming MatMul/Gemm node name or None}`` of an ONNX model (path or
    ModelProto; external data is not loaded)."""
    import onnx

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else \
        onnx.load(str(model_or_path), load_external_data=False)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {}
    for init in model.graph.initializer:
        if not init.name.endswith(suffix):
            continue
        value, found = init.name, None
        for _ in range(16):
            users = consumers.get(value, [])
            if len(users) != 1:
                break
            node = users[0]
            if node.op_type in ("MatMul", "Gemm"):
                found = node.name or f"{node.op_type}({init.name})"
                break
            if node.op_type not in PASS_THROUGH:
                break
            value = node.output[0]
        out[init.name] = found
    return out


def parse_layers(doc) -> list[dict]:
    """Normalise inspector output to a list of layer dicts (each has at least "Name")."""
    if isinstance(doc, (bytes, str)):
        doc = json.loads(doc)
    if isinstance(doc, dict):
        doc = doc.get("Layers", [doc] if "Name" in doc else [])
    layers = []
    for item in doc:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError:
                item = {"Name": item}
        if isinstance(item, dict):
            layers.append(item)
    return layers


def _flatten_keys(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten_keys(v, f"{prefix}{k}.")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _flatten_keys(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], d


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("", "0", "false", "no", "none", "off", "dense")
    return bool(v)


def layer_sparsity(layer: dict) -> dict:
    """What one inspector layer record says about sparsity."""
    tactic = str(layer.get("TacticName") or layer.get("Tactic") or "")
    keys = {k: v for k, v in _flatten_keys(layer) if "sparse" in k.lower() or "sparsity" in k.lower()}
    return {"tactic": tactic or None, "sparse_tactic": bool(tactic and SPARSE_TACTIC.search(tactic)),
            "sparse_keys": keys, "sparse_flag": any(_truthy(v) for v in keys.values())}


def _layer_text(layer: dict) -> str:
    parts = [str(layer.get("Name", "")), str(layer.get("Metadata", ""))]
    for io in ("Inputs", "Outputs"):
        for t in layer.get(io, []) or []:
            parts.append(str(t.get("Name", "")) if isinstance(t, dict) else str(t))
    return RECORD_SEP.join(parts)


def parse_sparsity_log(lines) -> dict[str, list[str]]:
    """Layer names listed in the builder's "(Sparsity)" INFO lines."""
    out = {"eligible": [], "picked": []}
    for line in lines:
        for key, rx in (("eligible", LOG_ELIGIBLE), ("picked", LOG_PICKED)):
            m = rx.search(line)
            if m:
                out[key] += [n.strip() for n in m.group(1).split(",") if n.strip()]
    return out


def _mentions(text: str, names: list[str]) -> bool:
    return any(n and n in text for n in names)


def s_sparsity_report(s_nodes: dict[str, str | None], layers: list[dict], log: dict | None = None) -> dict:
    """Per S initializer: the engine layers that implement its MatMul and the verdict.

    A layer matches an S when its name, metadata or I/O names mention the S initializer or its
    MatMul node. verdict: "sparse" if a matching layer has a sparse tactic name or the build log
    says it was picked; "dense" if matching layers have tactic names and none is sparse;
    "unknown" if no layer matches or none has a tactic name (fused regions)."""
    log = log or {"eligible": [], "picked": []}
    report = {}
    for s_name, node in s_nodes.items():
        keys = [s_name, node or ""]
        keys += [s_name.removesuffix(".S") + "/S/"] if s_name.endswith(".S") else []
        matched = [ly for ly in layers if _mentions(_layer_text(ly), keys)]
        info = [layer_sparsity(ly) for ly in matched]
        picked = [n for n in log["picked"] if _mentions(n, keys)]
        eligible = [n for n in log["eligible"] if _mentions(n, keys)]
        if picked or any(i["sparse_tactic"] for i in info):
            verdict = "sparse"
        elif any(i["tactic"] for i in info):
            verdict = "dense"
        else:
            verdict = "unknown"
        report[s_name] = {"onnx_node": node, "verdict": verdict,
                          "layers": [ly.get("Name") for ly in matched],
                          "tactics": [i["tactic"] for i in info],
                          "sparse_keys": [i["sparse_keys"] for i in info if i["sparse_keys"]],
                          "log_eligible": bool(eligible), "log_picked": bool(picked),
                          "raw": matched[:4]}
    return report


def summarise(report: dict) -> dict:
    counts = {"sparse": 0, "dense": 0, "unknown": 0}
    for r in report.values():
        counts[r["verdict"]] += 1
    return {"s_matmuls": len(report), **counts}


def load_layer_json(path: Path) -> list[dict]:
    return parse_layers(Path(path).read_text())
