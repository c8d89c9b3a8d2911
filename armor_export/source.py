"""The load stage: the source model, whole in memory or as a skeleton read layer by layer, and its targets.

``Loaded`` is what every later stage reads the source through: a weight, a bias, the calibration blocks and
the tensors no pruned linear owns. How the layers are loaded is a strategy chosen once, in ``load``
(``lazy``: an armor_export.lazy_load.Checkpoint when the decoder layers are read one at a time); the stages do
not branch on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from armor_export.adapters import Family, target_names
from armor_export.capture import iterate_blocks
from armor_export.models import load_model, load_tokenizer, read_family, resolve_model
from solver.blockdiag import check_block_size
from solver.config import SolverConfig
from solver.methods import get_method
from solver.sparsity import check_24_shape


@dataclass
class Loaded:
    folder: Path
    model: nn.Module
    tokenizer: object
    family: Family
    lazy: object = None  # lazy_load.Checkpoint when layers are loaded one at a time (model is a skeleton)

    def weight(self, name: str) -> torch.Tensor:
        """The fp32 weight of linear ``name`` (read from the checkpoint when the model is a skeleton)."""
        if self.lazy is not None:
            return self.lazy.read([f"{name}.weight"])[f"{name}.weight"]
        return self.model.get_submodule(name).weight.detach().float()

    def bias(self, name: str) -> torch.Tensor | None:
        if self.lazy is not None:
            return self.lazy.get(f"{name}.bias")
        bias = self.model.get_submodule(name).bias
        return None if bias is None else bias.detach().float().clone()

    def d_out(self, name: str) -> int:
        return int(self.model.get_submodule(name).weight.shape[0])

    def blocks(self, token_ids: torch.Tensor, *, last: int, **kw):
        """The dense calibration pass over the decoder blocks up to ``last`` (armor_export.capture.iterate_blocks,
        or its layer-by-layer twin that loads one block at a time): yields ``(block index, {local name: stats})``."""
        if self.lazy is not None:
            from armor_export.lazy_load import iterate_blocks_lazy

            return iterate_blocks_lazy(self.model, self.lazy, self.family, token_ids, last=last, **kw)
        return iterate_blocks(self.model, self.family, token_ids, mode="dense", **kw)

    def base_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return base_tensors(self.model, names, self.lazy)


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
    return loaded.weight(name)


def bias_of(loaded: Loaded, name: str) -> torch.Tensor | None:
    return loaded.bias(name)


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
    check_targets(loaded.model, names, solver_cfg, None if loaded.lazy is None else loaded.weight)
    return names


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
