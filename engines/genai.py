"""The "genai" engine: an onnxruntime-genai folder (model.onnx + data, genai_config.json, tokenizer).

``build_genai_folder`` writes the fp32 KV-cache form of ``engines.onnx_export`` (inputs input_ids,
attention_mask [batch, total_sequence_length], position_ids, past_key_values.%d.key/value; outputs
logits, present.%d.key/value; present = concat(past, new), so past_present_share_buffer is false),
the genai config describing exactly those names, and the artifact's tokenizer files.
``generate_genai`` is the client loop used by verify and tests. onnxruntime-genai is imported only
inside functions that need it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from armor_export.fsutil import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def genai_config(config, *, filename: str = "model.onnx") -> dict:
    heads = config.num_attention_heads
    eos = config.eos_token_id
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else
            (eos[0] if isinstance(eos, list) else eos),
            "context_length": config.max_position_embeddings,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": getattr(config, "head_dim", None) or config.hidden_size // heads,
                "hidden_size": config.hidden_size,
                "num_attention_heads": heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length":
                   config.max_position_embeddings, "min_length": 0, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0},
    }


def build_genai_folder(artifact_dir, out_dir, *, dense: bool = False, overwrite: bool = False) -> Path:
    """Write an onnxruntime-genai folder for the artifact (fp32, CPU); return ``out_dir``."""
    from transformers import AutoConfig

    from engines.onnx_export import export_onnx

    artifact_dir = Path(artifact_dir)
    config = AutoConfig.from_pretrained(artifact_dir)
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        export_onnx(artifact_dir, tmp / "onnx", dtype="fp32", form="kv", dense=dense)
        for f in (tmp / "onnx").iterdir():
            f.rename(tmp / f.name)
        (tmp / "onnx").rmdir()
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(config), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (artifact_dir / name).is_file():
                shutil.copy2(artifact_dir / name, tmp / name)
    return Path(out_dir)


def generate_genai(folder, prompt_ids: list[int], n_new: int) -> list[int]:
    """Greedy decoding of ``n_new`` tokens with onnxruntime_genai; returns the new tokens."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n_new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(list(prompt_ids))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt_ids):]


def generate_genai_text(folder, prompt: str, n_new: int) -> str:
    """Tokenize, generate and decode with genai's own tokenizer (the client path end to end)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    ids = list(tok.encode(prompt))
    return tok.decode(generate_genai(folder, ids, n_new))


class GenaiLowering:
    """The "genai" engine: lower = build_genai_folder; verify = the ONNX parity report on that folder."""

    name = "genai"

    def requires(self, artifact_dir) -> None:
        from engines.onnx_export import requires

        requires(artifact_dir)

    def lower(self, artifact_dir, out_dir, *, dtype: str | None = None, overwrite: bool = False) -> Path:
        if dtype not in (None, "fp32"):
            raise ValueError(f"the genai folder is fp32 (CPU); got dtype {dtype!r}")
        return build_genai_folder(Path(getattr(artifact_dir, "path", artifact_dir)), out_dir, overwrite=overwrite)

    def verify(self, artifact_dir, engine_dir, *, report_dir=None, eval_cfg=None, **kw) -> dict:
        from engines.onnx_verify import verify_onnx

        return verify_onnx(Path(getattr(artifact_dir, "path", artifact_dir)), Path(engine_dir),
                           report_dir=report_dir, eval_cfg=eval_cfg, **kw)
