"""TensorRT-LLM engine: ARMOR HF checkpoint schema, 2:4 bytes, load-back parity, registration module.

The artifact here is synthetic (random block-diagonal A/B, S = 2:4 magnitude mask of the tiny
model's weights) so the tests need no solver run. Library tests are marked ``trtllm`` / ``gpu``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engines import hf_checkpoint as hfc
from engines import hf_checkpoint_checks as hfck
from engines.base import ExportConfig

B = 8
# sha256 (first 16 hex digits) of every file of the ``ckpt`` fixture (the synthetic artifact's unfused fp16 checkpoint)
# except the owner marker, as written before fused groups were lowered (commit b7c5069): a checkpoint without fused
# groups must stay byte-identical (format version 2). A deliberate change of the format updates these.
UNFUSED_CKPT_DIGESTS = {
    "config.json": "7aa2a241e5c752a9", "files.sha256": "1a3d16f1b89e109f", "generation_config.json": "30096f1b74816779",
    "model-00001-of-00001.safetensors": "2b0766b6aa84f3a6", "model.safetensors.index.json": "55264c9d83c8d0ff",
    "tokenizer.json": "fb9e7a3a628a4efe", "tokenizer_config.json": "a32c88a67297bb9c"}


def make_artifact(model_dir: Path, out: Path, *, neg_tiny: bool = False, fuse: bool = False) -> Path:
    """Artifact of the tiny model with A = I + noise, B = I + noise, S = 2:4 mask of W. ``fuse``: q/k/v and gate/up
    as fused groups (the stacked weight factorised once, one shared B, split back into the members; manifest
    ``groups``), as ``--fuse qkv,gate_up`` writes them."""
    from transformers import AutoModelForCausalLM

    from armor_export.adapters import FAMILIES, FUSE_KINDS, fuse_groups, target_names
    from armor_export.artifact import LayerFactors
    from armor_export.artifact_write import save_artifact
    from armor_export.source import base_tensors
    from solver.factors import Factorization
    from solver.fused import split_factorization
    from solver.sparsity import mask_24

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    fam = FAMILIES["llama"]
    names = target_names(fam, model.config.num_hidden_layers)
    groups = fuse_groups(fam, names, tuple(FUSE_KINDS)) if fuse else {}
    units = {g: ms for g, ms in groups.items()}
    units.update({n: (n,) for n in names if not any(n in ms for ms in groups.values())})
    g = torch.Generator().manual_seed(1)
    layers = {}
    for unit, members in units.items():
        W = torch.cat([model.get_submodule(n).weight.detach() for n in members])
        S = W * mask_24(W.abs())
        if neg_tiny:  # values that underflow to -0.0 in fp16
            S = torch.where(S != 0, S, torch.zeros_like(S))
            S[0, 0], S[0, 1], S[0, 2], S[0, 3] = -1e-9, 0.0, 0.5, 0.0
        eye = (lambda d: torch.eye(B).expand(d // B, B, B) + 0.05 * torch.randn(d // B, B, B, generator=g))
        f = Factorization(S + 0.0, eye(S.shape[0]), eye(S.shape[1]))
        sizes = [model.get_submodule(n).weight.shape[0] for n in members]
        for n, fn in zip(members, split_factorization(f, sizes) if len(members) > 1 else [f]):
            layers[n] = LayerFactors(fn, info={"fused_group": unit} if unit in groups else {})
    manifest = {"method": "synthetic"}
    if groups:
        manifest.update(fuse=list(FUSE_KINDS), groups={gname: {"members": list(ms), "split": [
            model.get_submodule(m).weight.shape[0] for m in ms]} for gname, ms in groups.items()})
    return save_artifact(out, layers=dict(sorted(layers.items())), base=base_tensors(model, names),
                         source_dir=model_dir, manifest=manifest, overwrite=True)


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory) -> Path:
    return make_artifact(tiny_model_dir, tmp_path_factory.mktemp("trtllm") / "art")


@pytest.fixture(scope="module")
def ckpt(artifact, tmp_path_factory) -> Path:
    from engines.trtllm import TrtllmLowering

    return TrtllmLowering().lower(artifact, tmp_path_factory.mktemp("trtllm") / "ckpt", ExportConfig())


def test_checkpoint_config_schema(ckpt, artifact):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["ArmorLlamaForCausalLM"]
    assert cfg["model_type"] == "llama" and cfg["torch_dtype"] == "float16"
    armor = cfg["armor"]
    assert armor["format"] == hfc.CKPT_FORMAT and armor["format_version"] == hfc.CKPT_VERSION == 2
    assert armor["block_size"] == B and armor["source_architectures"] == ["LlamaForCausalLM"]
    assert set(armor["targets"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert len(armor["layers"]) == 14 and "unfused" in armor["fusion"]
    for f in ("tokenizer.json", "tokenizer_config.json", hfc.WEIGHTS_INDEX, hfc.shard_file(1, 1)):
        assert (ckpt / f).is_file()
    assert hfck.schema_problems(ckpt, __import__("armor_export.artifact").artifact.load_artifact(artifact)) == []


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 (16 hex digits) of every file but the owner marker. A safetensors file is hashed as its header (sorted
    JSON: the order of its metadata keys varies from run to run) and its data bytes; ``files.sha256`` as the file
    names it lists (its hashes follow the shard bytes); the two configs without the ``transformers_version`` that
    transformers stamps into them."""
    import hashlib
    import struct

    from armor_export.hashes import MARKER

    def canonical(p: Path) -> bytes:
        raw = p.read_bytes()
        if p.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", raw[:8])
            return json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode() + raw[8 + n:]
        if p.name == "files.sha256":
            return "\n".join(sorted(line.split()[-1] for line in raw.decode().splitlines())).encode()
        if p.name in ("config.json", "generation_config.json"):  # transformers writes its own version in them
            doc = {k: v for k, v in json.loads(raw).items() if k != "transformers_version"}
            return json.dumps(doc, sort_keys=True).encode()
        return raw

    return {p.name: hashlib.sha256(canonical(p)).hexdigest()[:16] for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MARKER}


