"""Token windows for calibration and evaluation, with provenance.

Documents are tokenised separately (no special tokens, as in the official calibration), joined by
the tokenizer's EOS id when it has one, and cut into non-overlapping windows of ``seqlen`` tokens.
Calibration draws ``n`` of those windows at random with a fixed seed; evaluation takes the first
``n`` in order (GPTQ-style). No BOS is inserted: the model sees running text, as in the paper.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from armor_export.corpus import CorpusError, read_documents


@dataclass(frozen=True)
class TokenWindows:
    token_ids: torch.Tensor  # [n, seqlen] int64
    source: list[str]  # file names
    seed: int | None
    total_tokens: int  # tokens in the whole corpus

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.token_ids.numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        n, t = self.token_ids.shape
        return {"windows": n, "seqlen": t, "seed": self.seed, "files": self.source,
                "corpus_tokens": self.total_tokens, "sha256": self.sha256}


def token_stream(tokenizer, files: list[Path]) -> torch.Tensor:
    return document_stream(tokenizer, read_documents(files))


def document_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i:
            ids.extend(sep)
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def windows(tokenizer, files: list[Path], n: int, seqlen: int, *, seed: int | None, what: str) -> TokenWindows:
    """``n`` windows of ``seqlen`` tokens: random (seeded) when ``seed`` is given, else the first ``n``."""
    return document_windows(tokenizer, read_documents(files), [f.name for f in files], n, seqlen, seed=seed,
                            what=what)


def document_windows(tokenizer, docs: list[str], source: list[str], n: int, seqlen: int, *, seed: int | None,
                     what: str) -> TokenWindows:
    """As ``windows``, from documents already read (a registered corpus); ``source`` names them."""
    if n <= 0 or seqlen <= 1:
        raise ValueError(f"{what}: need at least 1 window of at least 2 tokens (got {n} x {seqlen})")
    stream = document_stream(tokenizer, docs)
    available = stream.numel() // seqlen
    if available < n:
        raise CorpusError(
            f"{what} text has {stream.numel()} tokens = {available} windows of {seqlen}, but {n} were asked for; "
            f"provide more text or lower the window count / length"
        )
    all_windows = stream[: available * seqlen].view(available, seqlen)
    if seed is None:
        picked = all_windows[:n]
    else:
        g = torch.Generator().manual_seed(seed)
        picked = all_windows[torch.randperm(available, generator=g)[:n].sort().values]
    return TokenWindows(picked.contiguous(), source, seed, stream.numel())
