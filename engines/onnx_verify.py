"""Deployment parity of the ONNX / genai engine against the artifact's PyTorch runtime.

``verify_onnx(artifact_dir, engine_dir)`` accepts the folder written by ``OnnxLowering.lower``
(``logits/`` + ``genai/``) or a single ``export_onnx`` / ``build_genai_folder`` folder, and checks:
  * per lowered linear, SQNR of its ONNX output (``{fqn}.out``, fetched as an extra graph output of a
    probe copy of the model) against the PyTorch ArmorLinear output on the same window;
  * end-to-end logits (max abs, max rel, SQNR), top-1 agreement, perplexity PyTorch vs ONNX on the
    held-out windows (``eval_cfg``, at most ``max_windows``);
  * greedy generation from a few prompts: PyTorch ``generate`` vs the KV-cache graph in ORT and via
    onnxruntime-genai when a genai folder is present;
  * 2:4 / +0.0 / direct-MatMul check of every S initializer (``engines.onnx_checks``), polygraphy if
    installed; library versions. Tolerances depend on the graph precision (``TOLERANCES``).
The report goes through ``engines.parity.write_report`` (parity.json / .md / .png).
"""
from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from engines.parity import Check, error_stats, write_report

# Floors/ceilings per graph precision, set from measured baselines on the tiny and SmolLM2 artifacts
# (fp32: ~130 dB logits SQNR, identical greedy tokens; fp16: ~60 dB tiny). Reference is PyTorch fp32.
TOLERANCES = {
    "fp32": {"layer_sqnr_db": 60.0, "logits_sqnr_db": 60.0, "max_rel": 1e-3, "top1": 0.999, "ppl_rel": 1e-4},
    "fp16": {"layer_sqnr_db": 30.0, "logits_sqnr_db": 30.0, "max_rel": 5e-2, "top1": 0.97, "ppl_rel": 1e-2},
    "bf16": {"layer_sqnr_db": 20.0, "logits_sqnr_db": 20.0, "max_rel": 2e-1, "top1": 0.90, "ppl_rel": 5e-2},
}
PROMPTS = ("The king said", "To be, or not to be", "My lord, I pray you")
ONNX_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}  # TensorProto elem types


