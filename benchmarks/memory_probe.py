"""Peak resident memory of ``armor-export prune`` with the full-model load vs layer-by-layer loading.

Each configuration runs as its own child process; its peak RSS is read from ``os.wait4`` (the
kernel's ru_maxrss of that child only). A third child that only imports the pipeline gives the
fixed cost of Python + torch + transformers. The solve uses NoWag-P (seconds), so the numbers are
those of loading and calibration, the phase whose memory depends on the loading mode.

    python -m benchmarks.memory_probe [--model PATH] [--samples 16] [--seqlen 256] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORT_ONLY = "import torch, transformers, armor_export.pipeline"
# Calibration alone (load + windows + statistics of every target), the phase layer-by-layer bounds.
CALIB_ONLY = """
import sys
from armor_export.adapters import target_names
from armor_export.config import CalibConfig
from armor_export import calibrate, source
layerwise, model, n, t = sys.argv[1] == "1", sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4])
loaded = source.load(model, layerwise=layerwise)
fam = loaded.family
names = target_names(fam, len(loaded.model.get_submodule(fam.layers_path)))
tokens = calibrate.calibration_windows(loaded.tokenizer, CalibConfig(samples=n, seqlen=t))
calibrate.collect_stats(loaded, names, tokens, full=False, progress=False)
"""
MODES = {"import_only": None, "calib_full_model": "0", "calib_layer_by_layer": "1",
         "full_model": [], "layer_by_layer": ["--layer-by-layer"]}


def child(cmd: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{err[-3000:]}")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--method", default="nowag")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    env = dict(os.environ, TQDM_DISABLE="1")
    work = Path(tempfile.mkdtemp(prefix="armor-mem-"))
    results = {"settings": {"model": a.model or "default (SmolLM2-135M-Instruct)", "samples": a.samples,
                            "seqlen": a.seqlen, "method": a.method, "torch_threads": os.environ.get("OMP_NUM_THREADS")}}
    try:
        for mode in a.modes:
            extra = MODES[mode]
            if extra is None or isinstance(extra, str):
                cmd = [sys.executable, "-c", IMPORT_ONLY] if extra is None else \
                    [sys.executable, "-c", CALIB_ONLY, extra, a.model or "", str(a.samples), str(a.seqlen)]
                results[mode] = child(cmd, env)
                print(f"{mode:20s} {results[mode]}", flush=True)
                continue
            cmd = [sys.executable, "-m", "armor_export", "prune", "--method", a.method, "--calib-samples",
                   str(a.samples), "--calib-seqlen", str(a.seqlen), "--out", str(work / mode), "--no-resume", *extra]
            if a.model:
                cmd += ["--model", a.model]
            results[mode] = child(cmd, env)
            print(f"{mode:20s} {results[mode]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if a.out:
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
