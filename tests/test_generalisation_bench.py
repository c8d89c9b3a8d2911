"""benchmarks/generalisation.py: variant parsing, and the fit + held-out statistics merge back into the whole
calibration's (so its whole-model runs refit on the very H the CLI collects)."""
import pytest
import torch

from armor_export.config import CalibConfig
from armor_export import calibrate, source
from benchmarks.generalisation import merged, parse_variants, subset


def test_variants_fill_defaults_and_reject_unknown_keys():
    assert parse_variants("shrink=0.25,to=diag; damp=0.3") == [
        {"shrink": 0.25, "damp": 0.01, "rounds": 6, "to": "diag"},
        {"shrink": 0.0, "damp": 0.3, "rounds": 6, "to": "block"}]
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
