"""Human-readable summaries: an artifact's manifest, and the one-shot run's summary files."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from rich.console import Console
from rich.table import Table

from armor_export.artifact import read_manifest
from armor_export.fsutil import atomic_write_text


def artifact_summary(man: dict) -> dict:
    layers = man["layers"]
    starts = [v["loss_start"] for v in layers.values() if v.get("loss_start") is not None]
    finals = [v["loss_final"] for v in layers.values() if v.get("loss_final") is not None]
    params = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    extra = sum(v["block_size"] * (v["shape"][0] + v["shape"][1]) for v in layers.values() if v.get("block_size"))
    cfg = (man.get("solver_config") or {}) if man["method"] == "armor" else {}
    objective = cfg.get("objective", "diag") if man["method"] == "armor" else None
    refit = cfg.get("refit", "none") if man["method"] == "armor" else None
    shrink = cfg.get("refit_shrink", 0.0) if refit not in (None, "none") else None
    shrink_to = cfg.get("refit_shrink_to", "diag") if shrink else None
    return {
        "method": man["method"],
        "objective": objective,  # ARMOR's proxy: the losses below are in this objective, unless refit is "output"
        "refit": refit,  # "output": the losses below are the layers' output losses under the full input Hessian
        "refit_shrink": shrink,  # lambda of the refit's H_lambda = (1 - lambda) H + lambda T: the losses' H
        "refit_shrink_to": shrink_to,  # T: "diag" (diag H) or "block" (H's b x b diagonal blocks)
        "layers": len(layers),
        "fallback_layers": sorted(k for k, v in layers.items() if v.get("status") != "ok"),
        "mean_loss_start": mean(starts) if starts else None,
        "mean_loss_final": mean(finals) if finals else None,
        "early_stopped": sum(bool(v.get("early_stopped")) for v in layers.values()),
        "param_overhead": extra / params if params else 0.0,
        "timing_seconds": man.get("timing_seconds", {}),
    }


def _label(s: dict) -> str:
    """The method, with ARMOR's objective when it is not the paper's and its refit when there is one."""
    extra = [s["objective"]] if s.get("objective") not in (None, "diag") else []
    if s.get("refit") not in (None, "none"):
        extra += [f"output refit, shrink {s['refit_shrink']:g} to {s['refit_shrink_to']}" if s.get("refit_shrink")
                  else "output refit"]
    return s["method"] + (f" ({', '.join(extra)})" if extra else "")


def _loss_name(s: dict) -> str:
    """What the summary's losses measure: the solved proxy, or (with the output refit) the layer's output error."""
    return "mean output loss" if s.get("refit") not in (None, "none") else "mean proxy loss"


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def print_artifact(path: Path, console: Console | None = None) -> None:
    console = console or Console()
    man = read_manifest(path)
    s = artifact_summary(man)
    t = Table(title=f"artifact {path}")
    loss = _loss_name(s)
    for col in ("method", "layers", f"{loss} (NoWag-P start)", f"{loss} (final)", "A/B overhead",
                "fallbacks", "solve s"):
        t.add_column(col)
    t.add_row(_label(s), str(s["layers"]), _fmt(s["mean_loss_start"]), _fmt(s["mean_loss_final"]),
              f"{100 * s['param_overhead']:.1f}%", str(len(s["fallback_layers"])),
              str(s["timing_seconds"].get("solve", "-")))
    console.print(t)


def _per_text(summary: dict) -> list[tuple[str, dict, dict]]:
    """(text name, dense result, pruned result) per evaluated text, in evaluation order."""
    return [(name, d, summary["pruned"][name]) for name, d in summary["dense"].items()]


def write_run_summary(out: Path, artifact: Path, summary: dict) -> None:
    man = read_manifest(artifact)
    full = {**summary, "artifact": str(artifact), "artifact_summary": artifact_summary(man)}
    atomic_write_text(out / "summary.json", json.dumps(full, indent=2, default=str) + "\n")
    s = full["artifact_summary"]
    lines = [
        f"# armor-export run ({_label(s)})", "",
        f"| text | dense perplexity | {_label(s)} perplexity | windows x seqlen | source |", "|---|---|---|---|---|",
        *(f"| {name} | {d['perplexity']:.3f} | {p['perplexity']:.3f} | {d['windows']} x {d['seqlen']} | "
          f"{', '.join(d['files'][:3])}{' ...' if len(d['files']) > 3 else ''} |" for name, d, p in _per_text(summary)),
        "",
        f"- layers: {s['layers']}, fallbacks: {len(s['fallback_layers'])}, A/B overhead "
        f"{100 * s['param_overhead']:.1f}%",
        f"- {_loss_name(s)}: NoWag-P start {_fmt(s['mean_loss_start'])} -> final {_fmt(s['mean_loss_final'])}",
        f"- wall time: {summary['seconds']} s",
    ]
    if "verify" in summary:
        lines.append(f"- engine {summary['engine']}: parity {'PASS' if summary['verify'].get('passed') else 'FAIL'} "
                     f"({summary['verify'].get('report_path')})")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")


def print_run_summary(artifact: Path, summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    s = artifact_summary(read_manifest(artifact))
    t = Table(title="armor-export summary: perplexity")
    for col in ("text", "dense", _label(s), "windows x seqlen"):
        t.add_column(col)
    for name, d, p in _per_text(summary):
        t.add_row(name, f"{d['perplexity']:.3f}", f"{p['perplexity']:.3f}", f"{d['windows']} x {d['seqlen']}")
    console.print(t)
    console.print(f"{_loss_name(s)}: NoWag-P start {_fmt(s['mean_loss_start'])} -> final "
                  f"{_fmt(s['mean_loss_final'])}   A/B overhead {100 * s['param_overhead']:.1f}%")
    if "verify" in summary:
        v = summary["verify"]
        console.print(f"engine {summary['engine']}: parity {'PASS' if v.get('passed') else 'FAIL'} -> {v.get('report_path')}")
    console.print(f"artifact: {artifact}   wall time: {summary['seconds']} s")
