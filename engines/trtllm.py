"""The 'trtllm' engine: an ARMOR HF-style checkpoint for TensorRT-LLM's PyTorch backend.

Implements the engine contract of ``engines.base`` (``requires`` / ``lower`` / ``verify`` with one
``ExportConfig``). ``lower`` writes the checkpoint (``engines.hf_checkpoint``); ``verify`` checks it without
TensorRT-LLM: config/tensor schema, 2:4 and +0.0 zeros of every S in the written bytes, load-back into the
plain PyTorch runtime (logits identical to the artifact's runtime at the same dtype) and precision loss
against the artifact's fp32 runtime, on the caller's ``cfg.parity_tokens`` or seeded random ids. When CUDA is
visible it adds the GPU check (``engines.trtllm_gpu_check``: S as semi-structured sparse tensors); when
``tensorrt_llm`` is importable it imports ``engines.trtllm_model`` (which registers the ARMOR classes).
Serving itself (``LLM(model=dir)`` / ``trtllm-serve``) needs a GPU.

Targets TensorRT-LLM >= 1.0 with the PyTorch backend; the legacy TensorRT-engine checkpoint format is not written.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from armor_export.adapters import UnsupportedFeature, family_for, model_facts
from engines import hf_checkpoint as hfc
from engines import hf_checkpoint_checks as hfck
from engines.base import ExportConfig
from engines.parity import TOLERANCES, Check, compare, model_logits, parity_tokens, write_report

# verify runs the checkpoint on CPU in its stored dtype: at most this many caller windows, of at most this many
# tokens (fp16/bf16 matmuls on CPU are slow); seeded random ids otherwise (parity.parity_tokens)
PARITY_WINDOWS, PARITY_MAX_TOKENS = 2, 128
# families with an ARMOR class in engines.trtllm_model; the others, and why TensorRT-LLM cannot take them
TRTLLM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
REFUSED = {
    "phi3": "its own loader: the model's qkv_proj / gate_up_proj are pruned as one A.S.B each, but TensorRT-LLM's "
            "Phi3ForCausalLM.load_weights reads their dense fused weight and splits it by rows, which an ARMOR "
            "checkpoint does not have",
    "gemma2": "a Gemma 2 decoder (no Gemma2ForCausalLM in the TensorRT-LLM PyTorch-backend model index read)",
}


def artifact_logits(artifact_dir: Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from engines.torch_module import load_armor_model

    model, _ = load_armor_model(artifact_dir, dtype=dtype)
    logits = model_logits(model, tokens)
    del model
    return logits


def parity_token_ids(cfg: ExportConfig, config) -> torch.Tensor:
    """The caller's token windows (at most PARITY_WINDOWS x PARITY_MAX_TOKENS), or seeded random ids from the
    vocabulary, longer than every sliding window."""
    given = tuple(tuple(w[:PARITY_MAX_TOKENS]) for w in (cfg.parity_tokens or ())[:PARITY_WINDOWS])
    return parity_tokens(given, model_facts(config), cfg.parity_seqlen)


def trtllm_status(architecture: str) -> tuple[str, dict]:
    """'not installed: skipped' without tensorrt_llm; else whether importing engines.trtllm_model registered it."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "not installed: skipped", {}
    try:
        from engines.trtllm_model import registered

        names = sorted(registered())
    except Exception as e:  # noqa: BLE001 - report any failure of the installed library
        return f"installed, registration FAILED: {type(e).__name__}: {e}", {}
    if architecture not in names:
        return f"installed, registration FAILED: {architecture} not among {names}", {"registered": names}
    return "installed: ARMOR classes registered (serving parity: python -m engines.trtllm_gpu_check --trtllm)", \
        {"registered": names}


