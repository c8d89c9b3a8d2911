"""Checks on a written ONNX model that need no TensorRT.

``check_s_initializers(path)``: every initializer named ``*.S`` must be a 2-D FLOAT/FLOAT16/BFLOAT16
tensor that reaches a MatMul or Gemm through nothing but Transpose / Cast (the rule Polygraphy's
sparsity checker applies, deployment-facts §2.2); along the operand's reduction axis (K) every aligned
group of 4 holds at least 2 zeros, and every zero is +0.0 in the bytes read back from the file.
``op_counts(path)``: op-type histogram (tests assert no Einsum and the MatMuls per linear).
``structure_digest(path)``: sha256 of the graph's structure (ops, attributes, wiring by producer position,
initializer names / shapes / types, the bytes of the graph's own constants; not the weights), so a test can
pin a graph's form across code changes independently of the weight values.
``polygraphy_sparsity(path)``: ``polygraphy inspect sparsity`` when polygraphy is installed, else a
skip reason. This module reads models; it never writes or fixes them.
"""
from __future__ import annotations

import collections
import shutil
import subprocess

import numpy as np

SPARSE_OK_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16")


def _trace_to_gemm(value) -> tuple[str | None, int, str]:
    """Follow the single-use chain from an initializer through Transpose/Cast to its MatMul/Gemm.

    Returns (consumer op or None, axis of the initializer that is K, reason when not found).
    Axis bookkeeping: ``axis`` is the initializer axis currently sitting at position ``pos`` of the
    flowing tensor; for a 2-D tensor we track where the initializer's axes 0/1 end up."""
    order = [0, 1]  # order[j] = initializer axis now at position j
    v = value
    while True:
        uses = list(v.uses())
        if len(uses) != 1:
            return None, -1, f"{len(uses)} consumers of {v.name}"
        node, idx = uses[0].node, uses[0].idx
        if node.op_type == "Cast":
            v = node.outputs[0]
            continue
        if node.op_type == "Transpose":
            perm = list(node.attributes.get_ints("perm", [1, 0]))
            order = [order[p] for p in perm]
            v = node.outputs[0]
            continue
        if node.op_type == "MatMul":
            # A operand: K is its last axis; B operand: K is its first axis (2-D).
            return "MatMul", order[1] if idx == 0 else order[0], ""
        if node.op_type == "Gemm":
            ta, tb = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
            if idx == 0:
                return "Gemm", order[0] if ta else order[1], ""
            if idx == 1:
                return "Gemm", order[1] if tb else order[0], ""
            return None, -1, "S used as Gemm bias"
        return None, -1, f"{node.op_type} between {value.name} and its MatMul"


def is_24(arr: np.ndarray, axis: int) -> tuple[bool, int]:
    """(every aligned 4 along ``axis`` has >= 2 zeros, number of violating groups)."""
    a = np.moveaxis(arr, axis, -1)
    if a.shape[-1] % 4:
        return False, -1
    zeros = (a.reshape(-1, 4) == 0).sum(-1)
    bad = int((zeros < 2).sum())
    return bad == 0, bad


def release_map(t) -> None:
    """Close an external tensor's mmap of the data file (its pages count as resident until then), so that the
    checks hold one S mapped at a time, not all of them. A view of it still referenced elsewhere (a caller, a
    profiler holding a frame) keeps the map open: then it closes when that view goes."""
    try:
        t.release()
    except (AttributeError, BufferError):
        pass


def check_s_initializers(path, *, suffix: str = ".S") -> dict:
    """Check every ``*.S`` initializer of the model at ``path`` (external data read from disk, one tensor
    mapped at a time)."""
    import onnx_ir as ir

    model = ir.load(str(path))
    results, failures = {}, []
    for name, v in model.graph.initializers.items():
        if not name.endswith(suffix):
            continue
        t = v.const_value
        res = {"shape": list(t.shape), "dtype": t.dtype.name}
        consumer, k_axis, why = _trace_to_gemm(v)
        res["consumer"] = consumer
        problems = []
        if len(t.shape) != 2:
            problems.append(f"rank {len(t.shape)} (must be 2-D)")
        if t.dtype.name not in SPARSE_OK_TYPES:
            problems.append(f"dtype {t.dtype.name} is not one Polygraphy checks")
        if consumer is None:
            problems.append(why)
        if not problems:
            raw = t.numpy()
            arr = raw.astype(np.float32) if raw.dtype.kind != "f" or raw.dtype.itemsize < 4 else raw
            ok, bad = is_24(arr, k_axis)
            res.update(k_axis=k_axis, groups_not_24=bad)
            if not ok:
                problems.append(f"{bad} groups of 4 along K (axis {k_axis}) have < 2 zeros")
            neg0 = int((np.signbit(arr) & (arr == 0)).sum())
            res["negative_zeros"] = neg0
            if neg0:
                problems.append(f"{neg0} zeros are -0.0")
            del raw, arr
        release_map(t)
        res["passed"] = not problems
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
        results[name] = res
    return {"passed": not failures and bool(results), "count": len(results), "failures": failures,
            "layers": results}


def s_check(path, expected: int, where: str = ""):
    """One parity Check: every S initializer of the model at ``path`` passes and there are ``expected`` of them."""
    from engines.parity import Check

    rep = check_s_initializers(path)
    return Check(f"S initializers 2:4 along K, +0.0 zeros, fed to MatMul{f' ({where})' if where else ''}",
                 f"{rep['count'] - len(rep['failures'])}/{rep['count']}", f"all {expected} S initializers pass",
                 rep["passed"] and rep["count"] == expected, {"failures": rep["failures"][:20]})


def op_counts(path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node))


def structure_digest(path) -> str:
    """sha256 over the graph's form: inputs and outputs, every node's op, domain, attributes and the position of
    each input's producer (node index and output slot, initializer or graph-input name), every initializer's name,
    type and shape, and the values of the ``const.*`` initializers (shapes, axes, RoPE tables). Auto-generated
    value names and the weights themselves do not enter it."""
    import hashlib

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    g, h = m.graph, hashlib.sha256()
    source = {i.name: f"in:{i.name}" for i in g.input}
    source.update({t.name: f"init:{t.name}" for t in g.initializer})
    for t in g.initializer:
        h.update(f"{t.name}|{t.data_type}|{list(t.dims)}\n".encode())
        if t.name.startswith("const."):
            h.update(t.raw_data)
    for i in (*g.input, *g.output):
        h.update(f"io:{i.name}|{i.type.SerializeToString().hex()}\n".encode())
    for k, n in enumerate(g.node):
        attrs = sorted((a.name, a.SerializeToString().hex()) for a in n.attribute)
        h.update(f"{n.op_type}|{n.domain}|{attrs}|{[source.get(x, x) for x in n.input]}\n".encode())
        for j, o in enumerate(n.output):
            source[o] = f"node:{k}:{j}"
    h.update(str([source.get(o.name) for o in g.output]).encode())
    return h.hexdigest()


def polygraphy_sparsity(path) -> dict:
    """Run ``polygraphy inspect sparsity`` if installed; otherwise say why it was skipped."""
    exe = shutil.which("polygraphy")
    if exe is None:
        return {"ran": False, "reason": "polygraphy is not installed (pip install polygraphy)"}
    p = subprocess.run([exe, "inspect", "sparsity", str(path)], capture_output=True, text=True, timeout=600)
    return {"ran": True, "returncode": p.returncode, "output_tail": (p.stdout + p.stderr)[-4000:]}
