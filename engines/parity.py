"""Parity measurements and the deployment parity report (parity.json + parity.md + parity.png).

The leaf module every engine's verify shares: the dtype names (``DTYPES``), the per-dtype tolerance
table of graph engines vs the fp32 PyTorch runtime (``TOLERANCES``), error statistics, the artifact's
reference logits, default parity tokens, and the report writer. It imports no other engine module.
A ``Check`` is one PASS/FAIL line with the value measured and the tolerance used; tolerances are
chosen per precision and written into the report next to the value.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import platform
from importlib import metadata

import torch

from armor_export.fsutil import atomic_write_file, atomic_write_text

# the engines' precision names, once
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Floors/ceilings of an engine's output vs the artifact's fp32 PyTorch runtime, per engine precision; set from
# measured baselines on the tiny family models and SmolLM2 (fp32: >= ~120 dB logits SQNR, identical greedy
# tokens; fp16: ~60 dB tiny, ~45 dB SmolLM2; bf16: ~35 dB tiny).
TOLERANCES = {
    "fp32": {"layer_sqnr_db": 60.0, "logits_sqnr_db": 60.0, "max_rel": 1e-3, "top1": 0.999, "ppl_rel": 1e-4},
    "fp16": {"layer_sqnr_db": 30.0, "logits_sqnr_db": 30.0, "max_rel": 5e-2, "top1": 0.95, "ppl_rel": 1e-2},
    "bf16": {"layer_sqnr_db": 20.0, "logits_sqnr_db": 20.0, "max_rel": 2e-1, "top1": 0.85, "ppl_rel": 5e-2},
}

@dataclass
class Check:
    name: str
    value: float | str | None
    tolerance: str  # human-readable rule, e.g. ">= 60 dB" or "<= 1e-4"
    passed: bool
    detail: dict = field(default_factory=dict)


CHUNK = 1 << 20  # elements per step of the error statistics (fp64 temporaries of 8 MB, not of whole logits)


def _chunks(ref: torch.Tensor, test: torch.Tensor, chunk: int):
    """Matching fp64 pieces of the flattened ``ref`` and ``test``, ``chunk`` elements at a time."""
    r, t = ref.reshape(-1), test.reshape(-1)
    for i in range(0, r.numel(), chunk):
        yield r[i:i + chunk].double(), t[i:i + chunk].double()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor, chunk: int = CHUNK) -> float:
    """Signal-to-quantisation-noise ratio 10.log10(|ref|^2 / |ref - test|^2) in dB (inf when equal)."""
    return error_stats(ref, test, chunk)["sqnr_db"]


class ErrorSums:
    """Running fp64 sums of the error statistics, fed piece by piece (``add``) and read by ``stats``: the same
    numbers as over the whole tensors, whatever the pieces (up to the order of fp64 sums)."""

    def __init__(self):
        self.max_abs = self.sum_abs = self.noise = self.signal = self.ref_max = 0.0
        self.n = 0

    def add(self, ref: torch.Tensor, test: torch.Tensor, chunk: int = CHUNK) -> None:
        for r, t in _chunks(ref, test, chunk):
            d = r - t
            a = d.abs()
            self.max_abs, self.sum_abs = max(self.max_abs, a.max().item()), self.sum_abs + a.sum().item()
            self.noise, self.signal = self.noise + d.pow(2).sum().item(), self.signal + r.pow(2).sum().item()
            self.ref_max = max(self.ref_max, r.abs().max().item())
        self.n += ref.numel()

    def stats(self) -> dict:
        sqnr = math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise)
        return {"max_abs": self.max_abs, "mean_abs": self.sum_abs / max(self.n, 1),
                "max_rel": self.max_abs / max(self.ref_max, 1e-30), "sqnr_db": sqnr}


def error_stats(ref: torch.Tensor, test: torch.Tensor, chunk: int = CHUNK) -> dict:
    """Max / mean absolute error, max error relative to max |ref|, and SQNR, accumulated in fp64 over chunks so
    that comparing two [windows, T, vocab] logits holds one chunk of fp64 temporaries at a time."""
    acc = ErrorSums()
    acc.add(ref, test, chunk)
    return acc.stats()


def compare(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """error_stats plus top-1 agreement over the last axis (logits [..., vocab])."""
    st = error_stats(ref, test)
    st["top1_agreement"] = (ref.argmax(-1) == test.argmax(-1)).double().mean().item()
    return st


def window_nll(logits: torch.Tensor, row: torch.Tensor, rows: int = 64) -> float:
    """Summed next-token negative log-likelihood of one window (logits [T, vocab], row [T]), in fp64, ``rows``
    positions at a time (fp64 temporaries of rows x vocab, not of the whole window)."""
    lg, tgt = logits[:-1], row[1:]
    return sum(torch.nn.functional.cross_entropy(lg[i:i + rows].double(), tgt[i:i + rows], reduction="sum").item()
               for i in range(0, lg.shape[0], rows))


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Token perplexity of ``ids`` [windows, T] under ``logits`` [windows, T, vocab], in fp64 one window at a time."""
    total = sum(window_nll(lg, row) for lg, row in zip(logits, ids))
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


def default_tokens(vocab: int, seqlen: int, windows: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids [windows, seqlen] (parity when the caller passes no text)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (windows, seqlen), generator=g)


def parity_tokens(cfg_tokens, facts, seqlen: int | None = None) -> torch.Tensor:
    """The caller's token windows (ExportConfig.parity_tokens) or seeded random ids; by default longer than
    every sliding window of the model (2 x window + 8 tokens) and at most its max positions."""
    if cfg_tokens:
        return torch.as_tensor([list(t) for t in cfg_tokens], dtype=torch.long)
    longest = max([w for w in facts.windows if w] or [0])
    n = seqlen or min(max(64, 2 * longest + 8), facts.max_positions)
    return default_tokens(facts.vocab, n)


