"""End-to-end throughput: prefill and greedy decode tokens/s, dense vs ARMOR of the same model.

Run:  python -m benchmarks.bench_e2e --artifact DIR [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                                    [--prefill 1x512,8x512] [--decode-tokens 32] [--engines torch,ort]

The ARMOR model is ``engines.torch_module.load_armor_model(artifact)`` (on CUDA with fp16/bf16 its
S tensors become semi-structured unless --no-semi-structured). The dense model is the same model
with every ArmorLinear replaced by ``nn.Linear`` holding A.S.B, so both compute the same function
and differ only in how the linears run. Prefill: one forward over a [batch, seq] prompt (last-token
logits only), tokens/s = batch*seq / median time. Decode: a manual greedy loop with
``past_key_values`` after a short prompt; TPOT = median per-step time, tokens/s = batch / TPOT.
ONNX Runtime (CPU provider) is an optional engine: it needs ``engines.onnx_export`` and
onnxruntime, exports the KV-cache graph of both models once into --ort-cache, and is recorded as
skipped with the reason when unavailable. On CPU expect overhead (no 2:4 kernel); on GPU, speedup.
Prints a table, writes JSON (``--out``) and a PNG, ends with a JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time as _t
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks import timing
from engines.torch_module import ArmorLinear, load_armor_model, set_submodule

SCHEMA = "armor-export/bench-e2e"
SCHEMA_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class E2EConfig:
    artifact: str
    device: str = "cpu"
    dtype: str = "fp32"
    prefill: tuple[tuple[int, int], ...] = ((1, 512), (8, 512))
    decode_batch: int = 1
    decode_prompt: int = 32
    decode_tokens: int = 32
    engines: tuple[str, ...] = ("torch", "ort")
    ort_prefill: tuple[tuple[int, int], ...] = ((1, 512),)  # full-vocab logits: keep batches small
    semi_structured: bool = True
    warmup: int = 1
    iters: int = 3
    seed: int = 0
    ort_cache: str | None = None
    synth_block_size: int | None = None  # give identity-A/B layers explicit identity blocks of this size

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {list(DTYPES)}")
        if set(self.engines) - {"torch", "ort"}:
            raise ValueError("engines: torch, ort")


def densify(model: nn.Module) -> nn.Module:
    """Replace every ArmorLinear by an nn.Linear with the dense weight A.S.B (in place)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, ArmorLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=m.S.device, dtype=m.S.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_submodule(model, name, lin)
    return model


