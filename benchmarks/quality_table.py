"""The quality benchmark's main-table method specs, gap-closed arithmetic and markdown table (benchmarks/quality.py)."""
from __future__ import annotations

import math

from solver.config import PRESETS

RUN_KEYWORDS = {"block_size": "block_size", "iterations": "iterations", "lr": "lr", "sparse_rounds": "rounds",
                "objective": "objective", "refit": "refit", "refit_shrink": "shrink",
                "refit_shrink_to": "shrink_to", "refit_rounds": "refit_rounds"}  # preset key -> Bench.run keyword (every key of every preset)


def shrink_key(refit: str | None, shrink: float | None, shrink_to: str | None) -> tuple | None:
    """The refit's shrinkage as part of a run's identity: None without a refit or without shrinkage (so runs
    recorded before shrinkage existed keep their keys), else (lambda, target)."""
    if refit in (None, "none") or not shrink:
        return None
    return float(shrink), shrink_to or "diag"


def method_spec(spec: str) -> tuple[str, dict]:
    """``"wanda"`` -> ("wanda", {}); ``"armor:quality"`` -> ("armor", Bench.run keywords of PRESETS["quality"])."""
    method, _, preset = spec.partition(":")
    if not preset:
        return method, {}
    if method != "armor" or preset not in PRESETS:
        raise SystemExit(f"--main-methods {spec}: only armor takes a preset, one of {sorted(PRESETS)}")
    return method, {"preset": preset, **{RUN_KEYWORDS[k]: v for k, v in PRESETS[preset].items()}}


def ppls_str(p: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in p.items())


def gap_closed(dense: float, baselines: list[dict], armor: dict, text: str | None = None) -> dict:
    """On ``text`` (default: the first evaluation text, ``perplexity``)."""
    at = (lambda r: r["perplexity"]) if text is None else (lambda r: r["perplexities"][text])  # noqa: E731
    best = min(baselines, key=at)
    denom = at(best) - dense
    value = (at(best) - at(armor)) / denom if denom > 0 and math.isfinite(denom) else None
    return {"best_baseline": best["method"], "best_baseline_ppl": at(best), "armor_ppl": at(armor),
            "dense_ppl": dense, "block_size": armor["block_size"], "iterations": armor["iterations"],
            "value": value, "target": 0.6, "reached": value is not None and value >= 0.6}


def table(runs: list[dict], dense: dict | None) -> str:
    texts = list((dense or {}).get("perplexities") or (runs[0]["perplexities"] if runs else {}))
    lines = [f"| run | calibration | b | iters | {' | '.join(f'ppl {t}' for t in texts)} | mean proxy loss "
             "| A/B overhead | solve s |", "|---|---|---|---|" + "---|" * len(texts) + "---|---|---|"]
    fmt = lambda x, s: "-" if x is None else format(x, s)  # noqa: E731
    ppl = lambda r: " | ".join(fmt(r.get("perplexities", {}).get(t), ".3f") for t in texts)  # noqa: E731
    if dense and dense.get("perplexities"):
        lines.append(f"| dense | - | - | - | {ppl(dense)} | 0 | - | - |")
    for r in runs:
        lines.append(f"| {r['label']} | {r['calibration']} | {fmt(r['block_size'], 'd')} | {fmt(r['iterations'], 'd')} "
                     f"| {ppl(r)} | {fmt(r['mean_loss'], '.4f')} | {100 * r['param_overhead']:.1f}% "
                     f"| {r['solve_seconds']:.1f}{' (reused)' if r.get('reused') or r.get('from') else ''} |")
    return "\n".join(lines)
