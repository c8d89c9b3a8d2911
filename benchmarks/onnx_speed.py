"""ONNX engine speed: export time, file sizes, ONNX Runtime CPU latency, dense vs ARMOR.

Run:  python -m benchmarks.onnx_speed [--artifact DIR [--artifact DIR2 ...]] [--block-size 32] [--threads 2]
                                      [--out res.json]

Without --artifact it prunes the default model (SmolLM2-135M) with NoWag (16 windows) once into
$TMPDIR and adds random near-identity A/B blocks (b = --block-size) and a bias to every linear, so the
ARMOR graph carries the full B -> S -> A structure (the speed does not depend on the values).
Measures (fp32, CPUExecutionProvider): export time of the ARMOR logits graph; bytes of model.onnx +
model.onnx.data for dense (the source model through the same graph) and ARMOR; prefill latency for
1 x 512 tokens (median of --reps after a warm-up); decode latency per token with the KV-cache form
(past of 128 tokens, median over --decode-steps steps), as wall time and as process CPU time
(use --threads 1 on a shared machine: CPU time then counts only this run's work). Several --artifact
(e.g. unfused and fused) are timed in one run, dense and each variant taking turns call by call.
Table, then JSON.
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


def prefill_call(runner, seq: int, vocab: int = 40000):
    """One prefill of 1 x seq random tokens (ids below ``vocab``) through the logits graph (a closure the timer
    repeats)."""
    from engines.runners import logits_feeds

    feeds = logits_feeds(np.random.default_rng(0).integers(3, min(vocab, 40000), (1, seq)))
    return lambda: runner.run(feeds)


def decode_call(runner, past_len: int):
    """One decode step with a KV cache that grows from ``past_len`` by one token per call."""
    past, (kvh, d), npdt = runner.past_spec()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, kvh, past_len, d)).astype(npdt) for n in past}
    step = [0]

    def call():
        total = past_len + step[0]
        feeds.update(input_ids=np.array([[3 + step[0] % 64]], np.int64), attention_mask=np.ones((1, total + 1), np.int64),
                     position_ids=np.array([[total]], np.int64))
        out = runner.run(feeds)
        for n in past:
            feeds[n] = out[n.replace("past_key_values.", "present.")]
        step[0] += 1
    return call


def interleaved_medians(calls: dict[str, object], reps: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, process CPU ms) per named call, the calls taking turns rep by rep so that a change of
    machine load hits every variant alike."""
    for _ in range(warmup):
        for c in calls.values():
            c()
    ts = {k: [] for k in calls}
    cs = {k: [] for k in calls}
    for _ in range(reps):
        for k, c in calls.items():
            t, p = time.perf_counter(), time.process_time()
            c()
            ts[k].append(time.perf_counter() - t)
            cs[k].append(time.process_time() - p)
    return {k: (statistics.median(ts[k]) * 1e3, statistics.median(cs[k]) * 1e3) for k in calls}


def variants(artifacts: list[Path], names: list[str] | None) -> list[tuple[str, Path, bool]]:
    """(name, artifact, dense) per graph to time: the dense graph of the first artifact, then each artifact."""
    names = names or (["armor"] if len(artifacts) == 1 else [a.name for a in artifacts])
    if len(names) != len(artifacts) or "dense" in names or len(set(names)) != len(names):
        raise SystemExit("--name: one distinct name per --artifact, not 'dense'")
    return [("dense", artifacts[0], True)] + [(n, a, False) for n, a in zip(names, artifacts)]


def main(argv=None) -> dict:
    from engines.onnx_export import export_onnx, read_meta
    from engines.runners import OrtRunner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, action="append", default=None,
                    help="an ARMOR artifact to time (repeat to time several in one run, e.g. unfused and fused)")
    ap.add_argument("--name", action="append", default=None, help="a name per --artifact (default: folder names)")
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
    arts = a.artifact or [prepare_artifact(a.work, a.block_size)]
    vs = variants(arts, a.name)
    res = {"artifacts": {n: str(p) for n, p, _ in vs}, "threads": a.threads, "seq": a.seq, "past": a.past,
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()[0]}
    for kind, art, dense in vs:
        lg, kv = a.work / f"{kind}_logits", a.work / f"{kind}_kv"
        if not (a.reuse and (lg / "model.onnx").exists() and (kv / "model.onnx").exists()):
            t = time.perf_counter()
            export_onnx(art, lg, dense=dense, overwrite=True)
            res[f"{kind}_export_s"] = round(time.perf_counter() - t, 2)
            export_onnx(art, kv, dense=dense, form="kv", overwrite=True)
        res[f"{kind}_export_detail_s"] = read_meta(lg)["seconds"]
        res.setdefault(f"{kind}_export_s", read_meta(lg)["seconds"]["total"])
        res[f"{kind}_bytes"] = folder_bytes(lg)
    kinds = [k for k, _, _ in vs]
    vocab = json.loads((arts[0] / "config.json").read_text())["vocab_size"]
    for m, form, make, reps, warm in (("prefill", "logits", lambda r: prefill_call(r, a.seq, vocab), a.reps, 1),
                                      ("decode", "kv", lambda r: decode_call(r, a.past), a.decode_steps, 2)):
        runners = {k: OrtRunner(a.work / f"{k}_{form}", threads=a.threads) for k in kinds}
        for k, (wall, cpu) in interleaved_medians({k: make(r) for k, r in runners.items()}, reps, warm).items():
            res[f"{k}_{m}_ms"], res[f"{k}_{m}_cpu_ms"] = round(wall, 3), round(cpu, 3)
        del runners
        for k in kinds[1:]:
            res[f"{k}_{m}_overhead_pct"] = round(100 * (res[f"{k}_{m}_ms"] / res[f"dense_{m}_ms"] - 1), 1)
            res[f"{k}_{m}_cpu_overhead_pct"] = round(100 * (res[f"{k}_{m}_cpu_ms"] / res[f"dense_{m}_cpu_ms"] - 1), 1)
    res["load_after"] = os.getloadavg()[0]
    print(f"{'':14}{'export s':>10}{'MB':>10}{'prefill ms':>12}{'decode ms/tok':>15}{'cpu prefill':>13}"
          f"{'cpu decode':>12}")
    for k in kinds:
        over = "" if k == "dense" else (f"{res[f'{k}_prefill_cpu_overhead_pct']:>+12}%"
                                         f"{res[f'{k}_decode_cpu_overhead_pct']:>+11}%")
        print(f"{k:14}{res[f'{k}_export_s']:>10}{res[f'{k}_bytes'] / 1e6:>10.1f}{res[f'{k}_prefill_ms']:>12}"
              f"{res[f'{k}_decode_ms']:>15}{over}")
    print("overheads: process CPU time per call over dense (robust to a shared machine with --threads 1); the variants "
          "take turns call by call")
    print(json.dumps(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
