"""Peak memory of the artifact writer (a prune) and of the ONNX exporter on tiny random models of N layers.

For each layer count: a random Llama-shaped model (``benchmarks.synth``, hidden 512, intermediate 1024
unless told) is pruned with ``magnitude`` (no calibration: what is measured is loading, solving layer by
layer and writing the artifact), given random A/B blocks (``synth.with_random_blocks``, not measured),
and exported to ONNX fp32 (the checks off: they read the written file, they are not the writer).
Per stage the peak resident memory above the stage's start is read from ``/proc/self/status`` (VmHWM,
reset through ``/proc/self/clear_refs`` after ``malloc_trim``, so freed memory of an earlier stage is
neither counted nor reused unseen). A writer that streams grows by the model's weights (a prune loads the
model) plus at most a chunk, the exporter by one layer; one that assembles everything in RAM grows by
a multiple of the factors.

    python -m benchmarks.stage_memory --layers 2 4 [--hidden 512 --intermediate 1024] [--json out.json]
Linux only (procfs). Prints one JSON object: per layer count the weight bytes and each stage's growth.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
from pathlib import Path


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth(fn):
    """``(fn(), bytes)``: the peak resident memory while ``fn`` ran, above the resident memory at its start."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    start = _status_kb("VmRSS")
    out = fn()
    return out, (_status_kb("VmHWM") - start) * 1024


def measure(layers: int, root: Path, *, hidden: int = 512, intermediate: int = 1024) -> dict:
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from benchmarks.synth import make_tiny_model_dir, with_random_blocks
    from engines.onnx_export import export_onnx
    from solver.config import SolverConfig

    model = make_tiny_model_dir(root / f"model{layers}", num_hidden_layers=layers, hidden_size=hidden,
                                intermediate_size=intermediate, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=hidden // 8)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    art, prune_bytes = peak_growth(lambda: pipeline.prune(
        str(model), SolverConfig(method="magnitude"), CalibConfig(), root / f"art{layers}", progress=False))
    blocked = with_random_blocks(art, root / f"blocks{layers}", b=16)
    _, onnx_bytes = peak_growth(lambda: export_onnx(blocked, root / f"onnx{layers}", check=False))
    return {"layers": layers, "weight_bytes": weights, "prune_peak_growth": prune_bytes,
            "onnx_export_peak_growth": onnx_bytes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stage-memory-") as tmp:
        rows = [measure(n, Path(tmp), hidden=a.hidden, intermediate=a.intermediate) for n in a.layers]
    res = {"hidden": a.hidden, "intermediate": a.intermediate, "runs": rows}
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
