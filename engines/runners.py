"""Thin ONNX Runtime runners used by verify, tests and benchmarks.

``OrtRunner(path).run(feeds) -> {output name: ndarray}``; ``greedy_kv(runner, prompt_ids, n)`` runs
greedy decoding with the KV-cache form (prefill once, then one token per step, past fed back);
``generate_genai(folder, prompt_ids, n)`` the same through onnxruntime-genai's client.
No sessions are cached at module level; every runner owns its session.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtRunner:
    def __init__(self, path, *, threads: int | None = None, providers=None, optimize: bool = True,
                 extra_outputs: list[str] | None = None):
        import onnxruntime as ort

        path = Path(path)
        self.path = path / "model.onnx" if path.is_dir() else path
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(self.path), so, providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict:
        feeds = {k: np.asarray(v) for k, v in feeds.items() if k in self.inputs}
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds)))

    def past_spec(self) -> tuple[list[str], tuple[int, int], type] | None:
        """Names of past inputs, (kv heads, head dim) and numpy dtype; None for the logits form."""
        past = [n for n in self.inputs if n.startswith("past_key_values.")]
        if not past:
            return None
        i = self.inputs[past[0]]
        return past, (int(i.shape[1]), int(i.shape[3])), NP_DTYPES[i.type]


def greedy_kv(runner: OrtRunner, prompt_ids, n_new: int, *, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding of one prompt with the KV form; returns the new tokens (stops at eos)."""
    past_names, (kvh, d), npdt = runner.past_spec()
    ids = np.asarray(prompt_ids, dtype=np.int64)[None]
    feeds = {n: np.zeros((1, kvh, 0, d), npdt) for n in past_names}
    total, new = 0, []
    for _ in range(n_new):
        t = ids.shape[1]
        feeds.update(input_ids=ids, attention_mask=np.ones((1, total + t), np.int64),
                     position_ids=np.arange(total, total + t, dtype=np.int64)[None])
        out = runner.run(feeds)
        tok = int(out["logits"][0, -1].argmax())
        new.append(tok)
        total += t
        for name in past_names:
            feeds[name] = out[name.replace("past_key_values.", "present.")]
        if eos_token_id is not None and tok == eos_token_id:
            break
        ids = np.array([[tok]], np.int64)
    return new


def logits_feeds(input_ids) -> dict:
    ids = np.asarray(input_ids, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def generate_genai(folder, prompt_ids: list[int], n_new: int) -> list[int]:
    """Greedy decoding of ``n_new`` tokens with onnxruntime_genai; returns the new tokens."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n_new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(list(prompt_ids))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt_ids):]
