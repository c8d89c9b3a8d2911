"""NVIDIA ModelOpt 2:4 cross-check on exactly our token windows (runs in .venv-modelopt, not in our venv).

    .venv-modelopt/bin/python benchmarks/modelopt_crosscheck.py --model HF_FOLDER --windows WINDOWS.safetensors \
        --out modelopt.json [--work DIR] [--methods dense,magnitude,sparsegpt]

``benchmarks/quality.py --modelopt`` writes WINDOWS (tensors ``calibration`` and ``evaluation``, [n, seqlen] int64)
and calls this script; create the venv with ``bash benchmarks/modelopt_env.sh``. This file imports only torch,
transformers, safetensors and modelopt (armor-export is not installed in that venv).

Per method, on a fresh fp32 copy of the model: ``mts.sparsify(model, "sparse_magnitude")`` or
``mts.sparsify(model, "sparsegpt", config={"data_loader", "collect_func", "device": "cpu"})`` with the calibration
windows (batches of --batch-size, one dense pass, ModelOpt's defaults: hessian_damp 0.1, col_block_size 128),
then token perplexity on the evaluation windows computed exactly as armor-export does (each window alone, mean
cross-entropy over seqlen - 1 shifted targets, ppl = exp(mean of the window means), fp32, batch 1), the 2:4 check
of every sparsified linear and, for magnitude, the fraction of 4-groups whose ModelOpt mask differs from the
"top-2 |w|, ties to the leftmost column" rule armor-export uses.

Note: ModelOpt's ``sparsegpt`` mode keeps only the *mask* its SparseGPT sweep finds (``module.set_mask``); the
compensating weight updates are discarded (the mode is meant to be followed by sparse fine-tuning). armor-export's
SparseGPT keeps the updated weights.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load_model(folder: Path, work: Path):
    """Load the HF folder; if this transformers (< 5.15) rejects a config written by transformers 5.23,
    load a copy whose config.json has rope_theta (and torch_dtype) at the top level."""
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=torch.float32, local_files_only=True)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kw).eval(), str(folder), None
    except Exception as e:  # noqa: BLE001 - any loader error: try the fixed-up copy once
        first_error = f"{type(e).__name__}: {e}"
    fixed = work / "model"
    fixed.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and f.name != "config.json" and not (fixed / f.name).exists():
            (fixed / f.name).symlink_to(f.resolve())
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    (fixed / "config.json").write_text(json.dumps(cfg, indent=2))
    return AutoModelForCausalLM.from_pretrained(fixed, **kw).eval(), str(fixed), first_error


def perplexity(model, windows: torch.Tensor) -> float:
    nll = []
    with torch.inference_mode():
        for i in range(windows.shape[0]):
            ids = windows[i:i + 1]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            ce = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean")
            nll.append(float(ce))
    m = sum(nll) / len(nll)
    return math.exp(m) if math.isfinite(m) else math.inf


def sparse_linears(model):
    from modelopt.torch.sparsity.weight_sparsity.module import SparseModule

    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseModule) and m._weight_mask is not None]


def check_24(model) -> dict:
    groups = ok = 0
    names = []
    for name, mod in sparse_linears(model):
        w = mod.weight.detach()
        nz = (w.reshape(-1, 4) != 0).sum(1)
        groups += nz.numel()
        ok += int((nz <= 2).sum())
        names.append(name)
    return {"sparsified_modules": len(names), "groups": groups, "fraction_24": ok / groups if groups else None,
            "all_24": groups > 0 and ok == groups, "lm_head_sparsified": any("lm_head" in n for n in names)}


def leftmost_mask_disagreement(model) -> dict:
    """Fraction of 4-groups where ModelOpt's magnitude mask differs from top-2 |w| with ties to the left, and
    the fraction of those where both masks keep the same |w| sum (an exact tie, both optimal)."""
    diff = ties = total = 0
    for _, mod in sparse_linears(model):
        w = mod._parameters["weight"].detach()  # the unmasked weight
        g = w.abs().reshape(-1, 4)
        keep = torch.sort(g, dim=1, descending=True, stable=True).indices[:, :2]
        ours = torch.zeros_like(g, dtype=torch.bool).scatter_(1, keep, True)
        theirs = mod._weight_mask.reshape(-1, 4)
        differs = (ours != theirs).any(1)
        same_sum = (g * ours).sum(1) == (g * theirs).sum(1)
        diff += int(differs.sum())
        ties += int((differs & same_sum).sum())
        total += g.shape[0]
    return {"leftmost_tie_mask_disagreement": diff / total if total else None,
            "disagreements_that_are_exact_ties": ties / diff if diff else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--windows", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None, help="scratch folder (fixed-up config copy)")
    p.add_argument("--methods", default="dense,magnitude,sparsegpt")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch (windows per forward)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexities (mask checks only)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import modelopt
    import modelopt.torch.sparsity as mts
    import transformers
    from safetensors.torch import load_file

    win = load_file(a.windows)
    calib, ev = win["calibration"].long(), win["evaluation"].long()
    work = Path(a.work or Path(a.out).parent / "modelopt_model")
    folder = Path(a.model)
    res = {"modelopt_version": modelopt.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": sys.version.split()[0],
           "torch_threads": torch.get_num_threads(),
           "calibration_windows": list(calib.shape), "evaluation_windows": list(ev.shape),
           "metric": "token perplexity, exp(mean of window means), fp32, bs 1"}
    for method in a.methods.split(","):
        model, used, err = load_model(folder, work)
        res["model_folder"], res["config_fixup"] = used, err
        t0 = time.perf_counter()
        r: dict = {}
        if method == "magnitude":
            mts.sparsify(model, "sparse_magnitude")
            r.update(leftmost_mask_disagreement(model))
        elif method == "sparsegpt":
            loader = [calib[i:i + a.batch_size] for i in range(0, calib.shape[0], a.batch_size)]
            mts.sparsify(model, "sparsegpt", config={"data_loader": loader, "device": "cpu",
                                                     "collect_func": lambda b: (b, {"use_cache": False})})
            r.update(hessian_damp=0.1, col_block_size=128, calib_batches=len(loader), weights_updated=False)
        elif method != "dense":
            raise SystemExit(f"unknown method {method!r}")
        r["prune_seconds"] = round(time.perf_counter() - t0, 2)
        if method != "dense":
            r.update(check_24(model))
        t0 = time.perf_counter()
        if not a.no_eval:
            r["perplexity"] = perplexity(model, ev)
            r["eval_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[modelopt] {method}: {r}", file=sys.stderr, flush=True)
        res[method] = r
        del model
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
