"""Proof at real shapes: a random model with Llama-3-8B's layer shapes and a few decoder layers, pruned, lowered
to ONNX fp16 and a TensorRT-LLM checkpoint, and verified, each stage in its own child process.

    python -m benchmarks.scale build --layers 2 --out /tmp/l3_2          # HF folder from a config (no download)
    python -m benchmarks.scale stages --model /tmp/l3_2 --work /tmp/w2 --json s2.json
    python -m benchmarks.scale solve --b 32 128 --iterations 3 --json solve.json

``stages`` runs every stage as ``/usr/bin/time -v python -m armor_export ...`` and records its peak RSS (the
kernel's maximum resident set size of the child), the peak anonymous RSS (sampled every 0.5 s: RSS without the
file-backed pages of mmap'd weights, which the kernel can drop), wall and CPU seconds. A watchdog stops a stage whose process
tree goes above ``--limit-gb`` of RSS (the machine is shared) and records the stage as stopped: that is a finding.
``solve`` times ARMOR's iterations on one 4096 x 14336 layer (Llama-3-8B's down_proj) at each block size.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

# Llama-3-8B's shapes (config.json of meta-llama/Meta-Llama-3-8B), fewer layers.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def build(layers: int, out: Path) -> Path:
    from benchmarks.synth import make_tiny_model_dir

    return make_tiny_model_dir(out, num_hidden_layers=layers, **LLAMA3_8B)


def stage_commands(model: Path, work: Path, iterations: int, samples: int, seqlen: int) -> dict[str, list[str]]:
    art, onnx, trt = work / "artifact", work / "onnx_fp16", work / "trtllm"
    py = [sys.executable, "-m", "armor_export"]
    return {
        "prune": py + ["prune", "--model", str(model), "--preset", "cpu", "--iterations", str(iterations),
                       "--layer-by-layer", "--calib-samples", str(samples), "--calib-seqlen", str(seqlen),
                       "--out", str(art), "--overwrite"],
        "export onnx fp16": py + ["export", "--artifact", str(art), "--engine", "onnx", "--dtype", "fp16",
                                  "--out", str(onnx), "--overwrite"],
        "export trtllm checkpoint": py + ["export", "--artifact", str(art), "--engine", "trtllm",
                                          "--out", str(trt), "--overwrite"],
        "verify onnx": py + ["verify", "--artifact", str(art), "--engine", "onnx", "--engine-dir", str(onnx),
                             "--eval-seqlen", str(seqlen)],
    }


def _tree_mem(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, anonymous RSS) of a process tree, bytes. Anonymous = RSS minus file-backed and shared pages: the
    pages of mmap'd safetensors / ONNX data count in RSS but are clean page cache the kernel can drop, so the
    anonymous part is the memory a stage really needs."""
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = anon = 0
    for p in procs:
        try:
            m = p.memory_info()
        except psutil.NoSuchProcess:
            continue
        rss += m.rss
        anon += m.rss - getattr(m, "shared", 0)
    return rss, anon


def run_stage(cmd: list[str], env: dict, limit_bytes: int, log: Path) -> dict:
    """One stage under /usr/bin/time -v, stopped when its process tree's RSS passes ``limit_bytes``."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], env=env, stdout=err, stderr=subprocess.STDOUT)
        ps, stopped, seen, seen_anon = psutil.Process(proc.pid), False, 0, 0
        while proc.poll() is None:
            rss, anon = _tree_mem(ps)
            seen, seen_anon = max(seen, rss), max(seen_anon, anon)
            if seen > limit_bytes:
                for c in ps.children(recursive=True):
                    c.kill()
                stopped = True
                proc.wait()
                break
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")

    def field(name):
        m = re.search(rf"{re.escape(name)}: ([\d.:]+)", text)
        return m.group(1) if m else None

    rss_kb = field("Maximum resident set size (kbytes)")
    user, sys_ = field("User time (seconds)"), field("System time (seconds)")
    return {"rc": proc.returncode, "stopped_over_limit": stopped,
            "peak_rss_gib": round(int(rss_kb) / 2**20, 2) if rss_kb else round(seen / 2**30, 2),
            "peak_anon_gib_sampled": round(seen_anon / 2**30, 2),
            "wall_s": round(wall, 1), "cpu_s": round(float(user) + float(sys_), 1) if user and sys_ else None,
            "log": str(log)}


def stages(model: Path, work: Path, *, iterations: int, samples: int, seqlen: int, threads: int,
           limit_gb: float, only: list[str] | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1", PYTHONPATH=os.getcwd())
    out = {}
    for name, cmd in stage_commands(model, work, iterations, samples, seqlen).items():
        if only and name not in only:
            continue
        r = run_stage(cmd, env, int(limit_gb * 2**30), work / f"{name.replace(' ', '_')}.log")
        out[name] = r
        print(f"{name}: {r}", flush=True)
        if r["rc"] != 0:
            break
    return out


def solve_times(bs: list[int], iterations: int, d_out: int = 4096, d_in: int = 14336) -> dict:
    """Seconds per ARMOR iteration on one d_out x d_in layer (random weight, random positive h), per block size.
    The time of a run with ``iterations`` minus that of a run with 0 iterations, over ``iterations``."""
    import torch

    from solver.config import PRESETS, SolverConfig
    from solver.methods import Problem, solve
    from solver.stats import LayerStats

    g = torch.Generator().manual_seed(0)
    W = torch.randn(d_out, d_in, generator=g) * 0.02
    h = torch.rand(d_in, generator=g) + 0.1
    p = Problem("layer", W, LayerStats(h=h, n_tokens=1))
    out = {}
    for b in bs:
        row = {}
        for its in (0, iterations):
            cfg = SolverConfig(**{**PRESETS["cpu"], "block_size": b, "iterations": its, "method": "armor"})
            t0, c0 = time.perf_counter(), time.process_time()
            solve("armor", [p], cfg)
            row[its] = (time.perf_counter() - t0, time.process_time() - c0)
        per_wall = (row[iterations][0] - row[0][0]) / iterations
        per_cpu = (row[iterations][1] - row[0][1]) / iterations
        out[b] = {"setup_wall_s": round(row[0][0], 2), "setup_cpu_s": round(row[0][1], 2),
                  "wall_s_per_iteration": round(per_wall, 3),
                  "cpu_s_per_iteration": round(per_cpu, 3), "iterations": iterations}
        print(f"b={b}: {out[b]}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("stages")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--iterations", type=int, default=5)
    s.add_argument("--samples", type=int, default=8)
    s.add_argument("--seqlen", type=int, default=128)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--limit-gb", type=float, default=14.0)
    s.add_argument("--only", nargs="+", default=None)
    s.add_argument("--json", type=Path, default=None)
    v = sub.add_parser("solve")
    v.add_argument("--b", type=int, nargs="+", default=[32, 128])
    v.add_argument("--iterations", type=int, default=3)
    v.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.cmd == "build":
        print(build(a.layers, a.out))
        return 0
    if a.cmd == "stages":
        res = stages(a.model, a.work, iterations=a.iterations, samples=a.samples, seqlen=a.seqlen,
                     threads=a.threads, limit_gb=a.limit_gb, only=a.only)
    else:
        res = solve_times(a.b, a.iterations)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if all(r.get("rc", 0) == 0 for r in res.values() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
