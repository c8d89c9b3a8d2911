"""Layer throughput: dense GEMM vs plain 2:4 (S only) vs ARMOR (B blocks -> 2:4 -> A blocks).

Run:  python -m benchmarks.bench_layer [--suite llama-3-8b,...] [--m 1,16,...] [--dtype fp32,bf16]
                                       [--device cpu|cuda] [--out results/layer.json] [--smoke]

Every variant is an ``engines.torch_module.ArmorLinear`` (plain 2:4 = the same module without A and
B), run exactly as the model runs it; the dense baseline is ``nn.Linear`` holding the reconstructed
weight A.S.B. On CUDA the 2:4 GEMM runs on each semi-structured backend PyTorch offers, chosen per
module with ``SparseSemiStructuredTensor{CUSPARSELT,CUTLASS}.from_dense`` (no global class flag);
on CPU S is a dense tensor with zeros (PyTorch has no CPU 2:4 kernel, so ARMOR can only add cost).
``--blockdiag triton`` adds the variant whose block-diagonal products run through
``engines.blockdiag_triton`` (PyTorch fallback off CUDA). Each variant is checked against an fp32
reference with the dense-reconstructed weight before it is timed; the check goes into the JSON.
Reports median ms, speedup vs dense, ARMOR as a fraction of plain 2:4 and the limit
1/(0.5 + overhead). Prints a table, writes JSON (``--out``) and a PNG plot, ends with a JSON line.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks import shapes, timing
from engines.torch_module import ArmorLinear
from solver.blockdiag import product
from solver.sparsity import mask_24

SCHEMA = "armor-export/bench-layer"
SCHEMA_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative max error vs the fp32 reference (inputs already rounded to the dtype): three chained
# products round twice in between, so the low-precision bounds are a few ulps of the dtype.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}
SPARSE_CLASSES = ("cusparselt", "cutlass")  # names ArmorLinear.to_semi_structured accepts


@dataclass(frozen=True)
class LayerBenchConfig:
    suites: tuple[str, ...] = ("smollm2-135m",)
    layers: str | None = None  # comma list of q,k,v,o,gate,up,down (None = all)
    ms: tuple[int, ...] = shapes.DEFAULT_M
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    device: str = "cpu"
    block_size: int | None = None  # None = the suite's default
    backends: tuple[str, ...] = ("cusparselt", "cutlass")  # CUDA only
    blockdiag: tuple[str, ...] = ("torch",)  # add "triton" for the engines.blockdiag_triton variant
    warmup: int = 5
    iters: int = 30
    min_seconds: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for s in self.suites:
            shapes.get_suite(s)
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad:
            raise ValueError(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
        if torch.device(self.device).type == "cpu" and "fp16" in self.dtypes:
            raise ValueError("fp16 GEMMs on CPU are not a meaningful baseline; use fp32 or bf16 on CPU")
        unknown = set(self.backends) - set(SPARSE_CLASSES)
        if unknown:
            raise ValueError(f"unknown 2:4 backend(s) {sorted(unknown)}; choose from {list(SPARSE_CLASSES)}")
        if set(self.blockdiag) - {"torch", "triton"}:
            raise ValueError("blockdiag implementations: torch, triton")
        if min(self.ms) < 1 or self.iters < 1:
            raise ValueError("token counts and iterations must be positive")


def make_factors(d_in: int, d_out: int, b: int, seed: int, device="cpu"):
    """Random fp32 factors drawn on ``device``: S = a 2:4-masked Gaussian, A and B = identity +
    noise blocks (non-identity, so the block products do real work)."""
    g = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, device=device) / d_in ** 0.5
    S = W * mask_24(W.abs())
    eye = torch.eye(b, device=device)
    A = eye + 0.05 * torch.randn(d_out // b, b, b, generator=g, device=device)
    B = eye + 0.05 * torch.randn(d_in // b, b, b, generator=g, device=device)
    return S, A, B


def attach_sparse(module: ArmorLinear, backend: str) -> None:
    """Give ``module`` a semi-structured copy of S from one named backend (CUDA fp16/bf16 only),
    chosen per module (no global ``_FORCE_CUTLASS`` toggle)."""
    module.to_semi_structured(backend, strict=True)


def build_variants(S, A, B, *, dtype, device, backends, blockdiag) -> list[dict]:
    """Modules to time: [{'variant', 'backend', 'fn', 'ref_weight'}], or an 'error' entry where
    a backend refused the shape or dtype."""
    W = product(A, S, B)  # fp32 dense-reconstructed ARMOR weight
    dense = nn.Linear(S.shape[1], S.shape[0], bias=False)
    dense.weight.data = W.clone()
    out = [{"variant": "dense", "backend": "dense", "fn": dense.to(device, dtype).eval(), "ref_weight": W}]
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    cuda = torch.device(device).type == "cuda"
    sparse_backends = backends if cuda else ("dense-storage",)
    for backend in sparse_backends:
        for variant, a, b_, ref in (("2:4", None, None, S), ("armor", A, B, W)):
            m = ArmorLinear(cast(S), None if a is None else cast(a), None if b_ is None else cast(b_)).eval()
            entry = {"variant": variant, "backend": backend, "ref_weight": ref}
            if cuda:
                try:
                    attach_sparse(m, backend)
                except (RuntimeError, ValueError, NotImplementedError) as e:
                    out.append({**entry, "error": f"{type(e).__name__}: {e}"})
                    continue
            out.append({**entry, "fn": m})
            if variant == "armor" and "triton" in blockdiag:
                from engines.blockdiag_triton import armor_forward, describe

                out.append({**entry, "variant": "armor-triton", "impl": describe(device),
                            "fn": (lambda x, m=m: armor_forward(m, x, impl="triton"))})
    return out


def check(fn, x: torch.Tensor, ref_weight: torch.Tensor, dtype_name: str) -> dict:
    """Relative max error of fn(x) against fp32 x @ ref_weight^T on the same device (x is already
    rounded to the dtype, so only the variant's own rounding counts)."""
    with torch.inference_mode():
        y = fn(x).float()
        ref = x.float() @ ref_weight.to(x.device).T
    err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    tol = TOLERANCE[dtype_name]
    return {"passed": bool(err <= tol and torch.isfinite(y).all()), "rel_max_err": err, "tol": tol}


def bench_layer_dtype(suite, layer, factors, dtype_name, cfg: LayerBenchConfig) -> list[dict]:
    """All token counts of one (layer, dtype): variants are built once, then timed per M."""
    dtype, device = DTYPES[dtype_name], cfg.device
    S, A, B = factors
    (d_out, d_in), b = S.shape, A.shape[-1]
    variants = build_variants(S, A, B, dtype=dtype, device=device, backends=cfg.backends,
                              blockdiag=cfg.blockdiag)
    rows = []
    for M in cfg.ms:
        per_input = M * d_in * torch.finfo(dtype).bits // 8
        n_inputs = timing.rotation_count(per_input, device)
        g = torch.Generator().manual_seed(cfg.seed + M)
        inputs = [torch.randn(M, d_in, generator=g).to(device=device, dtype=dtype) for _ in range(n_inputs)]
        base = {"suite": suite, "layer": layer, "d_in": d_in, "d_out": d_out, "block_size": b, "M": M,
                "dtype": dtype_name, "device": str(device), "rotating_inputs": n_inputs}
        for v in variants:
            row = {**base, "variant": v["variant"], "backend": v["backend"]}
            if "impl" in v:
                row["impl"] = v["impl"]
            if "error" in v:
                rows.append({**row, "skipped": v["error"], "correct": None})
                continue
            row["correct"] = check(v["fn"], inputs[0], v["ref_weight"], dtype_name)
            t = timing.time_fn(v["fn"], inputs, device=device, warmup=cfg.warmup, iters=cfg.iters,
                               min_seconds=cfg.min_seconds)
            row.update(t)
            row["dense_equiv_tflops"] = 2 * M * d_in * d_out / (t["median_ms"] * 1e-3) / 1e12
            rows.append(row)
        del inputs
    del variants
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (suite, layer, M, dtype, backend): speedups vs dense, ARMOR / plain 2:4, the limit."""
    key = lambda r: (r["suite"], r["layer"], r["M"], r["dtype"])  # noqa: E731
    dense = {key(r): r["median_ms"] for r in rows if r["variant"] == "dense" and "median_ms" in r}
    out = []
    for r in rows:
        if r["variant"] != "2:4" or "median_ms" not in r:
            continue
        t_dense, t24 = dense[key(r)], r["median_ms"]
        s = {k: r[k] for k in ("suite", "layer", "d_in", "d_out", "block_size", "M", "dtype", "backend")}
        s.update({"dense_ms": t_dense, "sparse24_ms": t24, "speedup_24": t_dense / t24,
                  "overhead": shapes.overhead(r["block_size"], r["d_in"], r["d_out"]),
                  "limit": shapes.limit(r["block_size"], r["d_in"], r["d_out"])})
        for a in rows:
            if key(a) == key(r) and a["backend"] == r["backend"] and a["variant"].startswith("armor") \
                    and "median_ms" in a:
                tag = "armor" if a["variant"] == "armor" else a["variant"].replace("-", "_")
                s.update({f"{tag}_ms": a["median_ms"], f"speedup_{tag}": t_dense / a["median_ms"],
                          f"{tag}_frac_of_24": t24 / a["median_ms"]})
        out.append(s)
    return out


def fused_vs_parts(summary: list[dict]) -> list[dict]:
    """Per fused group timed with all its members (``--layers qkv,q,k,v``): the group's ARMOR time against the sum
    of the members' (one stacked A.S.B with one B vs three / two separate ones), same suite, M, dtype, backend."""
    key = lambda s: (s["suite"], s["M"], s["dtype"], s["backend"])  # noqa: E731
    by = {(key(s), s["layer"]): s for s in summary if "armor_ms" in s}
    out = []
    for (k, layer), s in by.items():
        members = shapes.FUSED_MEMBERS.get(layer)
        if not members or not all((k, m) in by for m in members):
            continue
        parts = sum(by[(k, m)]["armor_ms"] for m in members)
        dense = sum(by[(k, m)]["dense_ms"] for m in members)
        out.append({"suite": k[0], "group": layer, "M": k[1], "dtype": k[2], "backend": k[3],
                    "fused_armor_ms": s["armor_ms"], "parts_armor_ms": parts, "parts_dense_ms": dense,
                    "fused_over_parts": s["armor_ms"] / parts})
    return out


def run(cfg: LayerBenchConfig, *, progress=print) -> dict:
    rows = []
    for suite_name in cfg.suites:
        suite = shapes.get_suite(suite_name)
        b = cfg.block_size or suite.block_size
        for layer, d_in, d_out in shapes.select_layers(suite, cfg.layers):
            factors = make_factors(d_in, d_out, b, cfg.seed, cfg.device)
            for dtype_name in cfg.dtypes:
                rows.extend(bench_layer_dtype(suite_name, layer, factors, dtype_name, cfg))
            del factors
            if progress:
                progress(f"  done {suite_name}/{layer} ({d_in}->{d_out})")
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "env": timing.environment(cfg.device),
            "config": asdict(cfg), "results": rows, "summary": (summary := summarise(rows)),
            "fused": fused_vs_parts(summary)}


