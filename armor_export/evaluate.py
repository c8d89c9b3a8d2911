"""Token-level perplexity over fixed windows (GPTQ style).

ppl = exp(mean over windows of the window's mean next-token cross-entropy); each window is scored
alone, its mean taken over seqlen - 1 shifted targets. Not comparable with lm-eval's word
perplexity nor across window lengths: always report the window count and length with the number.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def window_nll(model, token_ids: torch.Tensor, *, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> torch.Tensor:
    """Mean cross-entropy per window, [n_windows] fp64."""
    device = next(model.parameters(), torch.empty(0)).device
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, token_ids.shape[0], batch_size), desc=desc, disable=not progress):
            ids = token_ids[i:i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="none").view(ids.shape[0], -1)
            out.append(ce.mean(1).double().cpu())
    return torch.cat(out)


def perplexity(model, token_ids: torch.Tensor, **kw) -> float:
    nll = window_nll(model, token_ids, **kw)
    if not torch.isfinite(nll).all():
        return math.inf
    return float(torch.exp(nll.mean()))
