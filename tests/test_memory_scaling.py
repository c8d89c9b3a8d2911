"""Memory of the writing stages does not grow with the model's depth beyond the weights themselves.

``benchmarks.stage_memory`` runs in a fresh process (procfs peak RSS, reset per stage) on tiny random Llama
models of 2 and 6 decoder layers (hidden 512: 19.7 vs 57.4 MB of fp32 weights) and reports each stage's peak
growth. Between the two, the artifact writer (a magnitude prune of the already loaded model: solve chunk by
chunk, shards from the resume store), the ONNX exporter (external data tensor by tensor) and the TensorRT-LLM
checkpoint writer (4 MiB shards) may grow by at most half the added weights. Measured (2 runs, 2-core
machine): 0.06-0.14, 0.08-0.26 and 0.01 of the added weights; before streaming the exporter grew by 2.95x
and the prune by 2.45x (with loading) of the added weights. The load itself grows by about the weights
(0.93x): it is the model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRACTION = 0.5  # of the added weight bytes; noise between runs is ~0.25 at these sizes
WRITERS = ("prune_write_peak_growth", "onnx_export_peak_growth", "trtllm_checkpoint_peak_growth")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux procfs (VmHWM reset)")
def test_writers_do_not_grow_with_depth(tmp_path):
    out = tmp_path / "mem.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.stage_memory", "--layers", "2", "6", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    small, big = json.loads(out.read_text())["runs"]
    added = big["weight_bytes"] - small["weight_bytes"]
    assert added > 30e6
    assert big["load_peak_growth"] - small["load_peak_growth"] > 0.5 * added  # the probe sees the weights
    for stage in WRITERS:
        grown = big[stage] - small[stage]
        assert grown <= FRACTION * added, (stage, grown / added, small[stage], big[stage])
