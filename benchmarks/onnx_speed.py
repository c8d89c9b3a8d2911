"""ONNX engine speed: export time, file sizes, ONNX Runtime CPU latency, dense vs ARMOR.

Run:  python -m benchmarks.onnx_speed [--artifact DIR] [--block-size 32] [--threads 2] [--out res.json]

Without --artifact it prunes the default model (SmolLM2-135M) with NoWag (16 windows) once into
$TMPDIR and adds random near-identity A/B blocks (b = --block-size) and a bias to every linear, so the
ARMOR graph carries the full B -> S -> A structure (the speed does not depend on the values).
Measures (fp32, CPUExecutionProvider): export time of the ARMOR logits graph; bytes of model.onnx +
model.onnx.data for dense (the source model through the same graph) and ARMOR; prefill latency for
1 x 512 tokens (median of --reps after a warm-up); decode latency per token with the KV-cache form
(past of 128 tokens, median over --decode-steps steps), as wall time and as process CPU time
(use --threads 1 on a shared machine: CPU time then counts only this run's work). Table, then JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def prepare_artifact(work: Path, block_size: int) -> Path:
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from solver.config import SolverConfig
    from benchmarks.synth import with_random_blocks

    nowag = work / "nowag"
    if not nowag.exists():
        pipeline.prune(None, SolverConfig(method="nowag", block_size=block_size), CalibConfig(samples=16), nowag,
                       progress=False)
    armor = work / f"armor_b{block_size}"
    if not armor.exists():
        with_random_blocks(nowag, armor, identity=False, b=block_size)
    return armor


def folder_bytes(d: Path) -> int:
    return sum((d / f).stat().st_size for f in ("model.onnx", "model.onnx.data") if (d / f).exists())


def time_prefill(runner, seq: int, reps: int) -> float:
    from engines.runners import logits_feeds

    ids = np.random.default_rng(0).integers(3, 40000, (1, seq))
    feeds = logits_feeds(ids)
    runner.run(feeds)
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        runner.run(feeds)
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ts) * 1e3, statistics.median(cs) * 1e3


def time_decode(runner, past_len: int, steps: int) -> float:
    past, (kvh, d), npdt = runner.past_spec()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, kvh, past_len, d)).astype(npdt) for n in past}
    ts, cs = [], []
    for s in range(steps + 2):
        total = past_len + s
        feeds.update(input_ids=np.array([[100 + s]], np.int64), attention_mask=np.ones((1, total + 1), np.int64),
                     position_ids=np.array([[total]], np.int64))
        t, c = time.perf_counter(), time.process_time()
        out = runner.run(feeds)
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
        for n in past:
            feeds[n] = out[n.replace("past_key_values.", "present.")]
    return statistics.median(ts[2:]) * 1e3, statistics.median(cs[2:]) * 1e3


def main(argv=None) -> dict:
    from engines.onnx_export import export_onnx, read_meta
    from engines.runners import OrtRunner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "armor_onnx_speed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse ONNX folders already in --work (skip export)")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    art = a.artifact or prepare_artifact(a.work, a.block_size)
    res = {"artifact": str(art), "threads": a.threads, "seq": a.seq, "past": a.past,
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d")}
    for kind, dense in (("dense", True), ("armor", False)):
        lg, kv = a.work / f"{kind}_logits", a.work / f"{kind}_kv"
        if not (a.reuse and (lg / "model.onnx").exists() and (kv / "model.onnx").exists()):
            t = time.perf_counter()
            export_onnx(art, lg, dense=dense, overwrite=True)
            res[f"{kind}_export_s"] = round(time.perf_counter() - t, 2)
            export_onnx(art, kv, dense=dense, form="kv", overwrite=True)
        res[f"{kind}_export_detail_s"] = read_meta(lg)["seconds"]
        res.setdefault(f"{kind}_export_s", read_meta(lg)["seconds"]["total"])
        res[f"{kind}_bytes"] = folder_bytes(lg)
        r = OrtRunner(lg, threads=a.threads)
        wall, cpu = time_prefill(r, a.seq, a.reps)
        res[f"{kind}_prefill_ms"], res[f"{kind}_prefill_cpu_ms"] = round(wall, 2), round(cpu, 2)
        del r
        r = OrtRunner(kv, threads=a.threads)
        wall, cpu = time_decode(r, a.past, a.decode_steps)
        res[f"{kind}_decode_ms"], res[f"{kind}_decode_cpu_ms"] = round(wall, 3), round(cpu, 3)
        del r
    for m in ("prefill", "decode"):
        res[f"{m}_overhead_pct"] = round(100 * (res[f"armor_{m}_ms"] / res[f"dense_{m}_ms"] - 1), 1)
        res[f"{m}_cpu_overhead_pct"] = round(100 * (res[f"armor_{m}_cpu_ms"] / res[f"dense_{m}_cpu_ms"] - 1), 1)
    print(f"{'':10}{'export s':>10}{'MB':>10}{'prefill ms':>12}{'decode ms/tok':>15}")
    for kind in ("dense", "armor"):
        print(f"{kind:10}{res[f'{kind}_export_s']:>10}{res[f'{kind}_bytes'] / 1e6:>10.1f}"
              f"{res[f'{kind}_prefill_ms']:>12}{res[f'{kind}_decode_ms']:>15}")
    print(f"{'overhead':10}{'':>20}{res['prefill_overhead_pct']:>11}%{res['decode_overhead_pct']:>14}%")
    print(f"{'cpu-time':10}{'':>20}{res['prefill_cpu_overhead_pct']:>11}%{res['decode_cpu_overhead_pct']:>14}%"
          "  (process CPU time per call; robust to a shared machine when --threads 1)")
    print(json.dumps(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
