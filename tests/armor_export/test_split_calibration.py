"""Calibration on a device argument and split over torchrun ranks (issue 18 item 3).

No GPU here: the device argument is tested with "cpu" (bit-identical to the default path) and with "meta"
(proves the hot path puts hidden states, the block and the accumulators on the device asked for, not on a
hard-coded CPU). The split is tested with 2 gloo ranks on the tiny model against one process."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from armor_export.capture import block_inputs, block_stats
from armor_export.config import CalibConfig
from armor_export.shard import window_share
from armor_export import calibrate, source
from solver.config import SolverConfig
from tests.armor_export.test_distributed import cli_env, prune_args

REPO = Path(__file__).resolve().parents[2]
# pooled fp64 sums of the ranks' fp32 running means vs one process's running mean: a few fp32 ulps
STATS_RTOL = 1e-6
# the solver amplifies those ulps: measured up to 3.4e-3 of a factor tensor's largest entry (q_proj A_blocks)
# on the tiny model at 10 iterations, b = 8 (the 2:4 patterns stayed identical)
FACTORS_RTOL = 1e-2


def test_window_share_is_whole_batches_disjoint_and_complete():
    for n, bs, world in [(16, 8, 2), (17, 4, 3), (6, 8, 2), (64, 8, 5), (1, 1, 4)]:
        shares = [window_share(n, bs, r, world) for r in range(world)]
        covered = [i for s in shares for i in range(n)[s]]
        assert covered == list(range(n)), (n, bs, world)
        assert all(s.start % bs == 0 or s.start == s.stop == n for s in shares)
    assert window_share(6, 8, 1, 2) == slice(6, 6)  # fewer batches than ranks: rank 1 runs none
    with pytest.raises(ValueError):
        window_share(4, 0, 0, 1)


def _calib(tiny_model_dir, tiny_text_dir, samples=8):
    loaded = source.load(str(tiny_model_dir))
    names = source.prunable(loaded, SolverConfig(method="nowag"))
    tokens = calibrate.calibration_windows(loaded.tokenizer, CalibConfig(text=str(tiny_text_dir / "calib"),
                                                                        samples=samples, seqlen=32))
    return loaded, names, tokens


def test_device_cpu_is_the_default_path_bit_for_bit(tiny_model_dir, tiny_text_dir):
    loaded, names, tokens = _calib(tiny_model_dir, tiny_text_dir)
    ref = calibrate.collect_stats(loaded, names, tokens, full=True, progress=False)
    for device in ("cpu", torch.device("cpu")):
        got = calibrate.collect_stats(loaded, names, tokens, full=True, progress=False, device=device)
        assert sorted(got) == sorted(ref)
        for n in ref:
            assert torch.equal(got[n].h, ref[n].h) and torch.equal(got[n].H, ref[n].H), n
            assert got[n].h.device.type == "cpu" and got[n].n_tokens == ref[n].n_tokens


def test_device_cpu_layer_by_layer_matches_the_full_load(tiny_model_dir, tiny_text_dir):
    _, names, tokens = _calib(tiny_model_dir, tiny_text_dir)
    full = calibrate.collect_stats(source.load(str(tiny_model_dir)), names, tokens, full=False, progress=False)
    lazy = calibrate.collect_stats(source.load(str(tiny_model_dir), layerwise=True), names, tokens, full=False,
                                  progress=False, device="cpu")
    assert all(torch.equal(full[n].h, lazy[n].h) for n in names)



def test_calibration_runs_on_the_device_asked_for(tiny_model_dir, tiny_text_dir):
    """device="meta" (a device with no data, so nothing can silently fall back to the CPU): the hidden states, the
    block kwargs and the block's outputs are on meta (a hard-coded CPU anywhere in the forward path fails this);
    the accumulators are built on the device given (meta cannot count finite tokens, so they are not fed)."""
    from solver.stats import accumulator

    import copy

    loaded, names, tokens = _calib(tiny_model_dir, tiny_text_dir, samples=2)
    fam, model = loaded.family, loaded.model
    hiddens, kwargs = block_inputs(model, fam, tokens.token_ids, 8, "meta")
    assert hiddens and all(h.is_meta for h in hiddens)
    assert all(t.is_meta for v in kwargs.values() for t in (v if isinstance(v, tuple) else (v,))
               if isinstance(t, torch.Tensor))
    block = copy.deepcopy(model.get_submodule(fam.layers_path)[0]).to("meta")  # as lazy_load builds it there
    _, outs = block_stats(block, fam, hiddens, kwargs, full=False, targets=set(), device="meta")
    assert outs and all(o.is_meta for o in outs)  # the next block's inputs stay on the device
    for kw in ({"full": True}, {"hessian_block": 8}, {}):
        assert {t.device.type for t in accumulator(64, device="meta", **kw).moments()} == {"meta"}


def test_two_rank_split_statistics_equal_one_process(tiny_model_dir, tiny_text_dir, tmp_path):
    """16 windows = 2 batches: each rank runs one, the statistics are all-reduced; both ranks end with the
    statistics of all 16 windows, equal to one process's within STATS_RTOL and with the same token counts."""
    out = tmp_path / "ranks"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(REPO / "tests" / "armor_export" / "split_calib_worker.py"), str(tiny_model_dir),
                        str(tiny_text_dir / "calib"), str(out), "16", "32", "0"],
                       cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded, names, tokens = _calib(tiny_model_dir, tiny_text_dir, samples=16)
    one = calibrate.collect_stats(loaded, names, tokens, full=True, progress=False)
    half = calibrate.collect_stats(loaded, names, dataclasses.replace(tokens, token_ids=tokens.token_ids[:8]),
                                  full=True, progress=False)
    for rank in (0, 1):
        got = load_file(str(out / f"rank{rank}.safetensors"))
        counts = json.loads((out / f"rank{rank}.json").read_text())
        for n in names:
            assert counts[n] == one[n].n_tokens == 2 * half[n].n_tokens, n
            for k, ref in (("h", one[n].h), ("H", one[n].H)):
                err = (got[f"{n}.{k}"] - ref).abs().max() / ref.abs().max()
                assert err <= STATS_RTOL, (rank, n, k, float(err))
            assert not torch.allclose(half[n].h, one[n].h, rtol=1e-3)  # a lone rank's share would fail above