def synthesise_blocks(model: nn.Module, b: int) -> int:
    """Give every ArmorLinear without A/B explicit identity blocks of size b (same function, the
    compute of a b-block ARMOR layout: for timing an artifact of a wrapper-free method). Returns
    the number of layers changed."""
    from solver.blockdiag import check_block_size, identity_blocks

    n = 0
    for name, m in model.named_modules():
        if isinstance(m, ArmorLinear) and m.A_blocks is None and m.B_blocks is None:
            check_block_size(m.out_features, m.in_features, b, name)
            kw = {"dtype": m.S.dtype, "device": m.S.device}
            m.A_blocks = identity_blocks(m.out_features // b, b, **kw)
            m.B_blocks = identity_blocks(m.in_features // b, b, **kw)
            n += 1
    return n


def torch_models(cfg: E2EConfig) -> dict[str, nn.Module]:
    dtype = DTYPES[cfg.dtype]
    semi = cfg.semi_structured and torch.device(cfg.device).type == "cuda" and cfg.dtype != "fp32"
    armor, _ = load_armor_model(cfg.artifact, dtype=dtype, device=cfg.device, semi_structured=semi)
    if cfg.synth_block_size:
        synthesise_blocks(armor, cfg.synth_block_size)
    dense, _ = load_armor_model(cfg.artifact, dtype=dtype, device=cfg.device)
    return {"dense": densify(dense).eval(), "armor": armor}


def _ids(batch: int, seq: int, vocab: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def torch_prefill(model, ids, cfg) -> dict:
    t = timing.time_fn(lambda x: model(input_ids=x, use_cache=False, logits_to_keep=1), [ids],
                       device=cfg.device, warmup=cfg.warmup, iters=cfg.iters)
    return {**t, "tokens_per_s": ids.numel() / (t["median_ms"] * 1e-3)}


@torch.inference_mode()
def torch_decode(model, prompt, cfg) -> tuple[dict, list[int]]:
    """Greedy loop with the HF cache; returns per-step timing and the generated tokens of run 0."""
    steps: list[float] = []
    tokens: list[int] = []
    for run in range(cfg.warmup + cfg.iters):
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        gen = [nxt]
        for _ in range(cfg.decode_tokens - 1):
            timing.sync(cfg.device)
            t0 = _t.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            timing.sync(cfg.device)
            if run >= cfg.warmup:
                steps.append((_t.perf_counter() - t0) * 1e3)
            gen.append(nxt)
        if run == cfg.warmup:
            tokens = torch.cat(gen, 1)[0].tolist()
    steps.sort()
    med = steps[len(steps) // 2]
    return {"median_ms": med, "p10_ms": steps[len(steps) // 10], "p90_ms": steps[(9 * len(steps)) // 10],
            "runs": len(steps), "tokens_per_s": prompt.shape[0] / (med * 1e-3)}, tokens


def ort_available() -> str | None:
    """None when the ORT engine can run, else the reason it cannot."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install armor-export[onnx])"
    try:
        from engines.onnx_export import export_onnx  # noqa: F401
    except ImportError as e:
        return f"engines.onnx_export is not available: {e}"
    return None


class OrtKV:
    """The KV-cache ONNX graph (form='kv') under onnxruntime's CPU provider."""

    def __init__(self, folder: Path):
        import onnxruntime as ort

        meta = json.loads((folder / "onnx_export.json").read_text())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.L, self.kvh, self.hd = meta["num_layers"], meta["num_key_value_heads"], meta["head_dim"]
        self.kv_dtype = np.float16 if meta["dtype"] == "fp16" else np.float32
        self.inputs = {i.name for i in self.sess.get_inputs()}

    def step(self, ids: np.ndarray, past: list[np.ndarray] | None, past_len: int):
        B, T = ids.shape
        if past is None:
            past = [np.zeros((B, self.kvh, 0, self.hd), self.kv_dtype) for _ in range(2 * self.L)]
        feed = {"input_ids": ids, "attention_mask": np.ones((B, past_len + T), np.int64),
                "position_ids": np.broadcast_to(np.arange(past_len, past_len + T, dtype=np.int64), (B, T)).copy()}
        for i in range(self.L):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = self.sess.run(None, {k: v for k, v in feed.items() if k in self.inputs})
        return out[0], out[1:]


def ort_models(cfg: E2EConfig) -> dict[str, OrtKV]:
    from engines.onnx_export import export_onnx

    cache = Path(cfg.ort_cache or tempfile.mkdtemp(prefix="bench_ort_"))
    ort_dtype = "fp32" if cfg.dtype == "bf16" else cfg.dtype  # ORT CPU has no bf16 MatMul
    out = {}
    for name, dense in (("dense", True), ("armor", False)):
        folder = cache / f"{Path(cfg.artifact).name}-{name}-{ort_dtype}-kv"
        if not (folder / "model.onnx").is_file():
            export_onnx(cfg.artifact, folder, dtype=ort_dtype, form="kv", dense=dense, overwrite=True)
        out[name] = OrtKV(folder)
    return out


def ort_prefill(m: OrtKV, ids: np.ndarray, cfg) -> dict:
    t = timing.time_fn(lambda x: m.step(x, None, 0), [ids], warmup=cfg.warmup, iters=cfg.iters)
    return {**t, "tokens_per_s": ids.size / (t["median_ms"] * 1e-3)}


def ort_decode(m: OrtKV, prompt: np.ndarray, cfg) -> tuple[dict, list[int]]:
    steps, tokens = [], []
    for run in range(cfg.warmup + cfg.iters):
        logits, past = m.step(prompt, None, 0)
        nxt, n = logits[:, -1].argmax(-1)[:, None].astype(np.int64), prompt.shape[1]
        gen = [nxt]
        for _ in range(cfg.decode_tokens - 1):
            t0 = _t.perf_counter()
            logits, past = m.step(nxt, past, n)
            nxt, n = logits[:, -1].argmax(-1)[:, None].astype(np.int64), n + 1
            if run >= cfg.warmup:
                steps.append((_t.perf_counter() - t0) * 1e3)
            gen.append(nxt)
        if run == cfg.warmup:
            tokens = np.concatenate(gen, 1)[0].tolist()
    steps.sort()
    med = steps[len(steps) // 2]
    return {"median_ms": med, "p10_ms": steps[len(steps) // 10], "p90_ms": steps[(9 * len(steps)) // 10],
            "runs": len(steps), "tokens_per_s": prompt.shape[0] / (med * 1e-3)}, tokens


def run(cfg: E2EConfig, *, progress=print) -> dict:
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    models = torch_models(cfg) if "torch" in cfg.engines else {}
    vocab = next(iter(models.values())).config.vocab_size if models else 1000
    base = {"dtype": cfg.dtype, "device": cfg.device}
    gen: dict[tuple[str, str], list[int]] = {}
    for name, m in models.items():
        for B, T in cfg.prefill:
            r = torch_prefill(m, _ids(B, T, vocab, cfg.seed, cfg.device), cfg)
            rows.append({**base, "engine": "torch", "model": name, "phase": f"prefill {B}x{T}", **r})
            progress(f"  torch {name} prefill {B}x{T}: {r['tokens_per_s']:.1f} tok/s")
        r, gen[("torch", name)] = torch_decode(m, _ids(cfg.decode_batch, cfg.decode_prompt, vocab, cfg.seed + 1,
                                                        cfg.device), cfg)
        rows.append({**base, "engine": "torch", "model": name, "phase": f"decode b{cfg.decode_batch}", **r})
        progress(f"  torch {name} decode: {r['tokens_per_s']:.1f} tok/s")
    del models
    if "ort" in cfg.engines:
        reason = ort_available()
        if reason is None and torch.device(cfg.device).type != "cpu":
            reason = "the ORT engine here runs the CPU provider only; run it with --device cpu"
        if reason:
            skipped["ort"] = reason
        else:
            try:
                oms = ort_models(cfg)
            except Exception as e:  # noqa: BLE001  (an optional engine: record why, keep the torch rows)
                oms, skipped["ort"] = {}, f"export or session failed: {type(e).__name__}: {e}"
            for name, m in oms.items():
                for B, T in cfg.ort_prefill:
                    r = ort_prefill(m, _ids(B, T, vocab, cfg.seed, "cpu").numpy(), cfg)
                    rows.append({**base, "engine": "ort-cpu", "model": name, "phase": f"prefill {B}x{T}", **r})
                    progress(f"  ort {name} prefill {B}x{T}: {r['tokens_per_s']:.1f} tok/s")
                prompt = _ids(cfg.decode_batch, cfg.decode_prompt, vocab, cfg.seed + 1, "cpu").numpy()
                r, gen[("ort-cpu", name)] = ort_decode(m, prompt, cfg)
                rows.append({**base, "engine": "ort-cpu", "model": name, "phase": f"decode b{cfg.decode_batch}", **r})
                progress(f"  ort {name} decode: {r['tokens_per_s']:.1f} tok/s")
    summary = []
    for r in rows:
        if r["model"] != "armor":
            continue
        d = next(x for x in rows if x["model"] == "dense" and x["engine"] == r["engine"] and x["phase"] == r["phase"])
        summary.append({"engine": r["engine"], "phase": r["phase"], "dense_tok_s": d["tokens_per_s"],
                        "armor_tok_s": r["tokens_per_s"], "speedup": r["tokens_per_s"] / d["tokens_per_s"],
                        "overhead_pct": 100 * (d["tokens_per_s"] / r["tokens_per_s"] - 1)})
    agree = {eng: sum(a == b for a, b in zip(gen[(eng, "dense")], gen[(eng, "armor")])) / max(1, len(gen[(eng, "dense")]))
             for eng in {e for e, _ in gen} if (eng, "armor") in gen and (eng, "dense") in gen}
    notes = []
    if cfg.synth_block_size and any(r["engine"] == "ort-cpu" for r in rows):
        notes.append("ort-cpu ARMOR is the artifact as stored: identity A/B export no nodes, so it times plain 2:4 "
                     "in dense storage (--synth-block-size applies to the torch engine only)")
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "env": timing.environment(cfg.device),
            "config": asdict(cfg), "results": rows, "summary": summary, "skipped": skipped,
            "greedy_token_agreement": agree, "notes": notes}


def format_table(res: dict) -> str:
    hdr = f"{'engine':<9}{'phase':<16}{'dense tok/s':>13}{'ARMOR tok/s':>13}{'speedup':>9}{'overhead':>10}"
    lines = [hdr, "-" * len(hdr)]
    for s in res["summary"]:
        lines.append(f"{s['engine']:<9}{s['phase']:<16}{s['dense_tok_s']:>13.1f}{s['armor_tok_s']:>13.1f}"
                     f"{s['speedup']:>9.3f}{s['overhead_pct']:>9.1f}%")
    for eng, why in res["skipped"].items():
        lines.append(f"{eng}: skipped ({why})")
    lines.append(f"greedy tokens identical dense vs ARMOR (fraction): {res['greedy_token_agreement']}")
    lines.extend(f"note: {n}" for n in res.get("notes", []))
    return "\n".join(lines)


def _shapes(s: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in p.lower().split("x")) for p in s.split(",") if p.strip())


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="artifact directory (armor-export prune --out ...)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="fp32|bf16|fp16 (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--prefill", default="1x512,8x512", help="batch x seq list for prefill")
    p.add_argument("--ort-prefill", default="1x512", help="batch x seq list for ORT prefill")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--engines", default="torch,ort")
    p.add_argument("--no-semi-structured", action="store_true", help="CUDA: keep S dense (cuBLAS)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--synth-block-size", type=int, default=None,
                   help="time identity-A/B layers as explicit b x b identity blocks (torch engine only)")
    p.add_argument("--ort-cache", default=None, help="folder for the exported ONNX models (reused)")
    p.add_argument("--out", default="results/bench_e2e.json")
    p.add_argument("--plot", default=None, help="PNG path (default next to --out; 'none' to skip)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = E2EConfig(artifact=a.artifact, device=a.device,
                    dtype=a.dtype or ("fp16" if torch.device(a.device).type == "cuda" else "fp32"),
                    prefill=_shapes(a.prefill), ort_prefill=_shapes(a.ort_prefill), decode_batch=a.decode_batch,
                    decode_prompt=a.decode_prompt, decode_tokens=a.decode_tokens,
                    engines=tuple(e.strip() for e in a.engines.split(",") if e.strip()),
                    semi_structured=not a.no_semi_structured, warmup=a.warmup, iters=a.iters,
                    ort_cache=a.ort_cache, synth_block_size=a.synth_block_size)
    res = run(cfg)
    print(format_table(res))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    png = None
    if a.plot != "none":
        from benchmarks.plot import plot_e2e

        png = plot_e2e(res, Path(a.plot) if a.plot else out.with_suffix(".png"))
    print(json.dumps({"benchmark": "e2e", "json": str(out), "png": None if png is None else str(png),
                      "summary": res["summary"], "skipped": res["skipped"], "device": res["env"]["device"]}))
    return res


if __name__ == "__main__":
    main()
