"""GPU check of an ARMOR checkpoint, one command on a machine with an NVIDIA GPU:

    python -m engines.trtllm_gpu_check <checkpoint_dir> [--dtype fp16] [--tokens 2x128] [--trtllm]

1. loads the checkpoint on CUDA in the plain PyTorch runtime with every S converted by
   ``torch.sparse.to_sparse_semi_structured`` (counts how many converted; needs sm80+ and fp16/bf16),
2. compares its logits with the CPU fp32 reference (same checkpoint, dense S, upcast to fp32):
   tolerances from ``engines.parity.TOLERANCES`` (fp16: SQNR >= 30 dB, top-1 >= 0.95; bf16: 20 dB, 0.85),
3. with ``--trtllm`` also imports ``engines.trtllm_model`` (registering the ARMOR classes) and greedy-decodes a prompt with
   ``tensorrt_llm.LLM(model=dir)``, comparing the tokens with the PyTorch runtime's greedy tokens.
Exit status 0 = all passed, 1 = a check failed, 2 = cannot run here (no CUDA). Uses the same
functions as the CPU path (``engines.hf_checkpoint.checkpoint_logits`` with ``device="cuda"``); imports
nothing from ``engines.trtllm`` (which imports this module).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from engines import hf_checkpoint as hfc
from engines.parity import DTYPES, TOLERANCES, Check, compare, default_tokens


def gpu_parity(ckpt_dir: Path, tokens: torch.Tensor, *, reference: torch.Tensor | None = None,
               dtype=None, device: str = "cuda") -> dict:
    """Checks of the checkpoint on ``device`` with semi-structured S against an fp32 reference
    (computed on CPU from the same checkpoint when not given)."""
    if reference is None:
        reference, _ = hfc.checkpoint_logits(ckpt_dir, tokens, device="cpu", dtype=torch.float32)
    logits, n_sparse = hfc.checkpoint_logits(ckpt_dir, tokens, device=device, dtype=dtype, semi_structured=True)
    cfg = hfc.read_config(ckpt_dir)
    dt = hfc.resolve_dtype(dtype) if dtype is not None else \
        {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg["torch_dtype"]]
    n_layers = len(cfg["armor"]["layers"])
    st = compare(reference, logits)
    tol = TOLERANCES[next(k for k, v in DTYPES.items() if v == dt)]
    sq_tol, top1_tol = tol["logits_sqnr_db"], tol["top1"]
    name = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else device
    checks = [
        Check(f"GPU ({name}): S as semi-structured sparse", f"{n_sparse}/{n_layers}",
              "informational (0 on fp32 or GPUs without 2:4 support)", True),
        Check(f"GPU {str(dt).removeprefix('torch.')} logits vs CPU fp32: SQNR dB", st["sqnr_db"], f">= {sq_tol}",
              st["sqnr_db"] >= sq_tol, st),
        Check("GPU top-1 agreement vs CPU fp32", st["top1_agreement"], f">= {top1_tol}",
              st["top1_agreement"] >= top1_tol),
    ]
    return {"checks": checks, "semi_structured": n_sparse, "layers": n_layers, "stats": st}


def trtllm_greedy_check(ckpt_dir: Path, prompt: str, max_tokens: int = 16) -> Check:
    """Greedy tokens of TensorRT-LLM (PyTorch backend, ARMOR classes) vs our PyTorch runtime on CUDA."""
    from transformers import AutoTokenizer

    import engines.trtllm_model  # noqa: F401  (importing it registers the ARMOR classes)
    from tensorrt_llm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(ckpt_dir, local_files_only=True)
    llm = LLM(model=str(ckpt_dir))
    out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    got = list(out[0].outputs[0].token_ids)
    model, _, _ = hfc.load_checkpoint_model(ckpt_dir, device="cuda", semi_structured=True)
    ids = tok(prompt, return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    n = min(len(ref), len(got))
    agree = sum(a == b for a, b in zip(ref[:n], got[:n])) / max(n, 1)
    return Check("TensorRT-LLM greedy tokens vs PyTorch runtime (CUDA)", agree, ">= 0.75 (fp16 ties may differ)",
                 agree >= 0.75, {"trtllm": got, "torch": ref, "prompt": prompt})


def parse_tokens(spec: str) -> tuple[int, int]:
    n, _, t = spec.lower().partition("x")
    return int(n), int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.trtllm_gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: the stored dtype")
    p.add_argument("--tokens", default="2x128", help="random token windows NxT (seed 0)")
    p.add_argument("--trtllm", action="store_true", help="also run TensorRT-LLM's LLM(...) greedy decode")
    p.add_argument("--prompt", default="The king said to his daughter")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("trtllm_gpu_check: no CUDA device is visible; run this on a machine with an NVIDIA GPU "
              "(sm80+ for 2:4 semi-structured kernels) and a CUDA build of torch.", file=sys.stderr)
        return 2
    cfg = hfc.read_config(a.checkpoint)
    n, t = parse_tokens(a.tokens)
    tokens = default_tokens(cfg["vocab_size"], t, n)
    res = gpu_parity(a.checkpoint, tokens, dtype=a.dtype)
    checks = res["checks"]
    if a.trtllm:
        checks.append(trtllm_greedy_check(a.checkpoint, a.prompt))
    for c in checks:
        print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.value} ({c.tolerance})")
    print(json.dumps({"passed": all(c.passed for c in checks), "stats": res["stats"]}, default=str))
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