def factor_tensors(art_dir: Path) -> dict[str, torch.Tensor]:
    """Every factor tensor of an artifact, whichever shard holds it."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(art_dir.glob("factors-*-of-*.safetensors")):
        out.update(load_file(str(shard)))
    assert out, f"{art_dir}: no factor shards"
    return out


def test_two_rank_split_calibration_artifact_matches_one_process(tiny_model_dir, tiny_text_dir, tmp_path):
    """The whole prune under torchrun with the calibration split: same 2:4 patterns, same manifest token counts,
    factor values within FACTORS_RTOL of one process's."""
    from armor_export.cli import main

    text = tiny_text_dir / "calib"
    single, multi = tmp_path / "single", tmp_path / "multi"
    def args(out):
        a = prune_args(tiny_model_dir, text, out)
        a[a.index("--calib-samples") + 1] = "16"
        return a

    assert main(args(single)) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "armor_export", *args(multi)], cwd=REPO, env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fa, fb = factor_tensors(single), factor_tensors(multi)  # the shards differ (ranks' chunks); the tensors not
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if fa[k].is_floating_point():
            err = (fa[k] - fb[k]).abs().max() / fa[k].abs().max()
            assert err <= FACTORS_RTOL, (k, float(err))
        else:
            assert torch.equal(fa[k], fb[k]), k  # the packed 2:4 pattern
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (single, multi))
    assert {n: e["calib_tokens"] for n, e in ma["layers"].items()} == \
        {n: e["calib_tokens"] for n, e in mb["layers"].items()}
    assert mb["execution"]["world_size"] == 2
