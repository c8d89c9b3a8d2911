"""The artifact format: bit-exact round trip, 2:4 in the written bytes, version and hash checks, atomicity."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from armor_export.artifact import (FACTORS_INDEX, MANIFEST, ArtifactError, LayerFactors, load_artifact,
                                   read_manifest, shard_name)
from armor_export.artifact_write import save_artifact
from armor_export.fsutil import atomic_dir, stale_temporaries
from solver.factors import Factorization
from solver.sparsity import mask_24, unpack_24


BASE = {"model.embed_tokens.weight": torch.arange(35, dtype=torch.float32).reshape(7, 5) / 7}


def _layers(d_out=20, d_in=12, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    S = torch.where(mask_24(W.abs()), W, torch.zeros(()))
    S[0, 0:4] = torch.tensor([-0.0, 0.0, 0.0, 0.0])  # a group with no nonzero and a -0.0
    A = torch.randn(d_out // b, b, b, generator=g)
    B = torch.randn(d_in // b, b, b, generator=g)
    return {
        "model.layers.0.mlp.down_proj": LayerFactors(Factorization(S, A, B), torch.randn(d_out, generator=g),
                                                     {"loss_start": 0.5, "loss_final": 0.25}),
        "model.layers.0.mlp.up_proj": LayerFactors(Factorization(S.clone()), None, {"loss_start": 0.5}),
    }


def _save(tmp_path, layers, name="art", **kw):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_text("weights are not copied")
    return save_artifact(tmp_path / name, layers=layers, base=BASE, source_dir=src, manifest={"method": "test"}, **kw)


def test_round_trip_is_bit_exact(tmp_path):
    layers = _layers()
    art = load_artifact(_save(tmp_path, layers))
    assert set(art.layers) == set(layers)
    for name, lf in layers.items():
        got = art.layers[name]
        # storage round trip: exact (bitwise, so -0.0 vs +0.0 would show through signbit below)
        assert torch.equal(got.factors.S, lf.factors.S + 0.0)
        for a, b in ((got.factors.A_blocks, lf.factors.A_blocks), (got.factors.B_blocks, lf.factors.B_blocks),
                     (got.bias, lf.bias)):
            assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(art.base["model.embed_tokens.weight"], BASE["model.embed_tokens.weight"])
    assert (tmp_path / "art" / "config.json").is_file()
    assert not (tmp_path / "art" / "model.safetensors").exists(), "source weights must not be copied"


def test_written_bytes_are_compact_24_with_positive_zeros(tmp_path):
    path = _save(tmp_path, _layers())
    tensors = load_file(str(path / shard_name(1, 1)))
    name = "model.layers.0.mlp.down_proj"
    values, meta = tensors[f"{name}.S_values"], tensors[f"{name}.S_meta"]
    assert values.shape == (20, 6) and meta.shape == (20, 2) and meta.dtype == torch.uint8
    S = unpack_24(values, meta, 12)
    assert ((S.view(-1, 4) != 0).sum(-1) <= 2).all()
    assert not torch.signbit(S[S == 0]).any(), "every zero must be +0.0"
    assert not torch.signbit(values[values == 0]).any()


def test_manifest_records_layers_and_hashes(tmp_path):
    man = read_manifest(_save(tmp_path, _layers()))
    entry = man["layers"]["model.layers.0.mlp.down_proj"]
    assert entry["shape"] == [20, 12] and entry["block_size"] == 4 and entry["has_bias"]
    assert man["layers"]["model.layers.0.mlp.up_proj"]["block_size"] is None
    assert set(man["files"]) == {FACTORS_INDEX, shard_name(1, 1), "base.safetensors", "config.json"}  # every file
    index = json.loads((tmp_path / "art" / FACTORS_INDEX).read_text())
    assert index["weight_map"]["model.layers.0.mlp.down_proj.A_blocks"] == shard_name(1, 1)


def test_other_format_version_is_rejected(tmp_path):
    path = _save(tmp_path, _layers())
    man = json.loads((path / MANIFEST).read_text())
    man["format_version"] = 99
    (path / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="format version 99 is not supported.*upgrade"):
        load_artifact(path)


def test_flipped_byte_names_the_file(tmp_path):
    path = _save(tmp_path, _layers())
    f = path / shard_name(1, 1)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="factors-00001-of-00001.safetensors: sha256 does not match"):
        load_artifact(path)


def test_existing_output_needs_overwrite(tmp_path):
    _save(tmp_path, _layers())
    with pytest.raises(FileExistsError, match="--overwrite"):
        _save(tmp_path, _layers())
    _save(tmp_path, _layers(seed=1), overwrite=True)
    assert load_artifact(tmp_path / "art").layers


def test_failed_write_leaves_nothing_under_final_name(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("crash while writing")
    assert not out.exists() and not stale_temporaries(out)
