"""Parity measurements and the deployment parity report (parity.json + parity.md + parity.png).

A ``Check`` is one PASS/FAIL line with the value measured and the tolerance used; tolerances are
chosen by the caller per precision and written into the report next to the value.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from armor_export.fsutil import atomic_write_file, atomic_write_text


@dataclass
class Check:
    name: str
    value: float | str | None
    tolerance: str  # human-readable rule, e.g. ">= 60 dB" or "<= 1e-4"
    passed: bool
    detail: dict = field(default_factory=dict)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio 10.log10(|ref|^2 / |ref - test|^2) in dB (inf when equal)."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def error_stats(ref: torch.Tensor, test: torch.Tensor) -> dict:
    ref, test = ref.double(), test.double()
    diff = (ref - test).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "max_rel": (diff.max() / ref.abs().max().clamp_min(1e-30)).item(), "sqnr_db": sqnr_db(ref, test)}


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
