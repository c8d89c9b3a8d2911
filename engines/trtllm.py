"""The 'trtllm' engine: an ARMOR HF-style checkpoint for TensorRT-LLM's PyTorch backend.

``lower`` writes the checkpoint (``engines.hf_checkpoint``); ``verify`` checks it without
TensorRT-LLM: config/tensor schema, 2:4 and +0.0 zeros of every S in the written bytes, load-back
into the plain PyTorch runtime (logits identical to the artifact's runtime at the same dtype), and
precision loss against the artifact's fp32 runtime. When CUDA is visible it also runs the GPU check
(S as semi-structured sparse tensors); when ``tensorrt_llm`` is importable it registers the ARMOR
classes (``engines.trtllm_model``). Serving itself (``LLM(model=dir)`` / ``trtllm-serve``) needs a GPU.

Targets TensorRT-LLM >= 1.0 with the PyTorch backend (the default since 1.0, the only backend after
1.3.0rc20); the legacy TensorRT-engine checkpoint format is not written.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from engines import hf_checkpoint as hfc
from engines.parity import Check, error_stats, write_report

# (SQNR dB lower bound, top-1 agreement lower bound) of the checkpoint's logits vs the artifact's fp32 runtime
TOLERANCES = {torch.float32: (100.0, 1.0), torch.float16: (35.0, 0.95), torch.bfloat16: (20.0, 0.85)}
PARITY_WINDOWS, PARITY_SEQLEN = 2, 128


def parity_tokens(ckpt_dir: Path, eval_cfg=None, *, vocab_size: int | None = None) -> torch.Tensor:
    """Token windows for parity: at most 2 x 128 tokens of the evaluation text, or fixed random ids
    (seed 0) when no evaluation config is given."""
    if eval_cfg is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size or 100, (PARITY_WINDOWS, 32), generator=g)
    from transformers import AutoTokenizer

    from armor_export.config import EvalConfig
    from armor_export.pipeline import eval_windows

    tok = AutoTokenizer.from_pretrained(ckpt_dir, local_files_only=True)
    cfg = EvalConfig(text=eval_cfg.text, windows=min(eval_cfg.windows, PARITY_WINDOWS),
                     seqlen=min(eval_cfg.seqlen, PARITY_SEQLEN))
    return torch.as_tensor(eval_windows(tok, cfg).token_ids)[:, : cfg.seqlen]


@torch.no_grad()
def model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = [model(input_ids=t[None].to(dev)).logits.float().cpu() for t in tokens]
    return torch.cat(out)


def checkpoint_logits(ckpt_dir: Path, tokens: torch.Tensor, *, device: str = "cpu", dtype=None,
                      semi_structured: bool = False) -> tuple[torch.Tensor, int]:
    """Logits (fp32, on CPU) of the checkpoint in the plain PyTorch runtime on ``device``; the
    second value counts S tensors that run as semi-structured sparse (0 on CPU)."""
    model, _, n_sparse = hfc.load_checkpoint_model(ckpt_dir, dtype=dtype, device=device,
                                                   semi_structured=semi_structured)
    logits = model_logits(model, tokens)
    del model
    return logits, n_sparse


def artifact_logits(artifact_dir: Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from engines.torch_module import load_armor_model

    model, _ = load_armor_model(artifact_dir, dtype=dtype)
    logits = model_logits(model, tokens)
    del model
    return logits


def compare(ref: torch.Tensor, test: torch.Tensor) -> dict:
    st = error_stats(ref, test)
    st["top1_agreement"] = (ref.argmax(-1) == test.argmax(-1)).double().mean().item()
    return st


def trtllm_status(ckpt_dir: Path) -> tuple[str, dict]:
    """'not installed: skipped' without tensorrt_llm; else the registration result."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "not installed: skipped", {}
    from engines import trtllm_model

    try:
        names = trtllm_model.register_armor_models()
    except Exception as e:  # noqa: BLE001 - report any failure of the installed library
        return f"installed, registration FAILED: {type(e).__name__}: {e}", {}
    return "installed: ARMOR classes registered (serving parity: python -m engines.trtllm_gpu_check)", \
        {"registered": names}


