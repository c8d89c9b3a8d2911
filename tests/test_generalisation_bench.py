"""benchmarks/generalisation.py: variant parsing, and the fit + held-out statistics merge back into the whole
calibration's (so its whole-model runs refit on the very H the CLI collects)."""
import pytest
import torch

from armor_export.config import CalibConfig
from armor_export import calibrate, source
from benchmarks.generalisation import merged, parse_variants, subset


def test_variants_fill_defaults_and_reject_unknown_keys():
    assert parse_variants("shrink=0.25,to=diag; damp=0.3") == [
        {"shrink": 0.25, "damp": 0.01, "rounds": 6, "to": "diag", "viters": 10, "witers": 5},
        {"shrink": 0.0, "damp": 0.3, "rounds": 6, "to": "block", "viters": 10, "witers": 5}]
    assert parse_variants("rounds=3,viters=5,witers=2")[0] | {"shrink": 0.0} == {
        "shrink": 0.0, "damp": 0.01, "rounds": 3, "to": "block", "viters": 5, "witers": 2}
    assert parse_variants("shrink=0,down_proj.shrink=0.5")[0]["down_proj.shrink"] == 0.5
    with pytest.raises(SystemExit, match="unknown key 'lam'"):
        parse_variants("lam=0.5")


def test_fit_and_held_out_statistics_merge_into_the_whole_calibrations(tiny_model_dir, tiny_text_dir):
    loaded = source.load(str(tiny_model_dir))
    calib = calibrate.calibration_windows(loaded.tokenizer, CalibConfig(text=str(tiny_text_dir / "calib"), samples=4,
                                                                       seqlen=16))
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    get = lambda tw: {n: {"H": s.H, "h": s.h, "n": s.n_tokens}  # noqa: E731
                      for n, s in calibrate.collect_stats(loaded, names, tw, full=True, progress=False).items()}
    whole = get(calib)
    parts = merged(get(subset(calib, slice(0, 3))), get(subset(calib, slice(3, None))))
    for n in names:
        assert parts[n]["n"] == whole[n]["n"] == 64
        # fp32 sums in another order: agreement to rounding (relative 1e-5 of the largest entry)
        for k in ("H", "h"):
            scale = float(whole[n][k].abs().max())
            assert torch.allclose(parts[n][k], whole[n][k], rtol=0, atol=1e-5 * scale), (n, k)


def test_a_presets_bcd_start_is_solved_once_then_read_from_the_cache(tiny_model_dir, tiny_text_dir, tmp_path):
    from armor_export.adapters import target_names
    from benchmarks.generalisation import start_factors

    loaded = source.load(str(tiny_model_dir))
    calib = calibrate.calibration_windows(loaded.tokenizer, CalibConfig(text=str(tiny_text_dir / "calib"), samples=4,
                                                                       seqlen=16))
    names = target_names(loaded.family, 2)[:3]
    st = {n: {"H": s.H, "h": s.h, "n": s.n_tokens}
          for n, s in calibrate.collect_stats(loaded, names, calib, full=True, progress=False).items()}
    first = start_factors(loaded, names, st, "bcd:cpu:1", tmp_path, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["bcd_cpu_diag_300_r1_b16.pt"]
    again = start_factors(loaded, names, st, "bcd:cpu:1", tmp_path, 16)
    for n in names:
        A, S, B = first[n]
        assert A.shape[-1] == B.shape[-1] == 16 and bool(((S != 0).view(S.shape[0], -1, 4).sum(-1) <= 2).all())
        assert all(torch.equal(x, y) for x, y in zip(first[n], again[n]))
    with pytest.raises(SystemExit, match="unknown preset 'fast'"):
        start_factors(loaded, names, st, "bcd:fast", tmp_path, 16)
