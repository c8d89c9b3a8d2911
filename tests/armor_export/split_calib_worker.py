"""Run by test_split_calibration under torchrun: this rank's pooled statistics -> <out>/rank<r>.safetensors.

argv: model folder, calibration text folder, out folder, samples, seqlen, layerwise (0/1)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from armor_export import shard
from armor_export.config import CalibConfig
from armor_export import calibrate, source
from solver.config import SolverConfig


def main() -> None:
    model, text, out, samples, seqlen, layerwise = sys.argv[1:7]
    dist = shard.init_from_env("cpu")
    loaded = source.load(model, layerwise=layerwise == "1")
    names = source.prunable(loaded, SolverConfig(method="nowag"))
    tokens = calibrate.calibration_windows(loaded.tokenizer, CalibConfig(text=text, samples=int(samples),
                                                                        seqlen=int(seqlen)))
    stats = calibrate.collect_stats(loaded, names, tokens, full=True, progress=False, dist=dist)
    tensors = {f"{n}.h": s.h for n, s in stats.items()} | {f"{n}.H": s.H for n, s in stats.items()}
    save_file({k: v.clone() for k, v in tensors.items()}, str(Path(out) / f"rank{dist.rank}.safetensors"))
    (Path(out) / f"rank{dist.rank}.json").write_text(json.dumps({n: s.n_tokens for n, s in stats.items()}))
    dist.close()


if __name__ == "__main__":
    main()