class TrtllmLowering:
    name = "trtllm"

    def requires(self, artifact_dir: Path, cfg: ExportConfig) -> None:
        path = Path(artifact_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; pass an artifact folder written by `armor-export prune`")
        fam = family_for(json.loads(path.read_text()).get("model_type"), str(path))
        if fam.name not in TRTLLM_FAMILIES:
            raise UnsupportedFeature(f"{path}: family {fam.name!r} needs {REFUSED.get(fam.name, 'its own model class')}, "
                                     "which the 'trtllm' engine cannot express; use the 'torch' or 'onnx' engine")
        hfc.resolve_dtype(cfg.dtype)

    def lower(self, artifact_dir: Path, out_dir: Path, cfg: ExportConfig) -> Path:
        self.requires(artifact_dir, cfg)
        return hfc.write_checkpoint(artifact_dir, out_dir, dtype=cfg.dtype, overwrite=cfg.overwrite)

    def verify(self, artifact_dir: Path, engine_dir: Path, cfg: ExportConfig) -> dict:
        from transformers import AutoConfig

        from armor_export.artifact import load_artifact

        t0 = time.perf_counter()
        engine_dir = Path(engine_dir)
        art = load_artifact(artifact_dir)
        checks: list[Check] = []
        problems = hfck.schema_problems(engine_dir, art)
        checks.append(Check("checkpoint schema (config keys, tensor names, shapes, dtypes)", len(problems),
                            "0 problems", not problems, {"problems": problems[:50]}))
        ck = hfc.read_config(engine_dir)
        s_names = [f"{n}.S" for n in ck["armor"]["layers"]]
        sb = hfck.checkpoint_s_report(engine_dir, s_names)
        not24 = [n for n, r in sb.items() if not r["is_24"]]
        negz = sum(r["negative_zeros"] or 0 for r in sb.values())
        checks.append(Check("every S is 2:4 along d_in in the written bytes", f"{len(s_names) - len(not24)}/"
                            f"{len(s_names)}", "all", not not24, {"not_24": not24[:20]}))
        checks.append(Check("S zeros are +0.0 in the written bytes (count of -0.0)", float(negz), "== 0", negz == 0))

        dname = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[ck["torch_dtype"]]
        stored = hfc.resolve_dtype(dname)
        tokens = parity_token_ids(cfg, AutoConfig.from_pretrained(engine_dir))
        test, _ = hfc.checkpoint_logits(engine_dir, tokens)
        same = compare(artifact_logits(artifact_dir, tokens, stored), test)
        checks.append(Check(f"load-back: logits vs artifact runtime, both {ck['torch_dtype']} (max abs)",
                            same["max_abs"], "== 0 (identical)", same["max_abs"] == 0.0, same))
        ref32 = artifact_logits(artifact_dir, tokens, torch.float32)
        prec = compare(ref32, test)
        sq_tol, top1_tol = TOLERANCES[dname]["logits_sqnr_db"], TOLERANCES[dname]["top1"]
        checks.append(Check(f"{ck['torch_dtype']} checkpoint vs artifact fp32 runtime: logits SQNR dB",
                            prec["sqnr_db"], f">= {sq_tol}", prec["sqnr_db"] >= sq_tol, prec))
        checks.append(Check("top-1 agreement vs fp32", prec["top1_agreement"], f">= {top1_tol}",
                            prec["top1_agreement"] >= top1_tol))

        status, reg = trtllm_status(ck["architectures"][0])
        checks.append(Check("TensorRT-LLM", status, "informational", "FAILED" not in status, reg))
        if torch.cuda.is_available():
            from engines.trtllm_gpu_check import gpu_parity

            checks.extend(gpu_parity(engine_dir, tokens, reference=ref32)["checks"])
        else:
            checks.append(Check("GPU: S semi-structured on CUDA, logits parity", "no CUDA device: skipped",
                                "run python -m engines.trtllm_gpu_check <ckpt> on a GPU", True))
        meta = {"engine": "trtllm", "checkpoint": str(engine_dir), "artifact": str(artifact_dir),
                "dtype": ck["torch_dtype"], "tokens": list(tokens.shape),
                "tokens_source": "caller" if cfg.parity_tokens else "seeded random ids (seed 0)",
                "fusion": ck["armor"]["fusion"], "fused_groups": len(ck["armor"].get("groups", {})),
                "s_storage": ck["armor"]["s_storage"], "layers": len(s_names),
                "torch": torch.__version__, "trtllm_targets": "TensorRT-LLM >= 1.0, PyTorch backend",
                "seconds": round(time.perf_counter() - t0, 2)}
        res = write_report(cfg.report_dir or engine_dir, "ARMOR TensorRT-LLM checkpoint parity", checks, meta)
        res["checks"] = {c.name: c.value for c in checks}
        return res
