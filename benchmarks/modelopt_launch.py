"""Launch the ModelOpt cross-check (benchmarks/modelopt_crosscheck.py) in its own venv from the quality benchmark.

The quality benchmark's calibration and evaluation token windows go to a safetensors file; the other venv's
Python runs the cross-check on them and writes a JSON, whose perplexities are compared with ours here.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_modelopt(bench, out_dir: Path, ours: dict) -> dict:
    """Run the cross-check for ``bench`` (a benchmarks.quality.Bench); {"error": ...} when it cannot run."""
    from safetensors.torch import save_file

    py = Path(bench.args.modelopt_python)
    if not py.is_file():
        return {"error": f"{py} not found: create it with `bash benchmarks/modelopt_env.sh`"}
    wfile = out_dir / "quality_windows.safetensors"
    save_file({"calibration": bench.calib.token_ids.contiguous(), "evaluation": bench.ev.token_ids.contiguous()},
              str(wfile), metadata={"calib_sha256": bench.calib.sha256, "eval_sha256": bench.ev.sha256})
    res_file = out_dir / "modelopt_crosscheck.json"
    cmd = [str(py), str(ROOT / "benchmarks" / "modelopt_crosscheck.py"), "--model", str(bench.loaded.folder),
           "--windows", str(wfile), "--out", str(res_file), "--work", str(out_dir / "modelopt_model"),
           "--threads", str(bench.args.modelopt_threads)]
    bench.log("ModelOpt cross-check: " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=str(ROOT), timeout=bench.args.modelopt_timeout,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    if proc.returncode != 0 or not res_file.is_file():
        return {"error": f"cross-check exited with {proc.returncode}", "command": cmd}
    mo = json.loads(res_file.read_text())
    mo.update(command=cmd, comparison={})
    for key, ours_r in ours.items():
        theirs = (mo.get(key) or {}).get("perplexity")
        if ours_r is not None and theirs is not None:
            mo["comparison"][key] = {"ours": ours_r, "modelopt": theirs, "rel_diff": (ours_r - theirs) / theirs}
    return mo
