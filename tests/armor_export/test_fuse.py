"""Fused q/k/v and gate/up groups (--fuse): one stacked solve with a shared B, split per member, recorded in the
manifest (format 3) and run by the PyTorch runtime as one ArmorLinear and a split."""
from __future__ import annotations

import json

import pytest
import torch

from armor_export import pipeline
from armor_export.adapters import FAMILIES, fuse_groups, parse_fuse
from armor_export.artifact import ArtifactError, load_artifact
from armor_export.config import CalibConfig
from engines.torch_module import ArmorLinear, FusedArmor, load_armor_model
from solver.config import SolverConfig
from solver.factors import Factorization
from solver.fused import split_factorization, stack_factorizations


def test_parse_fuse_and_groups():
    assert parse_fuse("qkv,gate_up") == ("qkv", "gate_up") and parse_fuse("none") == () and parse_fuse("") == ()
    with pytest.raises(ValueError, match="unknown group 'qk'"):
        parse_fuse("qk")
    names = [f"model.layers.0.{n}" for n in FAMILIES["llama"].linears]
    g = fuse_groups(FAMILIES["llama"], names, ("qkv", "gate_up"))
    assert g == {"model.layers.0.self_attn.qkv_proj": tuple(names[:3]), "model.layers.0.mlp.gate_up_proj": tuple(names[4:6])}
    assert fuse_groups(FAMILIES["llama"], names[1:], ("qkv",)) == {}  # q ignored: the group stays unfused
    assert fuse_groups(FAMILIES["phi3"], [f"model.layers.0.{n}" for n in FAMILIES["phi3"].linears], ("qkv",)) == {}


def test_split_and_stack_are_inverse():
    g = torch.Generator().manual_seed(0)
    f = Factorization(torch.randn(24, 16, generator=g), torch.randn(6, 4, 4, generator=g), torch.randn(4, 4, 4, generator=g))
    parts = split_factorization(f, [16, 4, 4])
    assert [p.S.shape[0] for p in parts] == [16, 4, 4] and all(torch.equal(p.B_blocks, f.B_blocks) for p in parts)
    back = stack_factorizations(parts)
    assert torch.equal(back.S, f.S) and torch.equal(back.A_blocks, f.A_blocks)
    assert torch.allclose(torch.cat([p.to_dense() for p in parts]), f.to_dense(), atol=1e-5)
    with pytest.raises(ValueError, match="straddle"):
        split_factorization(f, [18, 6])


@pytest.fixture(scope="module")
def fused_art(tiny_model_dir, tiny_text_dir, tmp_path_factory):
    cfg = SolverConfig(method="armor", block_size=8, iterations=2, sparse_rounds=1)
    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=2, seqlen=16)
    return pipeline.prune(str(tiny_model_dir), cfg, calib, tmp_path_factory.mktemp("f") / "a", progress=False,
                          fuse=("qkv", "gate_up"))


def test_fused_artifact_records_groups_and_shares_b(fused_art):
    man = json.loads((fused_art / "manifest.json").read_text())
    assert man["format_version"] == 3 and man["fuse"] == ["qkv", "gate_up"]
    assert len(man["groups"]) == 2 * 2  # 2 decoder layers x (qkv, gate_up)
    qkv = man["groups"]["model.layers.0.self_attn.qkv_proj"]
    assert qkv["members"][0].endswith("q_proj") and sum(qkv["split"]) == sum(man["layers"][m]["shape"][0] for m in qkv["members"])
    art = load_artifact(fused_art)
    B = [art.layers[m].factors.B_blocks for m in qkv["members"]]
    assert B[0] is not None and all(torch.equal(b, B[0]) for b in B)
    assert art.layers["model.layers.0.self_attn.o_proj"].info.get("fused_group") is None


def test_fused_runtime_matches_the_unfused_form(fused_art):
    fused, _ = load_armor_model(fused_art)
    plain, _ = load_armor_model(fused_art, fused=False)
    assert sum(isinstance(m, FusedArmor) for m in fused.modules()) == 4
    assert sum(isinstance(m, ArmorLinear) for m in fused.modules()) == 2 * 7 - 2 * 5 + 4  # o, down + 4 groups
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fused(ids).logits, plain(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_edited_b_is_refused(fused_art, tmp_path):
    from armor_export.artifact import read_layers
    from armor_export.artifact_write import save_artifact

    art = load_artifact(fused_art)
    layers = read_layers(art)  # in memory: the artifact's own mapping reads each layer afresh
    k = "model.layers.0.self_attn.k_proj"
    f = layers[k].factors
    layers[k].factors = Factorization(f.S, f.A_blocks, f.B_blocks + 1.0)
    man = {x: v for x, v in art.manifest.items() if x not in ("layers", "files", "model_files")}
    bad = save_artifact(tmp_path / "bad", layers=layers, base=art.base, source_dir=art.path, manifest=man)
    with pytest.raises(ArtifactError, match="do not hold the same B_blocks"):
        load_artifact(bad)
