"""ONNX Runtime CPU cost of the block-diagonal products in other graph layouts (issue 20's overhead target).

A chain of ``--linears`` distinct linears (alternately 576 -> 1536 and 1536 -> 576, SmolLM2's MLP shapes, tanh
between them so nothing folds; fp32, b = 32, about 140 MB of weights: more than the caches, as in a real decode)
is built once per layout and timed in turns in one process, process CPU time, one thread:

* ``dense``   MatMul(x, Wᵀ);
* ``armor``   the exporter's form (engines/onnx_graph.py): Reshape [N, n, b] -> Transpose [n, N, b] -> MatMul
  (blocks [n, b, b]) -> Transpose -> Reshape, then MatMul(Sᵀ), then the same for A: 10 extra nodes per linear;
* ``bcast``   Reshape [N, n, 1, b] -> MatMul broadcast against [n, b, b] -> Reshape: no Transpose, 6 extra nodes,
  but N·n GEMMs of one row;
* ``einsum``  Reshape -> Einsum("tnb,nbc->tnc") -> Reshape (6 extra nodes; TensorRT's parser takes Einsum too);
* ``fmajor``  feature-major: one Transpose to [d, N] per linear, the blocks contiguous rows ([n, b, N]: no
  Transpose around the block MatMuls), S as MatMul's left operand, one Transpose back: 8 extra nodes.

Every layout computes the same function as ``armor`` (checked: max |difference| printed). Overheads are per
linear of this chain, not of a model (no attention, norms or lm_head to dilute them; benchmarks.onnx_speed
times whole models).

    python -m benchmarks.onnx_layouts [--linears 40] [--reps 200,8] [--rounds 5] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

LAYOUTS = ("dense", "armor", "bcast", "einsum", "fmajor")
B = 32


class Chain:
    """One layout's chain of linears on an onnx-ir tape (weights drawn from the same seed for every layout)."""

    def __init__(self, layout: str, linears: int, seed: int = 0):
        self.layout, self.t, self.n = layout, ir_tape.Tape(), 0
        rng = np.random.default_rng(seed)
        x = ir.Value(name="x", shape=ir.Shape(["N", 576]), type=ir.TensorType(ir.DataType.FLOAT))
        h = x
        for i in range(linears):
            d_in, d_out = (576, 1536) if i % 2 == 0 else (1536, 576)
            w = rng.standard_normal((d_out, d_in)).astype(np.float32) * 0.03
            b_in = self.blocks(rng, d_in)
            a_out = self.blocks(rng, d_out)
            h = self.t.op("Tanh", [self.linear(h, w, b_in, a_out)])
        self.model = ir.Model(ir.Graph([x], [h], nodes=self.t.nodes, initializers=self.t.initializers,
                                       opset_imports={"": 20}, name=layout), ir_version=10)

    @staticmethod
    def blocks(rng, d: int) -> np.ndarray:
        return (rng.standard_normal((d // B, B, B)) * 0.1 + np.eye(B)).astype(np.float32)

    def init(self, arr: np.ndarray) -> ir.Value:
        self.n += 1
        name = f"w{self.n}"
        return self.t.initializer(ir.tensor(np.ascontiguousarray(arr), name=name), name=name)

    def op(self, op_type: str, inputs, **attrs) -> ir.Value:
        return self.t.op(op_type, inputs, attrs or None)

    def row_product(self, x, blocks: np.ndarray, d: int) -> ir.Value:
        """x [N, d] times the block-diagonal matrix of ``blocks`` [n, b, b] (y_q = blocks_q · x_q per block q)."""
        bt = blocks.transpose(0, 2, 1)
        n = d // B
        if self.layout == "armor":
            v = self.op("Transpose", [self.op("Reshape", [x, self.init(np.array([-1, n, B]))])], perm=[1, 0, 2])
            v = self.op("Transpose", [self.op("MatMul", [v, self.init(bt)])], perm=[1, 0, 2])
        elif self.layout == "bcast":
            v = self.op("MatMul", [self.op("Reshape", [x, self.init(np.array([-1, n, 1, B]))]), self.init(bt)])
        else:  # einsum
            v = self.op("Einsum", [self.op("Reshape", [x, self.init(np.array([-1, n, B]))]), self.init(bt)],
                        equation="tnb,nbc->tnc")
        return self.op("Reshape", [v, self.init(np.array([-1, d]))])

    def linear(self, x, w: np.ndarray, b_in: np.ndarray, a_out: np.ndarray) -> ir.Value:
        d_out, d_in = w.shape
        if self.layout == "dense":
            return self.op("MatMul", [x, self.init(w.T)])
        if self.layout == "fmajor":
            v = self.op("Reshape", [self.op("Transpose", [x], perm=[1, 0]), self.init(np.array([d_in // B, B, -1]))])
            v = self.op("Reshape", [self.op("MatMul", [self.init(b_in), v]), self.init(np.array([d_in, -1]))])
            v = self.op("MatMul", [self.init(w), v])
            v = self.op("Reshape", [v, self.init(np.array([d_out // B, B, -1]))])
            v = self.op("Reshape", [self.op("MatMul", [self.init(a_out), v]), self.init(np.array([d_out, -1]))])
            return self.op("Transpose", [v], perm=[1, 0])
        y = self.op("MatMul", [self.row_product(x, b_in, d_in), self.init(w.T)])
        return self.row_product(y, a_out, d_out)


def session(model: ir.Model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure(layouts, linears: int, tokens_reps: dict[int, int], rounds: int, threads: int) -> dict:
    sess = {lay: session(Chain(lay, linears).model, threads) for lay in layouts}
    rng = np.random.default_rng(1)
    out = {"linears": linears, "threads": threads, "rounds": rounds, "block": B, "runs": {}}
    for n_tok, reps in tokens_reps.items():
        x = {"x": rng.standard_normal((n_tok, 576)).astype(np.float32)}
        y = {lay: s.run(None, x)[0] for lay, s in sess.items()}
        best = {lay: float("inf") for lay in layouts}
        for _ in range(rounds):  # in turns, so drifts of the machine hit every layout alike
            for lay, s in sess.items():
                t0 = time.process_time()
                for _ in range(reps):
                    s.run(None, x)
                best[lay] = min(best[lay], (time.process_time() - t0) / reps * 1e3)
        row = {}
        for lay in layouts:
            row[lay] = {"ms": best[lay]}
            if "dense" in best:
                row[lay]["overhead_pct"] = 100 * (best[lay] / best["dense"] - 1)
            if "armor" in y and lay not in ("dense", "armor"):
                row[lay]["max_abs_diff_vs_armor"] = float(np.abs(y[lay] - y["armor"]).max())
        out["runs"][str(n_tok)] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--linears", type=int, default=40)
    p.add_argument("--tokens", default="1,512", help="token counts N (decode step, prefill)")
    p.add_argument("--reps", default="200,8", help="runs per timing, one per token count")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    layouts = a.layouts.split(",")
    if unknown := set(layouts) - set(LAYOUTS):
        p.error(f"--layouts: unknown {sorted(unknown)}; choose from {', '.join(LAYOUTS)}")
    tokens_reps = dict(zip((int(t) for t in a.tokens.split(",")), (int(r) for r in a.reps.split(","))))
    res = measure(layouts, a.linears, tokens_reps, a.rounds, a.threads)
    for n_tok, row in res["runs"].items():
        for lay, r in row.items():
            extra = f" {r['overhead_pct']:+6.1f} %" if "overhead_pct" in r else ""
            print(f"N={n_tok:>4} {lay:7s} {r['ms']:9.3f} ms{extra}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