@torch.no_grad()
def stack_windows(window_logits, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 CPU logits [windows, T, vocab] of ``window_logits(ids [1, T]) -> [1, T, vocab]``, one window at a
    time, written into one preallocated tensor: the peak is the result plus one window (a list of windows
    concatenated at the end would hold the result twice)."""
    out = None
    for i, t in enumerate(tokens):
        w = window_logits(t[None])
        if out is None:
            out = torch.empty((tokens.shape[0], *w.shape[1:]), dtype=torch.float32)
        out[i] = w[0]
        del w
    return out


def model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 CPU logits of an HF-style model, one window at a time."""
    dev = next(model.parameters()).device
    return stack_windows(lambda ids: model(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev))
                         .logits.float().cpu(), tokens)


def versions(packages=("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai",
                       "onnx-ir", "numpy", "polygraphy", "tensorrt", "tensorrt-llm", "armor-export")) -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def logits_checks(ref: torch.Tensor, got, ids: torch.Tensor, tol: dict, what: str = "") -> list[Check]:
    """Logits SQNR, max relative error, top-1 agreement and perplexity difference of ``got`` vs ``ref``
    (fp32 [windows, T, vocab]) against one row of ``TOLERANCES``. ``got`` is a tensor of the same shape or an
    iterable of its windows ([T, vocab] or [1, T, vocab]), consumed one at a time, so an engine's logits need
    never be held whole beside the reference's."""
    err, agree, nll_ref, nll_got = ErrorSums(), 0, 0.0, 0.0
    windows = 0
    for r, g, row in zip(ref, got, ids):
        g = g.reshape(r.shape)
        err.add(r, g)
        agree += int((r.argmax(-1) == g.argmax(-1)).sum().item())
        nll_ref, nll_got = nll_ref + window_nll(r, row), nll_got + window_nll(g, row)
        windows += 1
    if windows != ref.shape[0]:
        raise ValueError(f"{windows} engine windows for {ref.shape[0]} reference windows")
    st = {**err.stats(), "top1_agreement": agree / max(ref.shape[0] * ref.shape[1], 1)}
    n_tok = ids.shape[0] * (ids.shape[1] - 1)
    p_ref, p_got = math.exp(nll_ref / n_tok), math.exp(nll_got / n_tok)
    rel = abs(p_got - p_ref) / p_ref
    pre = f"{what}: " if what else ""
    return [
        Check(f"{pre}logits SQNR", st["sqnr_db"], f">= {tol['logits_sqnr_db']} dB", st["sqnr_db"] >= tol["logits_sqnr_db"],
              st),
        Check(f"{pre}logits max relative error (max abs diff / max abs ref)", st["max_rel"], f"<= {tol['max_rel']}",
              st["max_rel"] <= tol["max_rel"], {"max_abs": st["max_abs"]}),
        Check(f"{pre}top-1 agreement", st["top1_agreement"], f">= {tol['top1']}", st["top1_agreement"] >= tol["top1"]),
        Check(f"{pre}perplexity relative difference", rel, f"<= {tol['ppl_rel']}", rel <= tol["ppl_rel"],
              {"ppl_torch": p_ref, "ppl_engine": p_got, "windows": int(ids.shape[0]), "seqlen": int(ids.shape[1])}),
    ]


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(report_dir: Path, title: str, checks: list[Check], meta: dict,
                 layer_sqnr: dict[str, float] | None = None) -> dict:
    """Write parity.json, parity.md and (if matplotlib is present and per-layer SQNR given) parity.png."""
    report_dir = Path(report_dir)
    passed = all(c.passed for c in checks)
    doc = {"title": title, "passed": passed, "checks": [asdict(c) for c in checks], "meta": meta,
           "layer_sqnr_db": layer_sqnr or {}}
    atomic_write_text(report_dir / "parity.json", json.dumps(_json_safe(doc), indent=2) + "\n")
    lines = [f"# {title}", "", f"**{'PASS' if passed else 'FAIL'}**", "", "| check | value | tolerance | result |",
             "|---|---|---|---|"]
    for c in checks:
        v = f"{c.value:.6g}" if isinstance(c.value, float) else str(c.value)
        lines.append(f"| {c.name} | {v} | {c.tolerance} | {'PASS' if c.passed else 'FAIL'} |")
    if layer_sqnr:
        finite = [v for v in layer_sqnr.values() if math.isfinite(v)]
        if finite:
            lines += ["", f"Per-layer SQNR over {len(layer_sqnr)} lowered linears: min {min(finite):.1f} dB, "
                          f"median {sorted(finite)[len(finite) // 2]:.1f} dB (plot: parity.png)"]
    lines += ["", "## Versions and settings", "", "```json", json.dumps(_json_safe(meta), indent=2), "```"]
    atomic_write_text(report_dir / "parity.md", "\n".join(lines) + "\n")
    if layer_sqnr:
        _plot(report_dir / "parity.png", layer_sqnr, title)
    return {"passed": passed, "report_path": str(report_dir / "parity.md")}


def _plot(path: Path, layer_sqnr: dict[str, float], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    vals = [min(v, 200.0) for v in layer_sqnr.values()]
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.plot(range(len(vals)), vals, ".", ms=3)
    ax.set_xlabel("lowered linear (model order)")
    ax.set_ylabel("SQNR vs PyTorch (dB, capped 200)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_file(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
