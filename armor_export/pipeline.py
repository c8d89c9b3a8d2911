"""The pipeline stages: load -> calibrate -> solve -> artifact -> evaluate. No math lives here.

Each stage takes configs and paths and returns plain results; the CLI and the benchmarks call
these functions. Engines are reached only by name (``engines.get_lowering``) and only read the
artifact.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from armor_export import __version__
from armor_export.adapters import Family, target_names
from armor_export.artifact import LayerFactors, save_artifact
from armor_export.calibration import TokenWindows, windows
from armor_export.capture import iterate_blocks
from armor_export.config import CalibConfig, EvalConfig, to_dict
from armor_export.corpus import default_split, text_files
from armor_export.evaluate import perplexity
from armor_export.models import load_model, model_id, resolve_model
from solver.blockdiag import check_block_size
from solver.config import SolverConfig
from solver.methods import Problem, get_method, solve
from solver.sparsity import check_24_shape
from solver.stats import LayerStats


@dataclass
class Loaded:
    folder: Path
    model: nn.Module
    tokenizer: object
    family: Family


def load(spec) -> Loaded:
    folder = resolve_model(spec)
    model, tok, family = load_model(folder)
    return Loaded(folder, model, tok, family)


def calibration_windows(tok, cfg: CalibConfig) -> TokenWindows:
    files = default_split()[0] if cfg.text is None else text_files(cfg.text)
    return windows(tok, files, cfg.samples, cfg.seqlen, seed=cfg.seed, what="calibration")


def eval_windows(tok, cfg: EvalConfig) -> TokenWindows:
    files = default_split()[1] if cfg.text is None else text_files(cfg.text)
    return windows(tok, files, cfg.windows, cfg.seqlen, seed=None, what="evaluation")


def check_targets(model: nn.Module, names: list[str], solver_cfg: SolverConfig) -> None:
    """Fail before any work when a target layer cannot be pruned with these settings."""
    uses_blocks = get_method(solver_cfg.method).uses_wrappers
    for n in names:
        lin = model.get_submodule(n)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{n}: expected an nn.Linear, found {type(lin).__name__}")
        check_24_shape(lin.in_features, n)
        if uses_blocks:
            check_block_size(lin.out_features, lin.in_features, solver_cfg.block_size, n)
        w = lin.weight
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"{n}: weight has {bad} NaN/Inf entries; the checkpoint is corrupt")


def collect_stats(loaded: Loaded, names: list[str], tokens: TokenWindows, *, full: bool, batch_size: int = 8,
                  progress: bool = True) -> dict[str, LayerStats]:
    """Dense one-pass statistics for every target (the paper's calibration)."""
    wanted, stats = set(names), {}
    for i, bstats in iterate_blocks(loaded.model, loaded.family, tokens.token_ids, full=full, mode="dense",
                                    batch_size=batch_size, progress=progress):
        for local, st in bstats.items():
            fqn = f"{loaded.family.layers_path}.{i}.{local}"
            if fqn in wanted:
                stats[fqn] = st
    return stats


def _problems(model: nn.Module, names: list[str], stats: dict[str, LayerStats] | None) -> list[Problem]:
    return [Problem(n, model.get_submodule(n).weight.detach().float(), None if stats is None else stats[n])
            for n in names]


def _layer_factors(model: nn.Module, name: str, result, method: str, stats: LayerStats | None) -> LayerFactors:
    f = result.factors.validated(name)
    bias = model.get_submodule(name).bias
    info = {"method": method, **result.report.to_dict()}
    if stats is not None:
        info["calib_tokens"] = stats.n_tokens
        info["dropped_tokens"] = stats.dropped_tokens
    return LayerFactors(f, None if bias is None else bias.detach().float().clone(), info)


def solve_dense(loaded: Loaded, names: list[str], stats: dict[str, LayerStats] | None,
                solver_cfg: SolverConfig) -> dict[str, LayerFactors]:
    results = solve(solver_cfg.method, _problems(loaded.model, names, stats), solver_cfg)
    return {n: _layer_factors(loaded.model, n, r, solver_cfg.method, None if stats is None else stats[n])
            for n, r in zip(names, results)}


def solve_sequential(loaded: Loaded, names: list[str], tokens: TokenWindows, solver_cfg: SolverConfig,
                     calib: CalibConfig, progress: bool = True) -> dict[str, LayerFactors]:
    """Block by block: calibrate on the already-pruned prefix, solve the block, swap it in."""
    from engines.torch_module import ArmorLinear, set_submodule

    fam, out = loaded.family, {}
    full = get_method(solver_cfg.method).needs == "full"

    def prune_block(i: int, block: nn.Module, bstats: dict[str, LayerStats]) -> None:
        prefix = f"{fam.layers_path}.{i}."
        mine = [n for n in names if n.startswith(prefix)]
        stats = {n: bstats[n[len(prefix):]] for n in mine}
        out.update(solve_dense(loaded, mine, stats, solver_cfg))
        for n in mine:
            lf = out[n]
            set_submodule(block, n[len(prefix):], ArmorLinear(lf.factors.S, lf.factors.A_blocks,
                                                              lf.factors.B_blocks, lf.bias))

    for _ in iterate_blocks(loaded.model, fam, tokens.token_ids, full=full, mode="sequential",
                            batch_size=calib.batch_size, prune_block=prune_block, progress=progress):
        pass
    return out


def base_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    pruned = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    sd = {k: v for k, v in model.state_dict().items() if k not in pruned}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def library_versions() -> dict:
    import safetensors
    import transformers

    return {"armor_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def prune(model_spec, solver_cfg: SolverConfig, calib: CalibConfig, out: Path, *, ignore: tuple[str, ...] = (),
          overwrite: bool = False, progress: bool = True, loaded: Loaded | None = None) -> Path:
    """The whole prune stage: model -> calibration -> per-layer solve -> artifact at ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    loaded = loaded or load(model_spec)
    model, fam = loaded.model, loaded.family
    names = target_names(fam, len(model.get_submodule(fam.layers_path)), ignore)
    if not names:
        raise ValueError("no linear layer left to prune (every target matched --ignore)")
    check_targets(model, names, solver_cfg)
    method = get_method(solver_cfg.method)
    tokens, calib_seconds = None, 0.0
    t_cal = time.perf_counter()
    if method.needs == "none":
        layers = solve_dense(loaded, names, None, solver_cfg)
    else:
        tokens = calibration_windows(loaded.tokenizer, calib)
        if calib.mode == "sequential":
            layers = solve_sequential(loaded, names, tokens, solver_cfg, calib, progress)
        else:
            stats = collect_stats(loaded, names, tokens, full=method.needs == "full",
                                  batch_size=calib.batch_size, progress=progress)
            calib_seconds = time.perf_counter() - t_cal
            layers = solve_dense(loaded, names, stats, solver_cfg)
    solve_seconds = time.perf_counter() - t_cal - calib_seconds
    manifest = {
        "created_unix": int(time.time()),
        "source": {"model_id": model_id(loaded.folder), "folder": str(loaded.folder),
                   "model_type": model.config.model_type, "family": fam.name},
        "method": solver_cfg.method,
        "solver_config": solver_cfg.to_dict(),
        "calibration": None if tokens is None else {**tokens.describe(), "mode": calib.mode,
                                                    "config": to_dict(calib)},
        "targets": names,
        "ignore": list(ignore),
        "timing_seconds": {"calibration": round(calib_seconds, 2), "solve": round(solve_seconds, 2),
                           "total": round(time.perf_counter() - t0, 2)},
        "library_versions": library_versions(),
    }
    return save_artifact(out, layers=layers, base=base_tensors(model, names), source_dir=loaded.folder,
                         manifest=manifest, overwrite=overwrite)


def evaluate(model: nn.Module, tok, cfg: EvalConfig, progress: bool = True, desc: str = "perplexity") -> dict:
    tokens = eval_windows(tok, cfg)
    t0 = time.perf_counter()
    ppl = perplexity(model, tokens.token_ids, batch_size=cfg.batch_size, progress=progress, desc=desc)
    return {"perplexity": ppl, "windows": cfg.windows, "seqlen": cfg.seqlen, "seconds": round(time.perf_counter() - t0, 2),
            "eval_sha256": tokens.sha256, "files": tokens.source}


def load_artifact_model(artifact_dir: Path):
    from transformers import AutoTokenizer

    from engines.torch_module import load_armor_model

    model, art = load_armor_model(artifact_dir)
    tok = AutoTokenizer.from_pretrained(artifact_dir, local_files_only=True)
    return model, tok, art
