"""onnxruntime-genai folder: loads in the real client, generates the PyTorch greedy tokens."""
from __future__ import annotations

import json

import pytest
import torch

from engines.genai import build_genai_folder, generate_genai, generate_genai_text

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def genai_dir(tiny_artifact, tmp_path_factory):
    return build_genai_folder(tiny_artifact, tmp_path_factory.mktemp("genai") / "folder")


def test_folder_layout_matches_graph(genai_dir):
    import onnx

    cfg = json.loads((genai_dir / "genai_config.json").read_text())
    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= {p.name for p in genai_dir.iterdir()}
    m = onnx.load(str(genai_dir / "model.onnx"), load_external_data=False)
    names = {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    dec = cfg["model"]["decoder"]
    n = dec["num_hidden_layers"]
    for i in range(n):
        assert dec["inputs"]["past_key_names"] % i in names and dec["outputs"]["present_value_names"] % i in names
    assert {dec["inputs"]["input_ids"], dec["inputs"]["attention_mask"], dec["inputs"]["position_ids"]} <= names
    assert cfg["search"]["past_present_share_buffer"] is False


def test_genai_generates_pytorch_greedy_tokens(tiny_artifact, genai_dir):
    from engines.torch_module import load_armor_model

    model, _ = load_armor_model(tiny_artifact)
    prompt = [1, 33, 70, 120, 9]
    x = torch.tensor([prompt])
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate_genai(genai_dir, prompt, 8) == ref
    text = generate_genai_text(genai_dir, "the king", 4)  # genai's own tokenizer end to end
    assert isinstance(text, str) and text


@pytest.mark.slow
def test_genai_smollm2_coherent_and_identical(tmp_path):
    from transformers import AutoTokenizer

    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from engines.torch_module import load_armor_model
    from solver.config import SolverConfig

    art = pipeline.prune(None, SolverConfig(method="nowag", block_size=32), CalibConfig(samples=4, seqlen=128),
                         tmp_path / "nowag", progress=False)
    folder = build_genai_folder(art, tmp_path / "genai")
    tok = AutoTokenizer.from_pretrained(art)
    prompt = tok("The king said").input_ids
    model, _ = load_armor_model(art)
    x = torch.tensor([prompt])
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate_genai(folder, prompt, 20) == ref
