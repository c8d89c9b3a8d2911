"""Checks of a checkpoint written by ``engines.hf_checkpoint``: the 2:4 pattern and +0.0 zeros of every S on the
raw bytes of its shard, and the schema (config, index, shards, fused groups) against the artifact it came from.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from armor_export.adapters import family_for
from armor_export.artifact import Artifact
from engines.hf_checkpoint import (CKPT_FUSED_VERSION, CheckpointError, read_config, read_headers,
                                   read_safetensors_header, weight_files)

ABSENT = {"present": False, "is_24": False, "negative_zeros": None}  # s_bytes_report of a tensor not in the file
SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}


def s_bytes_report(weights_file: Path, names: list[str]) -> dict[str, dict]:
    """For every S tensor: 2:4 along the last axis and +0.0 zeros, checked on the raw bytes of the file.

    Zero test on the bit pattern: a value is zero when all bits except the sign are 0; -0.0 is the
    sign bit alone (0x8000 for 16-bit, 0x80000000 for 32-bit)."""
    import numpy as np

    header = read_safetensors_header(weights_file)
    data_start = 8 + struct.unpack("<Q", open(weights_file, "rb").read(8))[0]
    out = {}
    with open(weights_file, "rb") as f:
        for name in names:
            h = header.get(name)
            if h is None:
                out[name] = dict(ABSENT)
                continue
            width = SAFETENSORS_DTYPES.get(h["dtype"])
            if width is None:
                out[name] = {"present": True, "dtype": h["dtype"], "is_24": False, "negative_zeros": None}
                continue
            begin, end = h["data_offsets"]
            f.seek(data_start + begin)
            bits = np.frombuffer(f.read(end - begin), dtype=np.uint16 if width == 2 else np.uint32)
            sign = np.uint16(0x8000) if width == 2 else np.uint32(0x80000000)
            d_in = h["shape"][-1]
            ok_shape = d_in % 4 == 0
            zero = (bits & ~sign) == 0
            nonzero_per_group = (~zero).reshape(-1, 4).sum(axis=1) if ok_shape else None
            out[name] = {"present": True, "dtype": h["dtype"], "shape": h["shape"],
                         "is_24": bool(ok_shape and (nonzero_per_group <= 2).all()),
                         "zero_fraction": float(zero.mean()),
                         "negative_zeros": int((bits == sign).sum())}
    return out


def checkpoint_s_report(ckpt_dir: Path, names: list[str]) -> dict[str, dict]:
    """``s_bytes_report`` over a checkpoint's shards (each S read from the file the index names)."""
    where = weight_files(ckpt_dir)
    out = {n: dict(ABSENT) for n in names if n not in where}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        if n in where:
            by_file.setdefault(where[n], []).append(n)
    for f, ns in by_file.items():
        out.update(s_bytes_report(f, ns))
    return {n: out[n] for n in names}


def schema_problems(ckpt_dir: Path, art: Artifact | None = None) -> list[str]:
    """Everything wrong with a checkpoint's config and tensor table (empty list = valid).

    With ``art`` also compares names and shapes with the artifact it was written from."""
    ckpt_dir = Path(ckpt_dir)
    problems: list[str] = []
    try:
        cfg = read_config(ckpt_dir)
    except (CheckpointError, json.JSONDecodeError) as e:
        return [str(e)]
    armor = cfg["armor"]
    try:
        fam = family_for(cfg.get("model_type"), "config.json")
    except ValueError as e:
        return [str(e)]
    if cfg.get("architectures") != [fam.trtllm_architecture]:
        problems.append(f"architectures {cfg.get('architectures')} != [{fam.trtllm_architecture!r}]")
    for key in ("block_size", "targets", "layers", "s_storage", "fusion"):
        if key not in armor:
            problems.append(f"armor.{key} missing")
    dtype_name = cfg.get("torch_dtype")
    st_dtype = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(dtype_name)
    if st_dtype is None:
        problems.append(f"torch_dtype {dtype_name!r} is not float16/bfloat16/float32")
    try:
        header = read_headers(ckpt_dir)
    except CheckpointError as e:
        return problems + [str(e)]
    for fqn, info in armor.get("layers", {}).items():
        d_out, d_in = info["shape"]
        b = info.get("block_size")
        expect = {f"{fqn}.S": [d_out, d_in]}
        if info.get("has_A"):
            expect[f"{fqn}.A"] = [d_out // b, b, b]
        if info.get("has_B"):
            expect[f"{fqn}.B"] = [d_in // b, b, b]
        if info.get("has_bias"):
            expect[f"{fqn}.bias"] = [d_out]
        for name, shape in expect.items():
            h = header.get(name)
            if h is None:
                problems.append(f"tensor {name} missing")
            elif h["shape"] != shape:
                problems.append(f"tensor {name} has shape {h['shape']}, expected {shape}")
            elif st_dtype and h["dtype"] != st_dtype:
                problems.append(f"tensor {name} has dtype {h['dtype']}, expected {st_dtype}")
        if f"{fqn}.weight" in header:
            problems.append(f"tensor {fqn}.weight present: pruned projections must be stored as A/S/B")
    problems += _group_problems(armor, header)
    if art is not None:
        grouped = {m for ms in art.groups.values() for m in ms}
        if set(armor.get("layers", {})) != (set(art.layers) - grouped) | set(art.groups):
            problems.append("armor.layers does not list exactly the artifact's pruned linears (fused groups under "
                            "their fused name)")
        if {g: tuple(r.get("members", ())) for g, r in armor.get("groups", {}).items()} != art.groups:
            problems.append("armor.groups does not list exactly the artifact's fused groups")
        for name, t in art.base.items():
            h = header.get(name)
            if h is None:
                problems.append(f"base tensor {name} missing")
            elif h["shape"] != list(t.shape):
                problems.append(f"base tensor {name} has shape {h['shape']}, expected {list(t.shape)}")
    return problems


def _group_problems(armor: dict, header: dict) -> list[str]:
    """Fused groups: only in version 3, each a layer of armor.layers whose rows the split covers on block
    boundaries, and no member stored on its own."""
    groups, layers, out = armor.get("groups", {}), armor.get("layers", {}), []
    if groups and armor.get("format_version") != CKPT_FUSED_VERSION:
        out.append(f"armor.groups present in a format_version {armor.get('format_version')} checkpoint (fused groups "
                   f"are format_version {CKPT_FUSED_VERSION})")
    for g, rec in groups.items():
        info, members, split = layers.get(g), list(rec.get("members") or ()), list(rec.get("split") or ())
        if info is None:
            out.append(f"fused group {g} is not in armor.layers")
        elif len(members) < 2 or len(split) != len(members) or sum(split) != info["shape"][0]:
            out.append(f"fused group {g}: split {split} over members {members} does not cover its "
                       f"{info['shape'][0]} rows")
        elif info.get("block_size") and any(n % info["block_size"] for n in split):
            out.append(f"fused group {g}: block size {info['block_size']} does not divide the split {split}")
        for m in members:
            alone = sorted(k for k in header if k.startswith(f"{m}."))
            if m in layers or alone:
                out.append(f"fused group {g}: member {m} is also stored on its own ({alone[:3]})")
    return out


# ---------------------------------------------------------------- the plain PyTorch runtime
