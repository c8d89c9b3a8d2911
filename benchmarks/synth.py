"""Synthetic variants of an artifact for benchmarks and engine tests.

``with_random_blocks`` copies an artifact, giving every pruned linear random near-identity A/B
blocks of size b and a small bias (or, with ``identity=True``, dropping A/B). Used to time and test
the A.S.B layout when no solved ARMOR artifact of the wanted block size is at hand; the result is
clearly not solver output (its manifest says ``synthetic_blocks``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from armor_export.artifact import LayerFactors, load_artifact, save_artifact
from solver.factors import Factorization


def with_random_blocks(src: Path, out: Path, *, identity: bool = False, b: int = 8, seed: int = 0,
                       noise: float = 0.1, overwrite: bool = False) -> Path:
    art = load_artifact(src)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for n, lf in art.layers.items():
        S = lf.factors.S
        d_out, d_in = S.shape
        if identity:
            layers[n] = LayerFactors(Factorization(S, None, None), None, dict(lf.info))
            continue
        A = torch.eye(b).repeat(d_out // b, 1, 1) + noise * torch.randn(d_out // b, b, b, generator=g)
        B = torch.eye(b).repeat(d_in // b, 1, 1) + noise * torch.randn(d_in // b, b, b, generator=g)
        layers[n] = LayerFactors(Factorization(S, A, B), 0.01 * torch.randn(d_out, generator=g), dict(lf.info))
    man = {k: v for k, v in art.manifest.items() if k not in ("layers", "files", "model_files")}
    man["synthetic_blocks"] = {"block_size": None if identity else b, "seed": seed, "noise": noise}
    return save_artifact(out, layers=layers, base=art.base, source_dir=art.path, manifest=man, overwrite=overwrite)
