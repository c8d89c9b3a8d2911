"""Deployment parity of the "onnx" / "genai" engines against the artifact's PyTorch runtime.

``verify_onnx(artifact_dir, engine_dir, cfg)`` accepts the folder written by the "onnx" engine
(``logits/`` + ``genai/``) or a single ``export_onnx`` / ``build_genai_folder`` folder, and runs small
checks (each also usable alone):
  * ``layer_check``: per lowered linear, SQNR of its ONNX output (``{fqn}.out``, fetched as an extra graph
    output of a probe copy of the model) against the PyTorch ArmorLinear output on the same tokens;
  * ``engine_windows`` + ``engines.parity.logits_checks``: end-to-end logits (SQNR, max rel, top-1,
    perplexity) on ``cfg.parity_tokens`` (tokenised by the caller) or seeded random ids longer than every
    sliding window of the model;
  * ``greedy_check``: greedy tokens, PyTorch ``generate`` vs the KV-cache graph in ORT and through
    onnxruntime-genai, from prompts longer than the sliding window;
  * ``engines.onnx_checks.s_check``: 2:4 / +0.0 / direct-MatMul of every S initializer (one per lowered linear:
    a fused group of the artifact is one, its members' outputs are the Split's); polygraphy if installed.
Tolerances per graph precision are ``engines.parity.TOLERANCES``; the report is ``engines.parity.write_report``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from armor_export.adapters import model_facts, token_ids
from engines.base import ExportConfig
from engines.onnx_checks import polygraphy_sparsity, s_check
from engines.onnx_export import armor_linears, read_config, read_meta
from engines.parity import TOLERANCES, Check, error_stats, logits_checks, model_logits, parity_tokens, \
    versions, write_report
from engines.runners import OrtRunner, generate_genai, greedy_kv, logits_feeds

ONNX_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}  # TensorProto elem types
GEN_TOKENS = 16


def find_exports(engine_dir: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(logits-form folder, kv-form folder, genai folder) inside ``engine_dir``."""
    logits = kv = genai = None
    for c in (engine_dir, engine_dir / "logits", engine_dir / "genai", engine_dir / "kv"):
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


def _to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def feeds_for(runner: OrtRunner, ids: torch.Tensor) -> dict:
    """Feeds for one full window: logits form as is; KV form with an empty past."""
    feeds = {**logits_feeds(ids.numpy()), "position_ids": np.arange(ids.shape[1])[None].repeat(ids.shape[0], 0)}
    spec = runner.past_spec()
    if spec is not None:
        past, (kvh, d), npdt = spec
        feeds.update({n: np.zeros((ids.shape[0], kvh, 0, d), npdt) for n in past})
    return feeds


def engine_windows(runner: OrtRunner, tokens: torch.Tensor):
    """The engine's logits [1, T, vocab] of each window in turn (``logits_checks`` consumes them one by one)."""
    for w in tokens:
        yield _to_torch(runner.run(feeds_for(runner, w[None]))["logits"])


def layer_probe(folder: Path, names: list[str], dtype: str, feeds: dict) -> dict[str, np.ndarray]:
    """Run a copy of the model that also outputs ``{fqn}.out`` for every name (same weights file)."""
    import onnx

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