def _find(engine_dir: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(logits-form folder, kv-form folder, genai folder) inside ``engine_dir``."""
    from engines.onnx_export import read_meta

    cands = [engine_dir, engine_dir / "logits", engine_dir / "genai", engine_dir / "kv"]
    logits = kv = genai = None
    for c in cands:
        meta = read_meta(c)
        if not meta:
            continue
        if meta["form"] == "logits" and logits is None:
            logits = c
        if meta["form"] == "kv" and kv is None:
            kv = c
            if (c / "genai_config.json").is_file():
                genai = c
    if logits is None and kv is None:
        raise FileNotFoundError(f"{engine_dir}: no ONNX export found (expected onnx_export.json in it, "
                                f"logits/ or genai/)")
    return logits, kv, genai


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnx-ir",
                "onnxscript", "numpy", "polygraphy", "armor-export"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def layer_probe(folder: Path, names: list[str], dtype: str, feeds: dict) -> dict[str, np.ndarray]:
    """Run a copy of the model that also outputs ``{fqn}.out`` for every name (same weights file)."""
    import onnx

    from engines.runners import OrtRunner

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    produced = {o for n in m.graph.node for o in n.output}
    wanted = [f"{n}.out" for n in names if f"{n}.out" in produced]
    for w in wanted:
        m.graph.output.append(onnx.helper.make_tensor_value_info(w, ONNX_TYPES[dtype], None))
    probe = folder / ".parity_probe.onnx"
    try:
        onnx.save(m, str(probe))
        return OrtRunner(probe).run(feeds, outputs=wanted)
    finally:
        probe.unlink(missing_ok=True)


def _torch_layer_outputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    from engines.torch_module import ArmorLinear

    outs, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, (ArmorLinear, torch.nn.Linear)) and name != "lm_head":
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: outs.__setitem__(name, o.detach().reshape(-1, o.shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    return outs


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                            ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def verify_onnx(artifact_dir: Path, engine_dir: Path, *, report_dir=None, eval_cfg=None, max_windows: int = 4,
                gen_tokens: int = 16, prompts=PROMPTS) -> dict:
    from transformers import AutoTokenizer

    from armor_export.config import EvalConfig
    from armor_export.pipeline import eval_windows
    from engines.genai import generate_genai
    from engines.onnx_checks import check_s_initializers, polygraphy_sparsity
    from engines.onnx_export import read_meta
    from engines.runners import OrtRunner, greedy_kv, logits_feeds
    from engines.torch_module import load_armor_model

    artifact_dir, engine_dir = Path(artifact_dir), Path(engine_dir)
    logits_dir, kv_dir, genai_dir = _find(engine_dir)
    main_dir = logits_dir or kv_dir
    meta = read_meta(main_dir)
    dtype, dense = meta["dtype"], meta["dense"]
    tol = TOLERANCES[dtype]
    model, art = load_armor_model(artifact_dir)
    tok = AutoTokenizer.from_pretrained(artifact_dir)
    cfg = eval_cfg or EvalConfig(windows=max_windows, seqlen=128)
    ids_all = eval_windows(tok, EvalConfig(text=cfg.text, windows=min(cfg.windows, max_windows),
                                           seqlen=cfg.seqlen)).token_ids
    checks: list[Check] = []
    runnable, why_not = True, ""
    try:
        runner = OrtRunner(main_dir)
        kvfeeds = {}
        if kv_dir is not None and main_dir == kv_dir:
            past, (kvh, d), npdt = runner.past_spec()
            kvfeeds = {n: np.zeros((1, kvh, 0, d), npdt) for n in past}
        one = ids_all[:1]
        feeds0 = {**logits_feeds(one.numpy()), **kvfeeds, "position_ids": np.arange(one.shape[1])[None]}
        runner.run(feeds0)
    except Exception as e:  # noqa: BLE001 - e.g. bf16 kernels missing in ORT CPU
        runnable, why_not = False, f"ONNX Runtime cannot run this {dtype} graph here: {str(e).splitlines()[0][:200]}"

    layer_sqnr: dict[str, float] = {}
    if runnable:
        # Per-layer SQNR (dense exports are compared with the artifact only end to end).
        if not dense:
            probe_ids = ids_all[:1, : min(64, ids_all.shape[1])]
            ref_layers = _torch_layer_outputs(model, probe_ids)
            onnx_layers = layer_probe(main_dir, list(art.layers), dtype,
                                      {**logits_feeds(probe_ids.numpy()), **kvfeeds,
                                       "position_ids": np.arange(probe_ids.shape[1])[None]})
            layer_sqnr = {n: error_stats(ref_layers[n], _to_torch(onnx_layers[f"{n}.out"]))["sqnr_db"]
                          for n in art.layers if f"{n}.out" in onnx_layers}
            worst = min(layer_sqnr.values()) if layer_sqnr else float("nan")
            checks.append(Check("per-layer SQNR (min over lowered linears)", worst, f">= {tol['layer_sqnr_db']} dB",
                                len(layer_sqnr) == len(art.layers) and worst >= tol["layer_sqnr_db"],
                                {"layers": len(layer_sqnr), "expected": len(art.layers)}))
        # End-to-end logits and perplexity.
        ref_l, onx_l = [], []
        for w in ids_all:
            x = w[None]
            with torch.no_grad():
                ref_l.append(model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float())
            out = runner.run({**logits_feeds(x.numpy()), **kvfeeds, "position_ids": np.arange(x.shape[1])[None]})
            onx_l.append(_to_torch(out["logits"]))
        ref, onx = torch.cat(ref_l), torch.cat(onx_l)
        st = error_stats(ref, onx)
        top1 = (ref.argmax(-1) == onx.argmax(-1)).double().mean().item()
        checks.append(Check("logits SQNR", st["sqnr_db"], f">= {tol['logits_sqnr_db']} dB",
                            st["sqnr_db"] >= tol["logits_sqnr_db"], st))
        checks.append(Check("logits max relative error (max abs diff / max abs ref)", st["max_rel"], f"<= {tol['max_rel']}",
                            st["max_rel"] <= tol["max_rel"], {"max_abs": st["max_abs"]}))
        checks.append(Check("top-1 agreement", top1, f">= {tol['top1']}", top1 >= tol["top1"]))
        p_ref, p_onx = _ppl(ref, ids_all), _ppl(onx, ids_all)
        rel = abs(p_onx - p_ref) / p_ref
        checks.append(Check("perplexity relative difference", rel, f"<= {tol['ppl_rel']}", rel <= tol["ppl_rel"],
                            {"ppl_torch": p_ref, "ppl_onnx": p_onx, "windows": int(ids_all.shape[0]),
                             "seqlen": int(ids_all.shape[1])}))
    else:
        checks.append(Check("numerical parity", f"skipped: {why_not}", "n/a", True))

    # Greedy generation (fp32 KV graph: identical tokens required).
    if kv_dir is not None:
        kv_runner = OrtRunner(kv_dir)
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        detail, same = {}, True
        for p in prompts:
            pid = tok(p).input_ids
            x = torch.tensor([pid])
            with torch.no_grad():
                ref_tok = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=gen_tokens,
                                         do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(pid):].tolist()
            kv_tok = greedy_kv(kv_runner, pid, gen_tokens, eos_token_id=eos)
            row = {"torch": ref_tok, "onnx_kv": kv_tok}
            ok = kv_tok == ref_tok
            if genai_dir is not None:
                row["genai"] = generate_genai(genai_dir, pid, len(ref_tok))
                ok = ok and row["genai"] == ref_tok
            same &= ok
            detail[p] = row
        checks.append(Check(f"greedy generation, {gen_tokens} tokens x {len(prompts)} prompts"
                            f"{' (ORT KV + genai)' if genai_dir else ' (ORT KV)'}",
                            "identical" if same else "differs", "identical tokens (fp32 KV graph)", same, detail))

    # Structure: S initializers, polygraphy.
    poly = {}
    for folder in {d for d in (logits_dir, kv_dir) if d is not None}:
        if not dense:
            rep = check_s_initializers(folder / "model.onnx")
            checks.append(Check(f"S initializers 2:4 along K, +0.0 zeros, fed to MatMul ({folder.name})",
                                f"{rep['count'] - len(rep['failures'])}/{rep['count']}",
                                "all S initializers pass", rep["passed"] and rep["count"] == len(art.layers),
                                {"failures": rep["failures"][:20]}))
        poly[folder.name] = polygraphy_sparsity(folder / "model.onnx")

    meta_out = {"engine_dir": str(engine_dir), "artifact": str(artifact_dir), "dtype": dtype, "dense": dense,
                "tolerances": tol, "reference": "PyTorch runtime (engines.torch_module), fp32, CPU",
                "exports": {str(d.name): read_meta(d) for d in {logits_dir, kv_dir} if d is not None},
                "polygraphy": poly, "versions": versions()}
    title = f"ONNX parity: {artifact_dir.name} ({dtype}{', dense' if dense else ''})"
    res = write_report(Path(report_dir or engine_dir), title, checks, meta_out, layer_sqnr or None)
    res["checks"] = {c.name: c.passed for c in checks}
    return res


def summary(report_dir) -> dict:
    return json.loads((Path(report_dir) / "parity.json").read_text())
