"""PNG plots of benchmark JSON: layer speedup vs token count, and end-to-end tokens/s bars.

``plot_layer(result, png)``: one panel per (suite, layer), speedup over dense against M (log x),
a line per (variant, backend, dtype), with 1.0 and the limit 1/(0.5 + overhead) drawn dashed.
``plot_e2e(result, png)``: tokens/s of dense and ARMOR per phase and engine. matplotlib is
imported lazily (Agg backend); without it the functions return None and say so.
Run:  python -m benchmarks.plot results/bench_layer.json [out.png]
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer(result: dict, png: Path) -> Path | None:
    plt = _pyplot()
    if plt is None or not result["summary"]:
        return None
    panels = sorted({(s["suite"], s["layer"]) for s in result["summary"]},
                    key=lambda k: (k[0], "q k v o gate up down".split().index(k[1])))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (suite, layer) in zip(axes.flat, panels):
        ss = [s for s in result["summary"] if s["suite"] == suite and s["layer"] == layer]
        for dtype in sorted({s["dtype"] for s in ss}):
            for backend in sorted({s["backend"] for s in ss}):
                pts = sorted((s for s in ss if s["dtype"] == dtype and s["backend"] == backend),
                             key=lambda s: s["M"])
                if not pts:
                    continue
                ms = [p["M"] for p in pts]
                ax.plot(ms, [p["speedup_24"] for p in pts], "o--", label=f"2:4 {backend} {dtype}")
                for tag, mark in (("armor", "s-"), ("armor_triton", "^-")):
                    if all(f"speedup_{tag}" in p for p in pts):
                        ax.plot(ms, [p[f"speedup_{tag}"] for p in pts], mark,
                                label=f"{tag.replace('_', '+')} {backend} {dtype}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(ss[0]["limit"], color="red", lw=0.8, ls=":", label="ARMOR limit")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{suite} {layer} ({ss[0]['d_in']}->{ss[0]['d_out']}, b={ss[0]['block_size']})", fontsize=9)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("speedup vs dense")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(f"Layer speedup vs dense on {result['env'].get('device')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(labels) / 4), 1, 0.97))
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def plot_e2e(result: dict, png: Path) -> Path | None:
    plt = _pyplot()
    rows = [r for r in result.get("results", []) if r.get("tokens_per_s")]
    if plt is None or not rows:
        return None
    labels = [f"{r['engine']} {r['phase']}\n{r['model']} {r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    colors = ["tab:blue" if r["model"] == "dense" else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    ax.set_title(f"End to end on {result['env'].get('device')} (blue dense, orange ARMOR)", fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


if __name__ == "__main__":
    res = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(sys.argv[1]).with_suffix(".png")
    fn = plot_layer if res.get("schema", "").endswith("bench-layer") else plot_e2e
    print(fn(res, out))
