"""Per family: the parity figures of the matrix test (tests/engines/test_family_matrix.py), as a markdown table.

    python -m benchmarks.family_parity [--out DIR]

Builds the same tiny quirky models (benchmarks.synth.FAMILY_QUIRKS), the same artifacts (calibrated wanda 2:4 +
random A/B blocks and biases) and the "onnx" engine folder, runs its verify on one seeded 40-token window, and
the TensorRT engine's fp16 ONNX in ONNX Runtime CPU; prints logits SQNR, top-1, greedy (ORT KV + genai).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.synth import FAMILY_QUIRKS, family_artifact, sample_text

SEQ = 40


def family_row(root: Path, family: str, text_dir: Path) -> dict:
    from engines import EngineUnavailable
    from engines.base import ExportConfig
    from engines.onnx_engine import OnnxLowering
    from engines.parity import compare, model_logits
    from engines.runners import OrtRunner, logits_feeds
    from engines.tensorrt import TensorRTLowering
    from engines.torch_module import load_armor_model

    art = family_artifact(root, family, text_dir)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, 300, (1, SEQ), generator=g)
    eng = OnnxLowering().lower(art, root / f"{family}-onnx", ExportConfig())
    res = OnnxLowering().verify(art, eng, ExportConfig(parity_tokens=tuple(map(tuple, toks.tolist()))))
    try:
        trt = TensorRTLowering().lower(art, root / f"{family}-trt", ExportConfig(dtype="fp16"))
    except EngineUnavailable:
        trt = root / f"{family}-trt"
    ref = model_logits(load_armor_model(art)[0], toks)
    fp16 = torch.from_numpy(OrtRunner(trt / "onnx").run(logits_feeds(toks.numpy()))["logits"].astype(np.float32))
    f = res["figures"]
    return {"family": family, "passed": res["passed"], "sqnr": f["logits SQNR"], "top1": f["top-1 agreement"],
            "layer": f["per-layer SQNR (min over lowered linears)"],
            "greedy": next(v for k, v in f.items() if k.startswith("greedy")), "fp16": compare(ref, fp16)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    root = a.out or Path(tempfile.mkdtemp(prefix="family_parity_"))
    (root / "text").mkdir(parents=True, exist_ok=True)
    (root / "text" / "a.txt").write_text(sample_text()[:30000])
    rows = [family_row(root, fam, root / "text") for fam in sorted(FAMILY_QUIRKS)]
    print("| family | quirks | fp32 logits SQNR (dB) | min layer SQNR (dB) | top-1 | greedy (ORT KV + genai) | "
          "fp16 TensorRT ONNX in ORT: SQNR (dB) / top-1 | verify |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = ", ".join(f"{k}={v}" for k, v in FAMILY_QUIRKS[r["family"]].items() if k != "rope_scaling")
        if "rope_scaling" in FAMILY_QUIRKS[r["family"]]:
            q += ", llama3 RoPE"
        print(f"| {r['family']} | {q} | {r['sqnr']:.1f} | {r['layer']:.1f} | {r['top1']:.3f} | {r['greedy']} | "
              f"{r['fp16']['sqnr_db']:.1f} / {r['fp16']['top1_agreement']:.3f} | {'PASS' if r['passed'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
