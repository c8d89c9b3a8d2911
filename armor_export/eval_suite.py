"""Evaluation on several texts at once: the registered corpora (in-domain and out-of-domain) and user texts.

``evaluate_corpora(model, tokenizer)`` is the short form for benchmarks: perplexity per corpus name.
``eval_configs`` turns the CLI's --eval-text / --eval-corpus / --eval-windows into one EvalConfig per text;
``evaluate_all`` scores a model on each and returns the per-text result dicts, keyed by ``EvalConfig.name``.
"""
from __future__ import annotations

from armor_export.config import EvalConfig
from armor_export.corpus import CORPORA, get_corpus


def eval_configs(texts=(), corpora=None, *, windows: int | None = None, seqlen: int = 512,
                 batch_size: int = 1) -> list[EvalConfig]:
    """Texts first, then corpora. ``corpora`` None = every registered corpus when no text is given, else none.
    ``windows`` None = each corpus's ``run_windows`` (32 for a text)."""
    if corpora is None:
        corpora = () if texts else tuple(CORPORA)
    cfgs = [EvalConfig(text=str(t), windows=windows or 32, seqlen=seqlen, batch_size=batch_size) for t in texts]
    cfgs += [EvalConfig(corpus=c, windows=windows or get_corpus(c).run_windows, seqlen=seqlen,
                        batch_size=batch_size) for c in corpora]
    if not cfgs:
        raise ValueError("nothing to evaluate: pass --eval-text PATH or --eval-corpus NAMES")
    labels(cfgs)  # fails on a text given twice
    return cfgs


def labels(cfgs: list[EvalConfig]) -> list[str]:
    """Unique labels: the config's name, or the text's full path where two names collide."""
    names = [c.name for c in cfgs]
    out = [n if names.count(n) == 1 else (c.text or n) for n, c in zip(names, cfgs)]
    if len(set(out)) != len(out):
        raise ValueError(f"the evaluation texts {out} are given more than once")
    return out


def prepare(tok, cfgs: list[EvalConfig]) -> dict:
    """{label: (EvalConfig, TokenWindows)}: tokenise every text once, to score several models on it."""
    from armor_export import pipeline

    return {lab: (c, pipeline.eval_windows(tok, c)) for lab, c in zip(labels(cfgs), cfgs)}


def score(model, prepared: dict, *, progress: bool = True, desc: str = "perplexity") -> dict:
    """{label: result} for windows from ``prepare``; a result is what ``pipeline.evaluate`` returns."""
    from armor_export.pipeline import window_result

    return {lab: window_result(model, c, w, progress=progress, desc=f"{desc} {lab}")
            for lab, (c, w) in prepared.items()}


def evaluate_all(model, tok, cfgs: list[EvalConfig], *, progress: bool = True, desc: str = "perplexity") -> dict:
    """{label: pipeline.evaluate result} for each config, in order."""
    return score(model, prepare(tok, cfgs), progress=progress, desc=desc)


def evaluate_corpora(model, tokenizer, corpora=None, *, windows: int = 32, seqlen: int = 512,
                     progress: bool = False) -> dict[str, float]:
    """Perplexity per registered corpus (default: all), ``windows`` x ``seqlen`` tokens each."""
    cfgs = eval_configs((), tuple(corpora) if corpora is not None else tuple(CORPORA), windows=windows,
                        seqlen=seqlen)
    return {k: v["perplexity"] for k, v in evaluate_all(model, tokenizer, cfgs, progress=progress).items()}
