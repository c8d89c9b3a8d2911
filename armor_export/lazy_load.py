"""Layer-by-layer loading for models that do not fit in memory.

The model is built on the meta device (no memory); only the parts outside the decoder layers
(embeddings, final norm, rotary tables, lm_head) are materialised. During calibration each decoder
layer is built on demand from the safetensors (``safetensors.safe_open``, one tensor at a time, file
closed after), run on the cached hidden states, and sent back to meta. Peak memory is therefore the
non-layer parts + one decoder layer + the calibration hidden states, not the whole model.
Target weights for the solve and the base tensors for the artifact are read the same way, on demand.

Only dense calibration is supported here (sequential mode would have to keep pruned blocks).
Results are identical to the eager path: same modules, same weights (cast to fp32), same inputs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Collection, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from armor_export.adapters import Family, UnsupportedModel
from armor_export.capture import block_inputs, block_stats, block_targets
from armor_export.models import check_complete, check_finite, safetensors_files
from solver.stats import LayerStats

INDEX = "model.safetensors.index.json"


class Checkpoint:
    """Tensor name -> safetensors file of an HF folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e}); restore the model's index file") from None
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        else:
            files = safetensors_files(self.folder)
            self.files = {}
            for f in files:
                with self._open(f) as st:
                    self.files.update({k: f for k in st.keys()})

    @staticmethod
    def _open(f: Path):
        try:
            return safe_open(str(f), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e}); the checkpoint is corrupt or truncated") \
                from None

    def keys(self) -> list[str]:
        return list(self.files)

    def read(self, names, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Copies of the named tensors (cast to ``dtype``); each file is opened once and closed after."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise ValueError(f"{self.folder}: tensor {n!r} not in the checkpoint; it does not match "
                                 f"config.json")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with self._open(f) as st:
                for n in ns:
                    try:
                        t = st.get_tensor(n)
                    except (SafetensorError, OSError) as e:
                        raise ValueError(f"{f}: cannot read tensor {n!r} ({e}); the file is corrupt") from None
                    out[n] = t.to(dtype) if t.is_floating_point() else t.clone()
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the headers (no data read)."""
        out = {}
        for f in sorted(set(self.files.values())):
            with self._open(f) as st:
                out.update({n: tuple(st.get_slice(n).get_shape()) for n in st.keys()})
        return out

    def check_all_finite(self) -> None:
        """Every floating tensor finite, one tensor in memory at a time (once, before any work)."""
        for f in sorted(set(self.files.values())):
            with self._open(f) as st:
                for n in st.keys():
                    check_finite([(n, st.get_tensor(n))], str(f))

    def get(self, name: str) -> torch.Tensor | None:
        return self.read([name])[name] if name in self.files else None


def skeleton(folder: Path, family: Family, ckpt: Checkpoint) -> nn.Module:
    """The model with decoder layers on meta and everything else real and loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    prefix = family.layers_path + "."
    tied = getattr(config, "tie_word_embeddings", False)
    known = [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]
    ignored = [re.compile(r) for r in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = {k for k in set(ckpt.files) - set(known) - ({"lm_head.weight"} if tied else set())
                  if not any(r.search(k) for r in ignored)}  # as transformers' own load ignores them
    files = sorted(set(ckpt.files.values()))
    shapes, sd = ckpt.shapes(), model.state_dict()
    mismatched = {(k, shapes[k], tuple(sd[k].shape)) for k in known if k in shapes and shapes[k] != tuple(sd[k].shape)}
    check_complete({"missing_keys": set(known) - set(ckpt.files), "unexpected_keys": unexpected,
                    "mismatched_keys": mismatched}, files[0] if len(files) == 1 else folder,
                   Path(folder) / "config.json")
    ckpt.check_all_finite()
    rest = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefix)}
    wanted = [k for k in rest if not (tied and k == "lm_head.weight")]
    tensors = ckpt.read(wanted)
    for k, t in tensors.items():
        mod_name, _, attr = k.rpartition(".")
        mod = model.get_submodule(mod_name)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t
    if tied:
        model.tie_weights()
    _rebuild_meta_buffers(model, config, prefix)
    return model


def _rebuild_meta_buffers(model: nn.Module, config, prefix: str) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild their module on CPU."""
    for name, mod in list(model.named_modules()):
        if name.startswith(prefix) or name + "." == prefix:
            continue
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            try:
                fresh = type(mod)(config=config)
            except TypeError as e:
                raise UnsupportedModel(f"layer-by-layer loading cannot rebuild {name} ({type(mod).__name__}): {e}") \
                    from None
            setattr(model.get_submodule(parent) if parent else model, attr, fresh)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta and not n.startswith(prefix)]
    if left:
        raise UnsupportedModel(f"layer-by-layer loading left {left[:5]} unloaded")


def materialize(block: nn.Module, ckpt: Checkpoint, prefix: str, device="cpu") -> nn.Module:
    """Fill a meta decoder layer with its weights from the checkpoint (in place), on ``device``."""
    names = list(block.state_dict().keys())
    if any(b.is_meta for n, b in block.named_buffers() if n not in names):
        raise UnsupportedModel(f"{prefix}: decoder layer has non-persistent buffers; use the full-model load")
    tensors = ckpt.read([prefix + n for n in names])
    block.to_empty(device=device)
    block.load_state_dict({n: tensors[prefix + n] for n in names}, strict=True)
    return block


def iterate_blocks_lazy(model: nn.Module, ckpt: Checkpoint, family: Family, token_ids: torch.Tensor, *,
                        full: bool, batch_size: int = 8, last: int | None = None, hessian_block: int | None = None,
                        progress: bool = True, targets: Collection[str] | None = None, device="cpu",
                        reduce=None) -> Iterator[tuple[int, dict[str, LayerStats]]]:
    """Like ``capture.iterate_blocks`` in dense mode (statistics of ``targets`` only), holding one decoder layer
    at a time, built directly on ``device`` (``reduce``: as there).
    ``last``: stop after this block (nothing later is needed)."""
    layers = model.get_submodule(family.layers_path)
    hiddens, kwargs = block_inputs(model, family, token_ids, batch_size, device)
    n = len(layers) if last is None else last + 1
    for i in tqdm(range(n), desc="calibrate (layer by layer)", disable=not progress):
        block = materialize(layers[i], ckpt, f"{family.layers_path}.{i}.", device)
        try:
            stats, hiddens = block_stats(block, family, hiddens, kwargs, full=full, hessian_block=hessian_block,
                                         targets=block_targets(family, i, targets), device=device, reduce=reduce)
        finally:
            block.to("meta")
        yield i, stats