def test_unfused_checkpoint_is_byte_identical_to_format_2(ckpt):
    assert file_digests(ckpt) == UNFUSED_CKPT_DIGESTS


def test_checkpoint_tensor_names_shapes_dtypes(ckpt):
    header = hfc.read_headers(ckpt)
    q = "model.layers.0.self_attn.q_proj"
    assert header[f"{q}.S"]["shape"] == [64, 64] and header[f"{q}.A"]["shape"] == [8, B, B]
    down = "model.layers.1.mlp.down_proj"
    assert header[f"{down}.S"]["shape"] == [64, 96]
    assert header[f"{down}.A"]["shape"] == [64 // B, B, B] and header[f"{down}.B"]["shape"] == [96 // B, B, B]
    assert header["model.layers.1.self_attn.k_proj.S"]["shape"] == [32, 64]
    assert not any(k.endswith("_proj.weight") for k in header)
    assert "model.embed_tokens.weight" in header and "model.norm.weight" in header
    assert "lm_head.weight" not in header  # tied
    assert {h["dtype"] for h in header.values()} == {"F16"}
    n_s = sum(k.endswith(".S") for k in header)
    assert n_s == 14 and sum(k.endswith(".A") for k in header) == 14 and sum(k.endswith(".B") for k in header) == 14


def test_every_s_is_24_in_written_bytes(ckpt):
    names = [k for k in hfc.read_headers(ckpt) if k.endswith(".S")]
    rep = hfck.checkpoint_s_report(ckpt, names)
    assert all(r["is_24"] for r in rep.values())
    assert all(r["negative_zeros"] == 0 for r in rep.values())
    assert all(r["zero_fraction"] >= 0.5 for r in rep.values())


def test_bytes_check_catches_dense_and_negative_zero(tmp_path):
    S = torch.tensor([[1.0, 2.0, 3.0, 0.0], [-0.0, 1.0, 0.0, 2.0]], dtype=torch.float16)
    save_file({"x.S": S, "y.S": torch.tensor([[-0.0, 1.0, 0.0, 2.0]], dtype=torch.bfloat16)}, str(tmp_path / "w.st"))
    rep = hfck.s_bytes_report(tmp_path / "w.st", ["x.S", "y.S", "z.S"])
    assert not rep["x.S"]["is_24"] and rep["x.S"]["negative_zeros"] == 1
    assert rep["y.S"]["is_24"] and rep["y.S"]["negative_zeros"] == 1
    assert not rep["z.S"]["present"]


def test_underflow_to_negative_zero_is_normalised(tiny_model_dir, tmp_path):
    art = make_artifact(tiny_model_dir, tmp_path / "art", neg_tiny=True)
    out = hfc.write_checkpoint(art, tmp_path / "ck", dtype="fp16")
    rep = hfck.checkpoint_s_report(out, [f"model.layers.{i}.self_attn.q_proj.S" for i in range(2)])
    assert all(r["negative_zeros"] == 0 and r["is_24"] for r in rep.values())


def test_sharded_checkpoint_equals_one_file(artifact, tmp_path):
    """Small shards: every tensor in exactly one shard, each shard within the limit unless it holds one
    larger tensor, the index complete; the loaded model and the S bytes check are the same as for one shard."""
    from safetensors.torch import load_file

    one = hfc.write_checkpoint(artifact, tmp_path / "one", dtype="fp32")
    limit = 64 * 1024
    many = hfc.write_checkpoint(artifact, tmp_path / "many", dtype="fp32", max_shard_bytes=limit)
    index = json.loads((many / hfc.WEIGHTS_INDEX).read_text())
    shards = sorted(many.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert not (many / hfc.WEIGHTS).exists() and not list(many.glob(".part-*"))
    seen: dict[str, torch.Tensor] = {}
    for p in shards:
        part = load_file(str(p))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= limit or len(part) == 1, p.name
        assert not set(part) & set(seen) and all(index["weight_map"][k] == p.name for k in part)
        seen.update(part)
    ref = load_file(str(one / hfc.shard_file(1, 1)))
    assert sorted(seen) == sorted(ref) and all(torch.equal(seen[k], ref[k]) for k in ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    assert hfck.schema_problems(many, __import__("armor_export.artifact").artifact.load_artifact(artifact)) == []
    tokens = torch.randint(0, 300, (1, 12))
    assert torch.equal(hfc.checkpoint_logits(many, tokens)[0], hfc.checkpoint_logits(one, tokens)[0])
    names = [k for k in seen if k.endswith(".S")]
    assert all(r["is_24"] and r["negative_zeros"] == 0 for r in hfck.checkpoint_s_report(many, names).values())


def test_missing_shard_is_named(artifact, tmp_path):
    many = hfc.write_checkpoint(artifact, tmp_path / "many", dtype="fp32", max_shard_bytes=64 * 1024)
    gone = sorted(many.glob("model-*-of-*.safetensors"))[1]
    gone.unlink()
    problems = hfck.schema_problems(many)
    assert len(problems) == 1 and str(gone) in problems[0] and "incomplete" in problems[0]
    with pytest.raises(hfc.CheckpointError, match=gone.name):
        hfc.load_checkpoint_model(many)


def test_version_1_checkpoint_is_still_read(artifact, tmp_path):
    """A version-1 checkpoint (one model.safetensors, no index) loads to the same logits."""
    from safetensors.torch import load_file, save_file

    new = hfc.write_checkpoint(artifact, tmp_path / "new", dtype="fp32")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    (old / hfc.WEIGHTS_INDEX).unlink()
    (old / hfc.shard_file(1, 1)).rename(old / hfc.WEIGHTS)
    cfg = json.loads((old / "config.json").read_text())
    cfg["armor"]["format_version"] = 1
    (old / "config.json").write_text(json.dumps(cfg))
    assert sorted(load_file(str(old / hfc.WEIGHTS))) == sorted(hfc.read_headers(new))
    save_file(load_file(str(old / hfc.WEIGHTS)), str(old / hfc.WEIGHTS))
    assert hfck.schema_problems(old) == []
    tokens = torch.randint(0, 300, (1, 12))
    assert torch.equal(hfc.checkpoint_logits(old, tokens)[0], hfc.checkpoint_logits(new, tokens)[0])


def test_verify_load_back_parity_and_report(artifact, ckpt, tmp_path):
    from engines.trtllm import TrtllmLowering

    res = TrtllmLowering().verify(artifact, ckpt, ExportConfig(report_dir=tmp_path / "rep", parity_seqlen=32))
    assert res["passed"], res
    doc = json.loads((tmp_path / "rep" / "parity.json").read_text())
    by = {c["name"]: c for c in doc["checks"]}
    loadback = next(c for n, c in by.items() if n.startswith("load-back"))
    assert loadback["value"] == 0.0
    sq = next(c for n, c in by.items() if "SQNR" in n)
    assert sq["passed"] and sq["detail"]["top1_agreement"] >= 0.95
    if __import__("importlib.util").util.find_spec("tensorrt_llm") is None:
        assert by["TensorRT-LLM"]["value"] == "not installed: skipped"
    assert (tmp_path / "rep" / "parity.md").is_file()


def test_fp32_checkpoint_identical_to_artifact_runtime(artifact, tmp_path):
    from engines.trtllm import artifact_logits

    out = hfc.write_checkpoint(artifact, tmp_path / "ck32", dtype="fp32")
    tokens = torch.randint(0, 300, (2, 16))
    got, n_sparse = hfc.checkpoint_logits(out, tokens)
    assert n_sparse == 0
    assert torch.equal(got, artifact_logits(artifact, tokens, torch.float32))


def test_gpu_parity_function_runs_on_cpu_device(ckpt):
    from engines.trtllm_gpu_check import gpu_parity

    res = gpu_parity(ckpt, torch.randint(0, 300, (1, 16)), device="cpu")
    assert res["semi_structured"] == 0 and res["layers"] == 14
    assert all(c.passed for c in res["checks"])


def test_gpu_check_cli_without_cuda_says_why(ckpt):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the no-GPU message path does not apply")
    r = subprocess.run([sys.executable, "-m", "engines.trtllm_gpu_check", str(ckpt)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and "no CUDA device" in r.stderr


# ---- fused groups (--fuse qkv,gate_up): stored once under the native fused name, format 3

@pytest.fixture(scope="module")
def fused_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    return make_artifact(tiny_model_dir, tmp_path_factory.mktemp("trtllm") / "fused-art", fuse=True)


@pytest.fixture(scope="module")
def fused_ckpt(fused_artifact, tmp_path_factory) -> Path:
    from engines.trtllm import TrtllmLowering

    return TrtllmLowering().lower(fused_artifact, tmp_path_factory.mktemp("trtllm") / "fused-ckpt", ExportConfig())


def test_fused_checkpoint_stores_each_group_once(fused_ckpt, fused_artifact):
    """config: format 3, armor.groups = the artifact's groups with their split, armor.layers = the fused names (stacked
    shapes) + o_proj/down_proj; tensors: S the members' S stacked by rows, A their A blocks concatenated, B the one
    shared B (bit-exact after the fp16 cast), no member tensor; the stacked S is 2:4 in the file bytes."""
    from safetensors.torch import load_file

    from armor_export.artifact import load_artifact

    art = load_artifact(fused_artifact)
    armor = json.loads((fused_ckpt / "config.json").read_text())["armor"]
    assert armor["format_version"] == hfc.CKPT_FUSED_VERSION == 3 and armor["fusion"] == hfc.FUSED_NOTE
    assert {g: tuple(r["members"]) for g, r in armor["groups"].items()} == art.groups and len(art.groups) == 4
    qkv, gate_up = "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"
    assert armor["groups"][qkv]["split"] == [64, 32, 32] and armor["groups"][gate_up]["split"] == [96, 96]
    assert sorted(n.split(".", 3)[3] for n in armor["layers"] if ".0." in n) == [
        "mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"]
    assert armor["layers"][qkv] == {"shape": [128, 64], "block_size": B, "has_A": True, "has_B": True,
                                    "has_bias": False}
    tensors = load_file(str(fused_ckpt / hfc.shard_file(1, 1)))
    for g, members in art.groups.items():
        fs = [art.layers[m].factors for m in members]
        assert torch.equal(tensors[f"{g}.S"], torch.cat([f.S for f in fs]).half())
        assert torch.equal(tensors[f"{g}.A"], torch.cat([f.A_blocks for f in fs]).half())
        assert torch.equal(tensors[f"{g}.B"], fs[0].B_blocks.half())
        assert not any(k.startswith(f"{m}.") for m in members for k in tensors)
    assert sum(k.endswith(".B") for k in tensors) == 8  # 4 per layer (was 7: B repeated per member)
    rep = hfck.checkpoint_s_report(fused_ckpt, [f"{n}.S" for n in armor["layers"]])
    assert rep[f"{qkv}.S"]["shape"] == [128, 64] and rep[f"{gate_up}.S"]["shape"] == [192, 64]
    assert all(r["is_24"] and r["negative_zeros"] == 0 for r in rep.values()) and len(rep) == 8
    assert hfck.schema_problems(fused_ckpt, art) == []


def test_fused_checkpoint_logits_match_the_fused_runtime(fused_artifact, fused_ckpt, tmp_path):
    """fp32: identical to the artifact's fused PyTorch runtime (one ArmorLinear per group there too); the fp16
    checkpoint through verify (load-back identical, SQNR / top-1 vs fp32 as for the unfused form)."""
    from engines.torch_module import ArmorLinear, FusedArmor
    from engines.trtllm import TrtllmLowering, artifact_logits

    ck32 = hfc.write_checkpoint(fused_artifact, tmp_path / "ck32", dtype="fp32")
    tokens = torch.randint(0, 300, (2, 16))
    got, _ = hfc.checkpoint_logits(ck32, tokens)
    assert torch.equal(got, artifact_logits(fused_artifact, tokens, torch.float32))
    model, _, _ = hfc.load_checkpoint_model(ck32)
    assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == 8
    assert sum(isinstance(m, FusedArmor) for m in model.modules()) == 4
    res = TrtllmLowering().verify(fused_artifact, fused_ckpt, ExportConfig(report_dir=tmp_path / "rep",
                                                                          parity_seqlen=32))
    assert res["passed"], res
    by = {c["name"]: c for c in json.loads((tmp_path / "rep" / "parity.json").read_text())["checks"]}
    assert next(c for n, c in by.items() if n.startswith("load-back"))["value"] == 0.0
    assert next(c for n, c in by.items() if n.startswith("every S is 2:4"))["value"] == "8/8"


def test_fused_schema_problems_are_named(fused_ckpt, tmp_path):
    def edited(tag, change):
        d = tmp_path / tag
        shutil.copytree(fused_ckpt, d)
        cfg = json.loads((d / "config.json").read_text())
        change(cfg["armor"])
        (d / "config.json").write_text(json.dumps(cfg))
        return hfck.schema_problems(d)

    g = "model.layers.1.self_attn.qkv_proj"
    assert edited("v2", lambda a: a.update(format_version=2)) == [
        "armor.groups present in a format_version 2 checkpoint (fused groups are format_version 3)"]
    bad = edited("split", lambda a: a["groups"][g].update(split=[64, 32, 24]))
    assert bad == [f"fused group {g}: split [64, 32, 24] over members {a_members(g)} does not cover its 128 rows"]
    dup = edited("member", lambda a: a["layers"].update({a_members(g)[0]: a["layers"][g]}))
    assert any(f"member {a_members(g)[0]} is also stored on its own" in p for p in dup)


def a_members(g: str) -> list[str]:
    return [g.replace("qkv_proj", f"{m}_proj") for m in "qkv"]


@pytest.mark.gpu
def test_semi_structured_parity_on_cuda(ckpt):
    from engines.trtllm_gpu_check import gpu_parity

    res = gpu_parity(ckpt, torch.randint(0, 300, (2, 64)))
    assert all(c.passed for c in res["checks"]), res["stats"]


@pytest.mark.gpu
def test_fused_semi_structured_parity_on_cuda(fused_ckpt):
    from engines.trtllm_gpu_check import gpu_parity

    res = gpu_parity(fused_ckpt, torch.randint(0, 300, (2, 64)))
    assert res["layers"] == 8 and all(c.passed for c in res["checks"]), res["stats"]


@pytest.mark.slow
def test_cli_trtllm_end_to_end_default_model(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "armor_export", "--engine", "trtllm", "--out", str(out),
                        "--iterations", "20", "--calib-samples", "8", "--eval-windows", "4"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "trtllm" / "parity.json").read_text())
    assert doc["passed"]
    assert hfck.schema_problems(out / "trtllm") == []
