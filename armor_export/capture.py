"""Capture calibration statistics of every pruned linear's input, one decoder block at a time.

The model runs up to its first decoder block once (the block's inputs and keyword arguments are
caught with a pre-hook); each block then runs on the cached hidden states with forward pre-hooks on
its linears feeding ``solver.stats`` accumulators. Linears that read the same activation (q/k/v,
gate/up) share one accumulator. Peak memory is one block's activations plus the hidden states.

Device: ``device`` (the solver's ``--device``) is where the forward passes and the accumulators run. The model
stays where it was loaded; each block is moved there for its pass and back after (layer by layer, so a model
larger than the device's memory calibrates too), the hidden states live there between blocks, and each layer's
statistics are moved back to the CPU once, when the block is done. The CPU path is the same code with
``device="cpu"`` (no copies then).

Split calibration: ``reduce(accumulators)`` (``shard.all_reduce_accumulators`` under torchrun) is called on
each block's accumulators before their statistics are read, so ranks that each ran a share of the windows
end with the statistics of all of them.

Two modes:
  dense       (the paper's) every block sees the dense model's activations;
  sequential  (Wanda/SparseGPT style) after a block is pruned it is re-run, so later blocks see the
              error of earlier ones. The caller provides ``prune_block`` for that.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Collection, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from armor_export.adapters import Family
from solver.stats import LayerStats, accumulator

MODES = ("dense", "sequential")
Reduce = Callable[[list], None]  # in place, on one block's accumulators


class _Caught(Exception):
    pass


def to_device(obj, device):
    """``obj`` with every tensor in it (nested tuples, lists, dicts) on ``device``; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def on_device(block: nn.Module, device):
    """``block`` moved to ``device`` for the ``with`` body and back to where its weights were after (also on
    error); nothing moves when it is already there."""
    first = next(iter(block.parameters()), None)
    home = None if first is None else first.device
    if home is None or home == torch.device(device):
        yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


def block_inputs(model: nn.Module, family: Family, token_ids: torch.Tensor, batch_size: int, device=None):
    """Hidden states entering block 0 (list of [bs, T, d] tensors, on ``device``: default where the model's
    embeddings are) and the shared block kwargs (on ``device`` too). The part before block 0 runs where it was
    loaded (embeddings: a lookup)."""
    layers = model.get_submodule(family.layers_path)
    hiddens: list[torch.Tensor] = []
    caught: dict = {}

    def hook(_module, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        hiddens.append(h if device is None else h.to(device))
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
    return hiddens, (caught if device is None else to_device(caught, device))


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
                full: bool, hessian_block: int | None = None, targets: Collection[str] | None = None,
                device=None, reduce: Reduce | None = None) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """Statistics of one block's target linears (local names; ``targets`` None: every linear of the family) and
    the block's outputs: h, plus the full H (``full``) or only its ``hessian_block`` x ``hessian_block`` diagonal
    blocks. A shared input is accumulated once when any linear reading it is a target, never otherwise (an
    ignored linear costs no statistics, and its width need not suit the block size).
    ``device``: where the block runs and the accumulators live (default: where the hidden states are); the
    statistics come back on the CPU. ``reduce``: called on the block's accumulators (in ``family.shared_inputs``
    order) before they are read, e.g. to sum them over ranks."""
    if device is None:
        device = hiddens[0].device if hiddens else torch.device("cpu")
    accs, handles = {}, []
    for group in family.shared_inputs:
        if targets is not None and not any(n in targets for n in group):
            continue
        lin = block.get_submodule(group[0])
        d_in = lin.in_features
        acc = accumulator(d_in, full=full, hessian_block=hessian_block, device=device)
        for name in group:
            if targets is None or name in targets:
                accs[name] = acc
        handles.append(lin.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    try:
        with on_device(block, device):
            outs = run_block(block, hiddens, kwargs)
    finally:
        for h in handles:
            h.remove()
    unique = list({id(a): a for a in accs.values()}.values())
    if reduce is not None:
        reduce(unique)
    host = {id(a): _host_stats(a) for a in unique}  # one copy to the CPU per accumulator, shared by its linears
    return {name: host[id(acc)] for name, acc in accs.items()}, outs


def _host_stats(acc) -> LayerStats:
    H, Hb = getattr(acc, "H", None), getattr(acc, "H_blocks", None)
    return LayerStats(h=acc.h.cpu(), n_tokens=acc.n, H=None if H is None else H.cpu(), dropped_tokens=acc.dropped,
                      H_blocks=None if Hb is None else Hb.cpu())


def iterate_blocks(model: nn.Module, family: Family, token_ids: torch.Tensor, *, full: bool, mode: str,
                   batch_size: int = 8, hessian_block: int | None = None,
                   prune_block: Callable[[int, nn.Module, dict[str, LayerStats]], None] | None = None,
                   progress: bool = True, targets: Collection[str] | None = None, device=None,
                   reduce: Reduce | None = None) -> Iterator[tuple[int, dict[str, LayerStats]]]:
    """Yield (block index, {local linear name: LayerStats}) for every decoder block; with ``targets`` (fully
    qualified names) only the statistics of those linears are built.

    In sequential mode ``prune_block(i, block, stats)`` must replace the block's linears; the block
    is then re-run to produce the next block's inputs. ``device``/``reduce``: see the module docstring (default:
    where the model is, no reduction)."""
    if mode not in MODES:
        raise ValueError(f"capture mode must be one of {MODES}, got {mode!r}")
    if mode == "sequential" and prune_block is None:
        raise ValueError("sequential capture needs a prune_block callback")
    layers = model.get_submodule(family.layers_path)
    hiddens, kwargs = block_inputs(model, family, token_ids, batch_size, device)
    for i in tqdm(range(len(layers)), desc=f"calibrate ({mode})", disable=not progress):
        block = layers[i]
        stats, outs = block_stats(block, family, hiddens, kwargs, full=full, hessian_block=hessian_block,
                                  targets=block_targets(family, i, targets), device=device, reduce=reduce)
        yield i, stats
        if mode == "sequential":
            prune_block(i, block, stats)
            with on_device(block, device or (hiddens[0].device if hiddens else "cpu")):
                outs = run_block(block, hiddens, kwargs)
        hiddens = outs
