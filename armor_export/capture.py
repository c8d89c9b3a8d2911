"""Capture calibration statistics of every pruned linear's input, one decoder block at a time.

The model runs up to its first decoder block once (the block's inputs and keyword arguments are
caught with a pre-hook); each block then runs on the cached hidden states with forward pre-hooks on
its linears feeding ``solver.stats`` accumulators. Linears that read the same activation (q/k/v,
gate/up) share one accumulator. Peak memory is one block's activations plus the hidden states.

Two modes:
  dense       (the paper's) every block sees the dense model's activations;
  sequential  (Wanda/SparseGPT style) after a block is pruned it is re-run, so later blocks see the
              error of earlier ones. The caller provides ``prune_block`` for that.
"""
from __future__ import annotations

from typing import Callable, Collection, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from armor_export.adapters import Family
from solver.stats import LayerStats, accumulator

MODES = ("dense", "sequential")


class _Caught(Exception):
    pass


def block_inputs(model: nn.Module, family: Family, token_ids: torch.Tensor, batch_size: int):
    """Hidden states entering block 0 (list of [bs, T, d] tensors) and the shared block kwargs."""
    layers = model.get_submodule(family.layers_path)
    hiddens: list[torch.Tensor] = []
    caught: dict = {}

    def hook(_module, args, kwargs):
        hiddens.append(args[0] if args else kwargs.pop("hidden_states"))
        caught.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Caught

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for i in range(0, token_ids.shape[0], batch_size):
                try:
                    model(input_ids=token_ids[i:i + batch_size], use_cache=False)
                except _Caught:
                    pass
    finally:
        handle.remove()
    caught["use_cache"] = False
    caught.pop("past_key_values", None)
    return hiddens, caught


def run_block(block: nn.Module, hiddens: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for h in hiddens:
            kw = _kwargs_for(kwargs, h)
            out = block(h, **kw)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _kwargs_for(kwargs: dict, h: torch.Tensor) -> dict:
    """Block kwargs caught at batch size B, adapted to this batch (the last one may be smaller)."""
    kw = dict(kwargs)
    bs = h.shape[0]
    mask = kw.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] not in (1, bs):
        kw["attention_mask"] = mask[:bs]
    return kw


def block_targets(family: Family, i: int, targets: Collection[str] | None) -> set[str] | None:
    """Local names of block i's linears among the fully qualified ``targets`` (None: every linear)."""
    if targets is None:
        return None
    prefix = f"{family.layers_path}.{i}."
    return {n[len(prefix):] for n in targets if n.startswith(prefix)}


def block_stats(block: nn.Module, family: Family, hiddens: list[torch.Tensor], kwargs: dict, *,
                full: bool, hessian_block: int | None = None, targets: Collection[str] | None = None
                ) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """Statistics of one block's target linears (local names; ``targets`` None: every linear of the family) and
    the block's outputs: h, plus the full H (``full``) or only its ``hessian_block`` x ``hessian_block`` diagonal
    blocks. A shared input is accumulated once when any linear reading it is a target, never otherwise (an
    ignored linear costs no statistics, and its width need not suit the block size)."""
    accs, handles = {}, []
    for group in family.shared_inputs:
        if targets is not None and not any(n in targets for n in group):
            continue
        lin = block.get_submodule(group[0])
        d_in = lin.in_features
        acc = accumulator(d_in, full=full, hessian_block=hessian_block)
        for name in group:
            if targets is None or name in targets:
                accs[name] = acc
        handles.append(lin.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    try:
        outs = run_block(block, hiddens, kwargs)
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for name, acc in accs.items():
        stats[name] = LayerStats(h=acc.h, n_tokens=acc.n, H=getattr(acc, "H", None), dropped_tokens=acc.dropped,
                                 H_blocks=getattr(acc, "H_blocks", None))
    return stats, outs


def iterate_blocks(model: nn.Module, family: Family, token_ids: torch.Tensor, *, full: bool, mode: str,
                   batch_size: int = 8, hessian_block: int | None = None,
                   prune_block: Callable[[int, nn.Module, dict[str, LayerStats]], None] | None = None,
                   progress: bool = True, targets: Collection[str] | None = None
                   ) -> Iterator[tuple[int, dict[str, LayerStats]]]:
    """Yield (block index, {local linear name: LayerStats}) for every decoder block; with ``targets`` (fully
    qualified names) only the statistics of those linears are built.

    In sequential mode ``prune_block(i, block, stats)`` must replace the block's linears; the block
    is then re-run to produce the next block's inputs."""
    if mode not in MODES:
        raise ValueError(f"capture mode must be one of {MODES}, got {mode!r}")
    if mode == "sequential" and prune_block is None:
        raise ValueError("sequential capture needs a prune_block callback")
    layers = model.get_submodule(family.layers_path)
    hiddens, kwargs = block_inputs(model, family, token_ids, batch_size)
    for i in tqdm(range(len(layers)), desc=f"calibrate ({mode})", disable=not progress):
        block = layers[i]
        stats, outs = block_stats(block, family, hiddens, kwargs, full=full, hessian_block=hessian_block,
                                  targets=block_targets(family, i, targets))
        yield i, stats
        if mode == "sequential":
            prune_block(i, block, stats)
            outs = run_block(block, hiddens, kwargs)
        hiddens = outs
