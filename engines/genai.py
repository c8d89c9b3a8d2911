"""The "genai" engine: an onnxruntime-genai folder (model.onnx + data, genai_config.json, tokenizer).

``build_genai_folder`` writes the fp32 KV-cache form of ``engines.onnx_export`` (inputs input_ids,
attention_mask [batch, total_sequence_length], position_ids, past_key_values.%d.key/value; outputs
logits, present.%d.key/value; present = concat(past, new), so past_present_share_buffer is false),
the genai config describing exactly those names, and the artifact's tokenizer files.
The client loop ``generate_genai`` lives in ``engines.runners`` (re-exported here). onnxruntime-genai
is imported only inside functions that need it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from armor_export.adapters import model_facts, token_ids
from armor_export.fsutil import atomic_dir
from engines.base import ExportConfig
from engines.onnx_export import export_onnx, read_config, requires
from engines.runners import generate_genai

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def genai_config(config, folder=None, *, filename: str = "model.onnx") -> dict:
    """The genai_config.json of our KV-cache graph: sizes from ``model_facts``; bos / eos / pad from
    ``token_ids`` (config.json -> generation_config.json -> tokenizer; bos and pad fall back to eos, since
    genai requires numbers). Sliding windows are applied inside the graph (the attention mask), as the genai
    model builder's own graphs do for CPU/CUDA; ``sliding_window`` is written with both slide options off
    (the form the builder writes for models with local layers), so genai keeps its default KV cache."""
    facts, ids = model_facts(config), token_ids(config, folder)
    if not ids.eos:
        raise ValueError(f"{Path(folder or '.') / 'config.json'}: no eos_token_id in config.json, "
                         f"generation_config.json or the tokenizer; onnxruntime-genai needs one")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": facts.head_dim,
        "hidden_size": facts.hidden,
        "num_attention_heads": facts.heads,
        "num_hidden_layers": facts.num_layers,
        "num_key_value_heads": facts.kv_heads,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                   "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    if facts.sliding:
        decoder["sliding_window"] = {"window_size": max(w for w in facts.windows if w),
                                     "slide_key_value_cache": False, "slide_inputs": False}
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": ids.bos,
            "eos_token_id": list(ids.eos) if len(ids.eos) > 1 else ids.eos[0],
            "pad_token_id": ids.pad,
            "context_length": facts.max_positions,
            "vocab_size": facts.vocab,
            "decoder": decoder,
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length":
                   facts.max_positions, "min_length": 0, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0},
    }


def build_genai_folder(artifact_dir, out_dir, *, dense: bool = False, overwrite: bool = False) -> Path:
    """Write an onnxruntime-genai folder for the artifact (fp32, CPU); return ``out_dir``."""
    artifact_dir = Path(artifact_dir)
    config = read_config(artifact_dir)
    requires(artifact_dir, "genai")
    cfg_json = genai_config(config, artifact_dir)  # before any file is written: a missing eos fails here
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        export_onnx(artifact_dir, tmp / "onnx", dtype="fp32", form="kv", dense=dense)
        for f in (tmp / "onnx").iterdir():
            f.rename(tmp / f.name)
        (tmp / "onnx").rmdir()
        (tmp / "genai_config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (artifact_dir / name).is_file():
                shutil.copy2(artifact_dir / name, tmp / name)
    return Path(out_dir)


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

    def requires(self, artifact_dir, cfg: ExportConfig = ExportConfig()) -> None:
        requires(artifact_dir, self.name, dtypes=("fp32",), dtype=cfg.dtype)

    def lower(self, artifact_dir, out_dir, cfg: ExportConfig = ExportConfig()) -> Path:
        self.requires(artifact_dir, cfg)
        return build_genai_folder(Path(artifact_dir), out_dir, overwrite=cfg.overwrite)

    def verify(self, artifact_dir, engine_dir, cfg: ExportConfig = ExportConfig()) -> dict:
        from engines.onnx_verify import verify_onnx

        return verify_onnx(Path(artifact_dir), Path(engine_dir), cfg)