def torch_layer_outputs(model, ids: torch.Tensor, names) -> dict[str, torch.Tensor]:
    outs, hooks = {}, []
    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: outs.__setitem__(name, o.detach().reshape(-1, o.shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    return outs


def layer_check(ref: dict[str, torch.Tensor], names: list[str], folder: Path, feeds: dict, dtype: str, tol: dict):
    """``ref``: the PyTorch outputs of ``names`` (``torch_layer_outputs``) on the tokens of ``feeds``."""
    got = layer_probe(folder, names, dtype, feeds)
    sqnr = {n: error_stats(ref[n], _to_torch(got[f"{n}.out"]))["sqnr_db"] for n in names if f"{n}.out" in got}
    worst = min(sqnr.values()) if sqnr else float("nan")
    return Check("per-layer SQNR (min over lowered linears)", worst, f">= {tol['layer_sqnr_db']} dB",
                 len(sqnr) == len(names) and worst >= tol["layer_sqnr_db"],
                 {"layers": len(sqnr), "expected": len(names)}), sqnr


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def torch_greedy(model, prompts: list[list[int]], n_new: int, eos: int | None) -> list[list[int]]:
    """PyTorch greedy continuations of ``prompts`` (the reference of ``greedy_check``)."""
    out = []
    for pid in prompts:
        x = torch.tensor([pid])
        with torch.no_grad():
            out.append(model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
                                      eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
                       [0, len(pid):].tolist())
    return out


def greedy_check(refs: list[list[int]], kv_dir: Path, genai_dir: Path | None, prompts: list[list[int]], n_new: int,
                 eos: int | None):
    """PyTorch greedy tokens (``refs``, ``torch_greedy``) vs the KV graph in ORT, then (its session released)
    through onnxruntime-genai when a folder is given: identical required."""
    kv_runner = OrtRunner(kv_dir)
    rows = [{"prompt_len": len(pid), "torch": ref, "onnx_kv": greedy_kv(kv_runner, pid, n_new, eos_token_id=eos)}
            for pid, ref in zip(prompts, refs)]
    del kv_runner
    detail, same = {}, True
    for j, (pid, ref, row) in enumerate(zip(prompts, refs, rows)):
        ok = row["onnx_kv"] == ref
        if genai_dir is not None:  # genai stops at eos without returning it: compare up to the eos
            row["genai"] = generate_genai(genai_dir, pid, len(ref))
            ok = ok and _until_eos(row["genai"], eos) == _until_eos(ref, eos)
        same &= ok
        detail[f"prompt {j}"] = row
    return Check(f"greedy generation, {n_new} tokens x {len(prompts)} prompts"
                 f"{' (ORT KV + genai)' if genai_dir else ' (ORT KV)'}", "identical" if same else "differs",
                 "identical tokens (fp32 KV graph)", same, detail)


def greedy_prompts(tokens: torch.Tensor, facts, n_new: int) -> list[list[int]]:
    """Prompt prefixes of the parity windows; with a sliding window the prompt is longer than it."""
    longest = max([w for w in facts.windows if w] or [0])
    n = max(8, min(tokens.shape[1], longest + 4)) if longest else 8
    n = min(n, tokens.shape[1], facts.max_positions - n_new)
    return [tokens[i, :n].tolist() for i in range(min(2, tokens.shape[0]))]


def verify_onnx(artifact_dir: Path, engine_dir: Path, cfg: ExportConfig = ExportConfig()) -> dict:
    from engines.torch_module import load_armor_model

    artifact_dir, engine_dir = Path(artifact_dir), Path(engine_dir)
    logits_dir, kv_dir, genai_dir = find_exports(engine_dir)
    main_dir = logits_dir or kv_dir
    meta = read_meta(main_dir)
    dtype, dense = meta["dtype"], meta["dense"]
    tol = TOLERANCES[dtype]
    config = read_config(artifact_dir)
    facts = model_facts(config)
    tokens = parity_tokens(cfg.parity_tokens, facts, cfg.parity_seqlen)
    probe_ids = tokens[:1, : min(64, tokens.shape[1])]
    eos = token_ids(config, artifact_dir).eos if kv_dir is not None else None
    eos = eos[0] if eos else None
    prompts = greedy_prompts(tokens, facts, GEN_TOKENS)
    # Every PyTorch reference first, then the model is released: one model in memory at a time (the
    # PyTorch runtime, then each ONNX Runtime session in turn).
    model, art = load_armor_model(artifact_dir)
    names = list(art.layers)
    ref_layers = torch_layer_outputs(model, probe_ids, names) if not dense else {}
    ref_logits = model_logits(model, tokens)
    ref_greedy = torch_greedy(model, prompts, GEN_TOKENS, eos) if kv_dir is not None else None
    del model
    checks: list[Check] = []
    layer_sqnr: dict[str, float] = {}
    try:
        runner = OrtRunner(main_dir)
        runner.run(feeds_for(runner, tokens[:1, :4]))
    except Exception as e:  # noqa: BLE001 - e.g. bf16 kernels missing in ORT CPU
        runner = None
        why = f"ONNX Runtime cannot run this {dtype} graph here: {str(e).splitlines()[0][:200]}"
        checks.append(Check("numerical parity", f"skipped: {why}", "n/a", True))
    if runner is not None:
        end_to_end = logits_checks(ref_logits, engine_windows(runner, tokens), tokens, tol)
        probe_feeds = feeds_for(runner, probe_ids)
        del runner
        if not dense:  # dense exports are compared with the artifact only end to end
            c, layer_sqnr = layer_check(ref_layers, names, main_dir, probe_feeds, dtype, tol)
            checks.append(c)
        checks += end_to_end
    del ref_logits, ref_layers
    if kv_dir is not None:
        checks.append(greedy_check(ref_greedy, kv_dir, genai_dir, prompts, GEN_TOKENS, eos))
    poly = {}
    for folder in {d for d in (logits_dir, kv_dir) if d is not None}:
        if not dense:
            fused = bool(read_meta(folder).get("fused_groups"))
            checks.append(s_check(folder / "model.onnx", armor_linears(art, fused=fused), folder.name))
        poly[folder.name] = polygraphy_sparsity(folder / "model.onnx")
    meta_out = {"engine_dir": str(engine_dir), "artifact": str(artifact_dir), "dtype": dtype, "dense": dense,
                "family": facts.family.name, "sliding_windows": list(facts.windows), "tolerances": tol,
                "parity_tokens": {"windows": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
                                  "source": "caller" if cfg.parity_tokens else "seeded random ids"},
                "reference": "PyTorch runtime (engines.torch_module), fp32, CPU",
                "exports": {str(d.name): read_meta(d) for d in {logits_dir, kv_dir} if d is not None},
                "polygraphy": poly, "versions": versions()}
    title = f"ONNX parity: {artifact_dir.name} ({dtype}{', dense' if dense else ''})"
    res = write_report(Path(cfg.report_dir or engine_dir), title, checks, meta_out, layer_sqnr or None)
    res["checks"] = {c.name: c.passed for c in checks}
    res["figures"] = {c.name: c.value for c in checks}
    return res


def summary(report_dir) -> dict:
    return json.loads((Path(report_dir) / "parity.json").read_text())
