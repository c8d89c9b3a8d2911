"""The solve stage: a layer's weight and input statistics -> its factors (``LayerFactors``), chunk by chunk.

What a unit is (a linear, or a fused group stacked into one layer with one shared B) is decided by
``solve_units``; the math is solver.methods'. Each finished chunk goes to the ``sink`` (the streaming artifact
writer's store, armor_export.writer) as soon as it is solved, so memory holds one chunk at a time. Sequential
calibration interleaves calibrate and solve block by block (``solve_sequential``). ``with_layers`` puts solved
layers into a copy of the model, for evaluating a method without writing an artifact (benchmarks).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from armor_export.adapters import split_name
from armor_export.artifact import LayerFactors
from armor_export.calibration import TokenWindows
from armor_export.config import CalibConfig
from armor_export.shard import block_elements, chunks
from armor_export.source import Loaded
from solver.config import SolverConfig
from solver.fused import split_factorization
from solver.methods import Problem, solve, stats_request
from solver.stats import LayerStats

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
        return loaded.weight(members[0]) if len(members) == 1 else torch.cat([loaded.weight(m) for m in members], 0)

    return [Problem(n, weight(units[n]), None if stats is None else stats[units[n][0]]) for n in names]


def _layer_factors(loaded: Loaded, name: str, result, method: str, stats: LayerStats | None) -> LayerFactors:
    f = result.factors.validated(name)
    info = {"method": method, **result.report.to_dict()}
    if stats is not None:
        info["calib_tokens"] = stats.n_tokens
        info["dropped_tokens"] = stats.dropped_tokens
    return LayerFactors(f, loaded.bias(name), info)


def _member_factors(loaded: Loaded, unit: str, members: tuple[str, ...], result, method: str,
                    stats: LayerStats | None) -> dict[str, LayerFactors]:
    """A solved unit as per-member LayerFactors: a fused group's factorization is split (rows of S, whole
    blocks of A, the shared B; solver.fused), every member's entry naming its group."""
    lf = _layer_factors(loaded, unit if len(members) == 1 else members[0], result, method, stats)
    if len(members) == 1:
        return {unit: lf}
    parts = split_factorization(lf.factors, [loaded.d_out(m) for m in members])
    return {m: LayerFactors(f, loaded.bias(m), {**lf.info, "fused_group": unit}) for m, f in zip(members, parts)}


def solve_dense(loaded: Loaded, names: list[str], stats: dict[str, LayerStats] | None,
                solver_cfg: SolverConfig, store=None, *, progress: bool = False, keep: bool = True,
                groups: Groups | None = None) -> dict[str, LayerFactors]:
    """Solve ``names`` in chunks of same-shaped layers (``shard.chunks``); each finished chunk is
    checkpointed into ``store`` when given (a resume.LayerStore: it is a shard of the artifact). Layers already
    in the store are not solved again. ``groups``: fused groups (all members in ``names``) are solved as one
    stacked layer each and checkpointed in one chunk, so a group is either wholly in the store or not at all;
    ``stats`` needs only each unit's first member. ``keep``: return every layer's factors (loaded from the store
    for finished ones); otherwise (needs a store) nothing is kept, so memory holds one chunk at a time."""
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


def armor_module(lf: LayerFactors) -> nn.Module:
    """The runtime module of one solved layer (engines.torch_module.ArmorLinear)."""
    from engines.torch_module import ArmorLinear

    return ArmorLinear(lf.factors.S, lf.factors.A_blocks, lf.factors.B_blocks, lf.bias)


def with_layers(model: nn.Module, layers: dict[str, LayerFactors]) -> nn.Module:
    """A deep copy of ``model`` (in eval mode) with every linear of ``layers`` replaced by its solved form."""
    from engines.torch_module import set_submodule

    m = copy.deepcopy(model)
    for name, lf in layers.items():
        set_submodule(m, name, armor_module(lf))
    return m.eval()


def solve_sequential(loaded: Loaded, names: list[str], tokens: TokenWindows, solver_cfg: SolverConfig,
                     calib: CalibConfig, progress: bool = True, store=None,
                     groups: Groups | None = None) -> dict[str, LayerFactors]:
    """Block by block: calibrate on the already-pruned prefix, solve the block, swap it in.

    The pruned blocks are swapped in only for the calibration pass: the model's own linears are put
    back afterwards (also on error), so ``loaded.model`` is the dense model again when this returns
    and its state dict holds no ARMOR buffers (``S``, ``A_blocks``, ``B_blocks``)."""
    from armor_export.capture import iterate_blocks
    from engines.torch_module import set_submodule

    fam, out = loaded.family, {}
    originals: dict[str, nn.Module] = {}

    def prune_block(i: int, block: nn.Module, bstats: dict[str, LayerStats]) -> None:
        prefix = f"{fam.layers_path}.{i}."
        mine = [n for n in names if n.startswith(prefix)]
        stats = {n: bstats[n[len(prefix):]] for n in mine}
        out.update(solve_dense(loaded, mine, stats, solver_cfg, store, groups=groups))
        for n in mine:
            originals[n] = loaded.model.get_submodule(n)
            set_submodule(block, n[len(prefix):], armor_module(out[n]))

    try:
        for _ in iterate_blocks(loaded.model, fam, tokens.token_ids, mode="sequential",
                                batch_size=calib.batch_size, prune_block=prune_block, progress=progress,
                                targets=names, device=solver_cfg.device, **stats_request(solver_cfg)):
            pass
    finally:
        for n, module in originals.items():
            set_submodule(loaded.model, n, module)
    return out