class TrtllmLowering:
    name = "trtllm"

    # cfg: engines.base.ExportConfig, as the CLI calls every engine (the keyword forms remain for this module's
    # tests until the trtllm branch converts the engine fully)
    def requires(self, artifact_dir: Path, cfg=None) -> None:
        from armor_export.adapters import family_for

        cfg = json.loads((Path(artifact_dir) / "config.json").read_text())
        family_for(cfg.get("model_type"), str(Path(artifact_dir) / "config.json"))

    def lower(self, artifact_dir: Path, out_dir: Path, cfg=None, *, dtype: str | None = None,
              overwrite: bool = False) -> Path:
        if cfg is not None:
            dtype, overwrite = cfg.dtype, cfg.overwrite
        self.requires(artifact_dir)
        return hfc.write_checkpoint(artifact_dir, out_dir, dtype=dtype, overwrite=overwrite)

    def verify(self, artifact_dir: Path, engine_dir: Path, cfg=None, *, report_dir: Path | None = None,
               eval_cfg=None, gpu: bool | None = None) -> dict:
        from armor_export.artifact import load_artifact

        caller_tokens = None
        if cfg is not None:
            report_dir = cfg.report_dir
            if cfg.parity_tokens:
                caller_tokens = torch.as_tensor([list(t)[:PARITY_SEQLEN] for t in cfg.parity_tokens[:PARITY_WINDOWS]])

        t0 = time.perf_counter()
        engine_dir = Path(engine_dir)
        art = load_artifact(artifact_dir)
        checks: list[Check] = []
        problems = hfc.schema_problems(engine_dir, art)
        checks.append(Check("checkpoint schema (config keys, tensor names, shapes, dtypes)", len(problems),
                            "0 problems", not problems, {"problems": problems[:50]}))
        cfg = hfc.read_config(engine_dir)
        s_names = [f"{n}.S" for n in cfg["armor"]["layers"]]
        sb = hfc.s_bytes_report(engine_dir / hfc.WEIGHTS, s_names)
        not24 = [n for n, r in sb.items() if not r["is_24"]]
        negz = sum(r["negative_zeros"] or 0 for r in sb.values())
        checks.append(Check("every S is 2:4 along d_in in the written bytes", f"{len(s_names) - len(not24)}/"
                            f"{len(s_names)}", "all", not not24, {"not_24": not24[:20]}))
        checks.append(Check("S zeros are +0.0 in the written bytes (count of -0.0)", float(negz), "== 0", negz == 0))

        stored = hfc.resolve_dtype({"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[cfg["torch_dtype"]])
        tokens = caller_tokens if caller_tokens is not None else \
            parity_tokens(engine_dir, eval_cfg, vocab_size=cfg.get("vocab_size"))
        test, _ = checkpoint_logits(engine_dir, tokens)
        same = compare(artifact_logits(artifact_dir, tokens, stored), test)
        checks.append(Check(f"load-back: logits vs artifact runtime, both {cfg['torch_dtype']} (max abs)",
                            same["max_abs"], "== 0 (identical)", same["max_abs"] == 0.0, same))
        ref32 = artifact_logits(artifact_dir, tokens, torch.float32)
        prec = compare(ref32, test)
        sq_tol, top1_tol = TOLERANCES[stored]
        checks.append(Check(f"{cfg['torch_dtype']} checkpoint vs artifact fp32 runtime: logits SQNR dB",
                            prec["sqnr_db"], f">= {sq_tol}", prec["sqnr_db"] >= sq_tol, prec))
        checks.append(Check("top-1 agreement vs fp32", prec["top1_agreement"], f">= {top1_tol}",
                            prec["top1_agreement"] >= top1_tol))

        status, reg = trtllm_status(engine_dir)
        checks.append(Check("TensorRT-LLM", status, "informational", "FAILED" not in status, reg))
        gpu = torch.cuda.is_available() if gpu is None else gpu
        gpu_res = None
        if gpu:
            from engines.trtllm_gpu_check import gpu_parity

            gpu_res = gpu_parity(engine_dir, tokens, reference=ref32)
            checks.extend(gpu_res["checks"])
        else:
            checks.append(Check("GPU: S semi-structured on CUDA, logits parity", "no CUDA device: skipped",
                                "run python -m engines.trtllm_gpu_check <ckpt> on a GPU", True))
        meta = {"engine": "trtllm", "checkpoint": str(engine_dir), "artifact": str(artifact_dir),
                "dtype": cfg["torch_dtype"], "tokens": list(tokens.shape), "fusion": cfg["armor"]["fusion"],
                "s_storage": cfg["armor"]["s_storage"], "layers": len(s_names), "torch": torch.__version__,
                "trtllm_targets": "TensorRT-LLM >= 1.0, PyTorch backend", "seconds": round(time.perf_counter() - t0, 2)}
        res = write_report(report_dir or engine_dir, "ARMOR TensorRT-LLM checkpoint parity", checks, meta)
        res["checks"] = {c.name: c.value for c in checks}
        return res
