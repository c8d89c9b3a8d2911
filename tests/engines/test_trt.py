"""TensorRT engine: import without the library, profiles, inspector-JSON parsing, the no-TensorRT path.

Sample inspector documents follow the shapes TensorRT writes at ProfilingVerbosity.DETAILED
(8.6 / 10.x: {"Layers": [...], "Bindings": [...]}, fused Myelin regions, "\\x1e"-joined metadata).
Builds need TensorRT and a GPU (markers ``trt`` / ``gpu``).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines import trt_inspect as ti
from engines.tensorrt import BuildSettings, choose_profiles, missing_tensorrt_message, onnx_inputs

ROOT = Path(__file__).resolve().parents[2]
HAVE_TRT = __import__("importlib.util").util.find_spec("tensorrt") is not None


def test_modules_import_without_tensorrt():
    r = subprocess.run([sys.executable, "-c", "import sys, engines.tensorrt, engines.trt_inspect; "
                        "print('tensorrt' in sys.modules)"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_missing_library_message():
    msg = missing_tensorrt_message("/x/onnx/model.onnx")
    if HAVE_TRT:
        assert msg is None
    else:
        assert "pip install tensorrt" in msg and "NVIDIA GPU" in msg and "/x/onnx/model.onnx" in msg
        assert "--sparsity=enable" in msg


# ---------------------------------------------------------------- optimisation profiles

def test_profiles_for_logits_graph():
    inputs = {"input_ids": ["batch_size", "sequence_length"], "attention_mask": ["batch_size", "total_sequence_length"]}
    profs = choose_profiles(inputs, BuildSettings(max_batch=8, max_seq=1024), max_position=8192)
    assert len(profs) == 2
    assert profs[0]["input_ids"] == ((1, 1), (1, 64), (8, 1024))
    assert profs[1]["attention_mask"] == ((1, 1), (4, 512), (8, 1024))


def test_profiles_capped_by_model_and_static_dims():
    inputs = {"input_ids": ["s0", "s1"], "extra": [3, "batch"]}
    profs = choose_profiles(inputs, BuildSettings(max_batch=2, max_seq=4096, opt_points=((4, 512),)), max_position=256)
    assert profs[0]["input_ids"] == ((1, 1), (2, 256), (2, 256))  # positional roles, opt clamped
    assert profs[0]["extra"] == ((3, 1), (3, 2), (3, 2))
    with pytest.raises(ValueError, match="neither batch nor sequence"):
        choose_profiles({"x": ["a", "b", "heads"]})
    with pytest.raises(ValueError):
        BuildSettings(opt_points=())


# ---------------------------------------------------------------- ONNX side

def _graph(tmp_path: Path) -> Path:
    S = np.zeros((8, 4), np.float16)  # [out, in]
    S[:, 0], S[:, 2] = 1, 2
    inits = [numpy_helper.from_array(S, "l0.q_proj.S"), numpy_helper.from_array(S, "l0.k_proj.S"),
             numpy_helper.from_array(np.array([4, 8], np.int64), "shape"),
             numpy_helper.from_array(S.T.copy(), "l0.v_proj.S")]
    nodes = [helper.make_node("Transpose", ["l0.q_proj.S"], ["qT"], perm=[1, 0], name="q/T"),
             helper.make_node("MatMul", ["x", "qT"], ["q"], name="l0.q_proj/S/matmul"),
             helper.make_node("Reshape", ["l0.k_proj.S", "shape"], ["kR"], name="k/R"),
             helper.make_node("MatMul", ["x", "kR"], ["k"], name="k/matmul"),
             helper.make_node("Cast", ["l0.v_proj.S"], ["vC"], to=TensorProto.FLOAT16, name="v/cast"),
             helper.make_node("MatMul", ["x", "vC"], ["v"], name="v/matmul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "seq", 4])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT16, None) for n in "qkv"], inits)
    p = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    return p


def test_s_matmul_nodes_follow_only_cast_and_transpose(tmp_path):
    nodes = ti.s_matmul_nodes(_graph(tmp_path))
    assert nodes == {"l0.q_proj.S": "l0.q_proj/S/matmul", "l0.k_proj.S": None, "l0.v_proj.S": "v/matmul"}
    assert onnx_inputs(tmp_path / "m.onnx") == {"x": ["batch", "seq", 4]}


# ---------------------------------------------------------------- inspector JSON and build log

SAMPLE_ENGINE_JSON = {
    "Layers": [
        {"Name": "model.layers.0.self_attn.q_proj/B/matmul", "LayerType": "CaskGemmMatrixMultiply",
         "Inputs": [{"Name": "x", "Location": "Device", "Dimensions": [-1, 8, 8], "Format/Datatype": "Row major linear FP16"}],
         "Outputs": [{"Name": "xb", "Location": "Device", "Dimensions": [-1, 8, 8], "Format/Datatype": "Row major linear FP16"}],
         "ParameterType": "MatrixMultiply", "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize64x64x64_stage4",
         "TacticValue": "0x2a8f6d3c11"},
        {"Name": "model.layers.0.self_attn.q_proj/S/matmul", "LayerType": "CaskGemmMatrixMultiply",
         "Inputs": [{"Name": "xb"}, {"Name": "model.layers.0.self_attn.q_proj.S"}], "Outputs": [{"Name": "z"}],
         "TacticName": "sm80_xmma_sparse_gemm_f16f16_f16f32_f32_nt_n_tilesize128x128x64_stage3_warpsize2x2x1_sptensor16x8x32",
         "TacticValue": "0x9911", "HasSparseWeights": 1},
        {"Name": "model.layers.0.self_attn.k_proj/S/matmul", "LayerType": "CaskGemmMatrixMultiply",
         "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_nt_n_tilesize64x32x64_stage5", "HasSparseWeights": 1},
        {"Name": "{ForeignNode[model.layers.0.mlp.gate_proj/B/matmul...model.layers.0.mlp.down_proj/A/matmul]}",
         "LayerType": "Myelin",
         "Metadata": "[ONNX Layer: model.layers.0.mlp.gate_proj/S/matmul]\x1e[ONNX Layer: model.layers.0.mlp.up_proj/S/matmul]",
         "TacticName": "", "TacticValue": "0x0000000000000000"},
    ],
    "Bindings": ["input_ids", "attention_mask", "logits"],
}
S_NODES = {f"model.layers.0.{p}.S": f"model.layers.0.{p}/S/matmul"
           for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")}


def test_parse_layers_accepts_all_inspector_shapes():
    full = ti.parse_layers(json.dumps(SAMPLE_ENGINE_JSON))
    assert len(full) == 4 and full[1]["HasSparseWeights"] == 1
    names_only = ti.parse_layers({"Layers": ["a/matmul", "b/matmul"], "Bindings": []})
    assert names_only == [{"Name": "a/matmul"}, {"Name": "b/matmul"}]
    per_layer = ti.parse_layers([json.dumps(SAMPLE_ENGINE_JSON["Layers"][2])])
    assert per_layer[0]["Name"].endswith("k_proj/S/matmul")
    assert ti.parse_layers(SAMPLE_ENGINE_JSON["Layers"][0])[0]["LayerType"] == "CaskGemmMatrixMultiply"


def test_layer_sparsity_keys_and_tactics():
    info = ti.layer_sparsity(SAMPLE_ENGINE_JSON["Layers"][1])
    assert info["sparse_tactic"] and info["sparse_keys"] == {"HasSparseWeights": 1} and info["sparse_flag"]
    dense = ti.layer_sparsity(SAMPLE_ENGINE_JSON["Layers"][0])
    assert not dense["sparse_tactic"] and not dense["sparse_keys"]
    assert ti.layer_sparsity({"Name": "x", "AllowSparse": "false"})["sparse_flag"] is False


def test_parse_sparsity_log():
    log = ["[I] [TRT] (Sparsity) Layers eligible for sparse math: model.layers.0.self_attn.q_proj/S/matmul, "
           "model.layers.0.self_attn.v_proj/S/matmul",
           "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: "
           "model.layers.0.self_attn.v_proj/S/matmul", "[I] [TRT] Total Activation Memory: 123"]
    got = ti.parse_sparsity_log(log)
    assert got["eligible"] == ["model.layers.0.self_attn.q_proj/S/matmul", "model.layers.0.self_attn.v_proj/S/matmul"]
    assert got["picked"] == ["model.layers.0.self_attn.v_proj/S/matmul"]


def test_s_sparsity_report_verdicts():
    log = ti.parse_sparsity_log(["(Sparsity) TRT inference plan picked sparse implementation for layers: "
                                 "model.layers.0.self_attn.v_proj/S/matmul"])
    rep = ti.s_sparsity_report(S_NODES, ti.parse_layers(SAMPLE_ENGINE_JSON), log)
    v = {k.split(".")[-2]: r["verdict"] for k, r in rep.items()}
    assert v == {"q_proj": "sparse", "k_proj": "dense", "v_proj": "sparse", "gate_proj": "unknown",
                 "down_proj": "unknown"}
    gate = rep["model.layers.0.mlp.gate_proj.S"]
    assert gate["layers"] and gate["layers"][0].startswith("{ForeignNode")  # found through Metadata
    assert rep["model.layers.0.mlp.down_proj.S"]["layers"] == []
    assert rep["model.layers.0.self_attn.k_proj.S"]["sparse_keys"] == [{"HasSparseWeights": 1}]
    assert rep["model.layers.0.self_attn.q_proj.S"]["raw"][0]["TacticValue"] == "0x9911"
    assert ti.summarise(rep) == {"s_matmuls": 5, "sparse": 2, "dense": 1, "unknown": 2}


# ---------------------------------------------------------------- the lowering without TensorRT

@pytest.fixture(scope="module")
def small_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from armor_export.adapters import FAMILIES, target_names
    from armor_export.artifact import LayerFactors
    from armor_export.artifact_write import save_artifact
    from armor_export.source import base_tensors
    from solver.factors import Factorization
    from solver.sparsity import mask_24

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = target_names(FAMILIES["llama"], model.config.num_hidden_layers)
    eye = (lambda d: torch.eye(8).expand(d // 8, 8, 8) + 0.05 * torch.randn(d // 8, 8, 8))
    layers = {}
    for n in names:
        W = model.get_submodule(n).weight.detach()
        S = W * mask_24(W.abs()) + 0.0
        layers[n] = LayerFactors(Factorization(S, eye(S.shape[0]), eye(S.shape[1])))
    return save_artifact(tmp_path_factory.mktemp("trt") / "art", layers=layers, base=base_tensors(model, names),
                         source_dir=tiny_model_dir, manifest={"method": "synthetic"})


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the missing-library path does not apply")
def test_cli_without_tensorrt_writes_checked_onnx_and_stops(small_artifact, tmp_path, capsys):
    from armor_export.cli import main

    out = tmp_path / ("deep" * 25) / ("er" * 40) / "trt"  # CI's paths are longer than a laptop's: the line keeps them
    rc = main(["export", "--engine", "tensorrt", "--artifact", str(small_artifact), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "TensorRT is not installed" in err and "pip install tensorrt" in err
    assert (out / "onnx" / "model.onnx").is_file() and str(out / "onnx") in err
    build = json.loads((out / "build.json").read_text())
    assert build["status"] == "not built: tensorrt not installed" and build["s_matmuls"] == 14
    meta = json.loads((out / "onnx" / "onnx_export.json").read_text())
    assert meta["dtype"] == "fp16" and meta["checks"]["s_initializers"] == 14
    nodes = ti.s_matmul_nodes(out / "onnx" / "model.onnx")
    assert len(nodes) == 14 and all(nodes.values())
    from engines.base import ExportConfig
    from engines.tensorrt import TensorRTLowering

    res = TensorRTLowering().verify(small_artifact, out, ExportConfig(report_dir=tmp_path / "rep"))
    assert not res["passed"] and (tmp_path / "rep" / "parity.md").is_file()


@pytest.mark.trt
@pytest.mark.gpu
def test_build_sparse_and_dense_engines(small_artifact, tmp_path):
    from engines.base import ExportConfig
    from engines.tensorrt import TensorRTLowering

    low = TensorRTLowering(BuildSettings(max_batch=2, max_seq=128, opt_points=((1, 16), (2, 128))))
    out = low.lower(small_artifact, tmp_path / "trt")
    for f in ("engine_sparse.plan", "engine_dense.plan", "layers_sparse.json", "sparsity.json"):
        assert (out / f).is_file()
    sp = json.loads((out / "sparsity.json").read_text())
    assert sp["sparse"]["summary"]["s_matmuls"] == 14
    res = low.verify(small_artifact, out, ExportConfig(report_dir=tmp_path / "rep"))
    assert res["passed"], res