def format_table(result: dict) -> str:
    hdr = (f"{'suite/layer':<22}{'d_in>d_out':>12}{'M':>6} {'dtype':<5}{'backend':<14}{'dense ms':>10}"
           f"{'2:4 ms':>10}{'armor ms':>10}{'x 2:4':>8}{'x armor':>8}{'armor/2:4':>10}{'limit':>7}")
    lines = [hdr, "-" * len(hdr)]
    for s in result["summary"]:
        lines.append(
            f"{s['suite'] + '/' + s['layer']:<22}{str(s['d_in']) + '>' + str(s['d_out']):>12}{s['M']:>6} "
            f"{s['dtype']:<5}{s['backend']:<14}{s['dense_ms']:>10.4f}{s['sparse24_ms']:>10.4f}"
            f"{s.get('armor_ms', float('nan')):>10.4f}{s['speedup_24']:>8.2f}"
            f"{s.get('speedup_armor', float('nan')):>8.2f}{s.get('armor_frac_of_24', float('nan')):>10.2f}"
            f"{s['limit']:>7.2f}")
        if "armor_triton_ms" in s:
            lines.append(f"{'':<22}{'':>12}{'':>6} {'':<5}{'+triton bd':<14}{'':>10}{'':>10}"
                         f"{s['armor_triton_ms']:>10.4f}{'':>8}{s['speedup_armor_triton']:>8.2f}"
                         f"{s['armor_triton_frac_of_24']:>10.2f}")
    for f in result.get("fused", []):
        lines.append(f"fused {f['suite']}/{f['group']} M={f['M']} {f['dtype']} {f['backend']}: one A.S.B "
                     f"{f['fused_armor_ms']:.4f} ms vs members {f['parts_armor_ms']:.4f} ms "
                     f"(x{f['fused_over_parts']:.2f}; members dense {f['parts_dense_ms']:.4f} ms)")
    bad = [r for r in result["results"] if r.get("correct") and not r["correct"]["passed"]]
    skipped = [r for r in result["results"] if r.get("skipped")]
    lines.append(f"correctness: {len(bad)} failed; {len(skipped)} variant(s) skipped by the backend")
    for r in bad:
        lines.append(f"  FAILED {r['suite']}/{r['layer']} M={r['M']} {r['dtype']} {r['variant']}/{r['backend']}: "
                     f"rel err {r['correct']['rel_max_err']:.2e} > {r['correct']['tol']:.0e}")
    return "\n".join(lines)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _strs(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=None, help=f"comma list of {', '.join(shapes.SUITES)} "
                   "(default: smollm2-135m on CPU, all model suites on CUDA)")
    p.add_argument("--layers", default=None, help="comma list of q,k,v,o,gate,up,down and the fused groups qkv,gate_up "
                   "(default: the seven unfused; name a group with its members to time fused vs parts)")
    p.add_argument("--m", default=None, help="token counts (default 1,16,128,512,2048,4096)")
    p.add_argument("--dtype", default=None, help="default: fp32,bf16 on CPU; fp16,bf16 on CUDA")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--block-size", type=int, default=None, help="ARMOR block size (default: per suite)")
    p.add_argument("--backends", default="cusparselt,cutlass", help="CUDA 2:4 backends to time")
    p.add_argument("--blockdiag", default="torch", help="'torch' or 'torch,triton' (adds armor-triton)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--min-seconds", type=float, default=0.0, help="keep timing each case at least this long")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="tiny suite, M=1,8, 3 iterations (for tests)")
    p.add_argument("--out", default="results/bench_layer.json", help="JSON path")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out; 'none' to skip)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    on_cuda = torch.device(a.device).type == "cuda"
    suites = _strs(a.suite) if a.suite else (("tiny",) if a.smoke else
                                             shapes.GPU_SUITES if on_cuda else ("smollm2-135m",))
    cfg = LayerBenchConfig(
        suites=suites, layers=a.layers,
        ms=_ints(a.m) if a.m else ((1, 8) if a.smoke else shapes.DEFAULT_M),
        dtypes=_strs(a.dtype) if a.dtype else (("fp16", "bf16") if on_cuda else ("fp32", "bf16")),
        device=a.device, block_size=a.block_size, backends=_strs(a.backends), blockdiag=_strs(a.blockdiag),
        warmup=1 if a.smoke else a.warmup, iters=3 if a.smoke else a.iters, min_seconds=a.min_seconds)
    result = run(cfg)
    print(format_table(result))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    png = None
    if a.plot != "none":
        from benchmarks.plot import plot_layer

        png = plot_layer(result, Path(a.plot) if a.plot else out.with_suffix(".png"))
    n_bad = sum(1 for r in result["results"] if r.get("correct") and not r["correct"]["passed"])
    print(json.dumps({"benchmark": "layer", "json": str(out), "png": None if png is None else str(png),
                      "rows": len(result["results"]), "correctness_failures": n_bad,
                      "device": result["env"]["device"]}))
    return result


if __name__ == "__main__":
    main()
