"""Peak memory of the stages that write (artifact, ONNX, TensorRT-LLM checkpoint) on tiny random models of N layers.

For each layer count: a random Llama-shaped model (``benchmarks.synth``, hidden 512, intermediate 1024
unless told) is loaded (``load``: the weights), then pruned with ``magnitude`` from the loaded model
(``prune_write``: no calibration, so what is measured is solving chunk by chunk and writing the artifact),
given random A/B blocks (``synth.with_random_blocks``, not measured), exported to ONNX fp32 (the checks
off: they read the written file, they are not the writer) and written as the TensorRT-LLM checkpoint in
fp16 with shards of at most ``--shard-bytes``. Per stage the peak resident memory above the stage's start
is read from ``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs`` after ``malloc_trim``, so
freed memory of an earlier stage is neither counted nor reused unseen). A writer that streams grows by at
most a chunk / a layer / a shard whatever N is; one that assembles everything in RAM grows by a multiple of
the factors.

    python -m benchmarks.stage_memory --layers 2 4 [--hidden 512 --intermediate 1024] [--json out.json]
Linux only (procfs). Prints one JSON object: per layer count the weight bytes and each stage's growth.
tests/engines/test_memory_scaling.py runs it for 2 and 4 layers and bounds the growth between them.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
from pathlib import Path
from armor_export import source


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


def measure(layers: int, root: Path, *, hidden: int = 512, intermediate: int = 1024,
            shard_bytes: int = 4 << 20) -> dict:
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from benchmarks.synth import make_tiny_model_dir, with_random_blocks
    from engines.hf_checkpoint import write_checkpoint
    from engines.onnx_export import export_onnx
    from solver.config import SolverConfig

    model = make_tiny_model_dir(root / f"model{layers}", num_hidden_layers=layers, hidden_size=hidden,
                                intermediate_size=intermediate, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=hidden // 8)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    loaded, load_bytes = peak_growth(lambda: source.load(str(model)))
    art, prune_bytes = peak_growth(lambda: pipeline.prune(
        str(model), SolverConfig(method="magnitude"), CalibConfig(), root / f"art{layers}", progress=False,
        loaded=loaded))
    del loaded
    blocked = with_random_blocks(art, root / f"blocks{layers}", b=16)
    _, onnx_bytes = peak_growth(lambda: export_onnx(blocked, root / f"onnx{layers}", check=False))
    _, ckpt_bytes = peak_growth(lambda: write_checkpoint(blocked, root / f"ckpt{layers}", dtype="fp16",
                                                         max_shard_bytes=shard_bytes))
    return {"layers": layers, "weight_bytes": weights, "load_peak_growth": load_bytes,
            "prune_write_peak_growth": prune_bytes, "onnx_export_peak_growth": onnx_bytes,
            "trtllm_checkpoint_peak_growth": ckpt_bytes, "shard_bytes": shard_bytes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--shard-bytes", type=int, default=4 << 20, help="TensorRT-LLM checkpoint shard limit")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stage-memory-") as tmp:
        rows = [measure(n, Path(tmp), hidden=a.hidden, intermediate=a.intermediate, shard_bytes=a.shard_bytes)
                for n in a.layers]
    res = {"hidden": a.hidden, "intermediate": a.intermediate, "runs": rows}
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
