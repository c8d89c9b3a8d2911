"""The TensorRT-LLM checkpoint of every family in the family table loads back with the artifact's logits.

Tiny random models built from a transformers config (no hub), each with its quirks on: q/k/v biases (made
non-zero in the artifact), a sliding window shorter than the parity sequence, GQA, untied lm_head, Qwen3's
q/k norms, Phi-3's fused projections, Gemma 2's norm offset / embedding scale / soft-capping. The artifact is
synthetic (S = 2:4 magnitude mask of W, A/B = I + noise) so no solver runs.

Tolerance: in fp32 the checkpoint runtime and the artifact runtime run the same operations on the same
values, so logits must be identical (max |diff| == 0). The fp16 checkpoint (same-dtype identity, SQNR >= 35 dB
and top-1 >= 0.95 against fp32) is checked on Llama by ``test_trtllm.py::test_verify_load_back_parity_and_report``
(fp16 matmuls on CPU cost seconds per family).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from armor_export.adapters import FAMILIES, UnsupportedFeature, family_for, model_facts, target_names
from engines import hf_checkpoint as hfc
from engines.base import ExportConfig
from engines.parity import compare, default_tokens
from engines.trtllm import REFUSED, TRTLLM_FAMILIES, TrtllmLowering, artifact_logits
from engines.trtllm_linear import projection_plan

B, SEQ, WINDOW = 8, 16, 8
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=384, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
QUIRKS = {
    "llama": dict(head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": dict(head_dim=16, sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(head_dim=16, attention_bias=True),
    "phi3": dict(sliding_window=WINDOW),
    "gemma2": dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
}


def test_every_family_of_the_table_is_covered():
    assert set(QUIRKS) == set(FAMILIES)


def _artifact(family: str, tiny_model_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from armor_export.artifact import LayerFactors, save_artifact
    from armor_export.pipeline import base_tensors
    from solver.factors import Factorization
    from solver.sparsity import mask_24

    src = out / "model"
    src.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():  # the tiny tokenizer; weights and config are the family's own
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, src / f.name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**BASE, **QUIRKS[family]}))
    model.save_pretrained(src)
    fam = family_for(family)
    names = target_names(fam, model.config.num_hidden_layers)
    g = torch.Generator().manual_seed(1)
    eye = (lambda d: torch.eye(B).expand(d // B, B, B) + 0.05 * torch.randn(d // B, B, B, generator=g))  # noqa: E731
    layers = {}
    for n in names:
        lin = model.get_submodule(n)
        W = lin.weight.detach()
        bias = None if lin.bias is None else 0.05 * torch.randn(W.shape[0], generator=g)  # non-zero biases
        layers[n] = LayerFactors(Factorization(W * mask_24(W.abs()) + 0.0, eye(W.shape[0]), eye(W.shape[1])), bias)
    return save_artifact(out / "art", layers=layers, base=base_tensors(model, names), source_dir=src,
                         manifest={"method": "synthetic"}, overwrite=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_loads_back_with_the_artifact_logits(family, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    art = _artifact(family, tiny_model_dir, tmp_path)
    facts = model_facts(AutoConfig.from_pretrained(art))
    assert facts.sliding or family in ("llama", "qwen3")  # the window is shorter than SEQ where the family has one
    tokens = default_tokens(facts.vocab, SEQ, windows=1)
    ck = hfc.write_checkpoint(art, tmp_path / "ck32", dtype="fp32")
    assert hfc.schema_problems(ck) == []
    got, _ = hfc.checkpoint_logits(ck, tokens)
    ref = artifact_logits(art, tokens, torch.float32)
    assert torch.equal(got, ref), compare(ref, got)

    low, cfg = TrtllmLowering(), ExportConfig()
    if family in TRTLLM_FAMILIES:
        low.requires(art, cfg)
        # the TensorRT-LLM module plan covers exactly the checkpoint's ARMOR tensors, with their shapes
        header = hfc.read_safetensors_header(ck / hfc.WEIGHTS)
        plan = projection_plan(facts, hfc.read_config(ck)["armor"]["layers"])
        seen = {}
        for parts in plan.values():
            for p in parts:
                for key, shape in p.shapes().items():
                    seen[f"{p.name}.{key}"] = list(shape)
        armor_keys = {k for k in header if k.rsplit(".", 1)[0] in hfc.read_config(ck)["armor"]["layers"]}
        assert {k: header[k]["shape"] for k in armor_keys} == seen
    else:
        with pytest.raises(UnsupportedFeature, match=f"family '{family}'.*'trtllm' engine"):
            low.requires(art, cfg)
        assert family in REFUSED
