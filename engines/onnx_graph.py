"""Build the ONNX graph of a decoder with ARMOR linears, directly with onnx-ir, for every family in
``armor_export.adapters`` (the family table and ``model_facts`` give every fact the graph depends on).

Why onnx-ir and not ``torch.onnx.export`` or the genai model builder: the graph is small and
regular (embedding, RMSNorm, RoPE, GQA attention, gated MLP), so writing it op by op gives exactly
the pattern TensorRT and Polygraphy need (S a 2-D initializer feeding MatMul through one Transpose),
stable initializer names, no Einsum, no framework-generated reshape noise, and an export that costs
only the time to write the weights (seconds instead of the dynamo exporter's ~146 s). The genai
builder fuses q/k/v into one MatMul and emits ``com.microsoft`` attention ops that TensorRT does not
parse; unfusing that would be more code than writing the graph.

Per pruned linear (x: [N, d_in], N = batch * seq tokens, kept 2-D through the decoder):
    Reshape [N, n1, b] -> Transpose [n1, N, b] -> MatMul(., {fqn}.B_t [n1, b, b]) -> Transpose -> Reshape
    -> MatMul(., Transpose({fqn}.S))        # S [d_out, d_in] initializer, 2:4 along d_in (= K)
    -> (same block product with {fqn}.A_t) -> Add {fqn}.bias
``B_t``/``A_t`` hold the blocks transposed (x . B^T per block). Identity A/B produce no nodes. Fused
projections (Phi-3 ``qkv_proj`` / ``gate_up_proj``) are lowered as one linear and split after it.
A fused group of the artifact (``--fuse``: q/k/v or gate/up solved as one stacked layer with one shared B,
``solver.fused``) is lowered the same way, as ONE linear named after the group (``{group}.B_t`` the shared B,
``{group}.S`` the members' S rows stacked: still 2:4 along d_in and fed straight to its MatMul, ``{group}.A_t``
the members' A blocks stacked, ``{group}.bias``), then a Split by the members' d_out whose outputs are named
``{member}.out``. Without groups the graph is exactly the unfused one.
Family features: q/k RMSNorm per head (Qwen3), per-layer sliding windows (a key is visible when
``q_pos - k_pos < window``, as transformers masks), attention and final soft-capping, the RMSNorm
offset and embedding scale (Gemma 2), sandwich norms, SiLU or tanh-GELU. Every other op runs in the
graph dtype except RMSNorm statistics, soft-capping and softmax, done in fp32 as PyTorch does. Forms:
"logits" (input_ids, attention_mask -> logits) and "kv" (adds position_ids, past_key_values.{i}.key/value
-> present.{i}.key/value = concat(past, new); the onnxruntime-genai decoder layout).
This module only builds the in-memory model; writing and checking is in ``engines.onnx_export``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir import tape as ir_tape
from onnx_ir.tensor_adapters import TorchTensor

from armor_export.adapters import ModelFacts, check_features, model_facts
from engines.deferred import Deferred
from engines.parity import DTYPES

OPSET = 20  # TensorRT's parser supports opsets up to 20 (deployment-facts §2.6)
IR_DTYPES = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
# features of armor_export.adapters.ModelFacts.features() this graph expresses (RoPE: position-only types)
SUPPORTED = frozenset({"rope:default", "rope:linear", "rope:llama3", "rope:yarn", "fused_qkv", "fused_gate_up",
                       "qk_norm", "linear_bias", "sliding_window", "attn_softcap", "final_softcap", "norm_offset",
                       "embed_scale", "sandwich_norm", "act:gelu_pytorch_tanh", "act:gelu_tanh"})


def check_onnx_features(config, engine: str = "onnx", where: str = "") -> ModelFacts:
    """The model's facts, or UnsupportedFeature naming family, feature and engine."""
    facts = model_facts(config)
    check_features(facts, engine, SUPPORTED, where)
    return facts


@dataclass(frozen=True)
class GraphSpec:
    dtype: str = "fp32"
    form: str = "logits"

    def __post_init__(self):
        if self.dtype not in IR_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(IR_DTYPES)}, got {self.dtype!r}")
        if self.form not in ("logits", "kv"):
            raise ValueError(f"form must be 'logits' or 'kv', got {self.form!r}")


@dataclass
class LinearWeights:
    """What one linear lowers from: ARMOR factors (S with optional A/B blocks) or a dense weight W."""
    S: torch.Tensor  # [d_out, d_in]; the dense W when A and B are None and dense=True
    A_blocks: torch.Tensor | None = None
    B_blocks: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    dense: bool = False


@dataclass(frozen=True)
class FusedGroup:
    """A fused group of the artifact: its members in stacking order and their d_out (the Split sizes); the
    group's stacked weights are ``linears[group name]``."""
    members: tuple[str, ...]
    sizes: tuple[int, ...]


class DecoderGraph:
    """Accumulates nodes and initializers on an onnx-ir tape; ``build`` returns the ir.Model."""

    def __init__(self, config, spec: GraphSpec, linears: dict[str, LinearWeights], base: dict[str, torch.Tensor],
                 groups: dict[str, FusedGroup] | None = None):
        self.facts = check_onnx_features(config)
        self.fam = self.facts.family
        self.cfg, self.spec, self.linears, self.base = config, spec, linears, base
        self.groups = dict(groups or {})
        self._group_of = {m: g for g, fg in self.groups.items() for m in fg.members}
        self.tdtype, self.dtype = DTYPES[spec.dtype], IR_DTYPES[spec.dtype]
        self.t = ir_tape.Tape()
        self.H, self.KVH, self.D = self.facts.heads, self.facts.kv_heads, self.facts.head_dim
        self._consts: dict[str, ir.Value] = {}

    # ---- helpers -------------------------------------------------------------------------------
    def weight(self, name: str, t: torch.Tensor, *, plus_zero: bool = False, dtype=None) -> ir.Value:
        """An initializer in the graph dtype, referencing the torch tensor (no copy when possible).
        plus_zero: x + 0.0 turns every -0.0 into +0.0 and leaves all other values unchanged (S).
        A ``Deferred`` (engines.deferred) becomes a lazy initializer, read only when the model is saved."""
        if isinstance(t, Deferred):
            return self.t.initializer(t.ir_tensor(name, dtype or self.tdtype, plus_zero=plus_zero), name=name)
        t = t.detach().to(dtype or self.tdtype).contiguous()
        if plus_zero:
            t = t + 0.0
        return self.t.initializer(TorchTensor(t, name=name), name=name)

    def const(self, values, dtype=np.int64) -> ir.Value:
        arr = np.asarray(values, dtype=dtype)
        key = f"{arr.dtype}:{arr.shape}:{arr.tobytes().hex()}"
        if key not in self._consts:
            name = f"const.{len(self._consts)}"
            self._consts[key] = self.t.initializer(ir.tensor(arr, name=name), name=name)
        return self._consts[key]

    def op(self, op_type, inputs, attrs=None, name=None) -> ir.Value:
        return self.t.op(op_type, inputs, attrs, name=name)

    def cast(self, x, to: ir.DataType) -> ir.Value:
        """Casts only ever go between the graph dtype and fp32, so they vanish in an fp32 graph."""
        return x if self.dtype == ir.DataType.FLOAT else self.op("Cast", [x], {"to": to})

    def split(self, x, sizes: list[int]) -> list[ir.Value]:
        """Split the last axis of x [N, sum(sizes)] (the fused projections' outputs)."""
        return self.t.op_multi_out("Split", [x, self.const(sizes)], {"axis": -1}, num_outputs=len(sizes))

    # ---- layers --------------------------------------------------------------------------------
    def block_product(self, x, blocks_t: ir.Value, n: int, b: int, d: int, name: str) -> ir.Value:
        """x [N, d] -> per block q: x_q . W_q (blocks_t [n, b, b] holds W_q = blocks^T)."""
        xv = self.op("Reshape", [x, self.const([-1, n, b])])
        xv = self.op("Transpose", [xv], {"perm": [1, 0, 2]})
        yv = self.op("MatMul", [xv, blocks_t], name=f"{name}/matmul")
        yv = self.op("Transpose", [yv], {"perm": [1, 0, 2]})
        return self.op("Reshape", [yv, self.const([-1, d])])

    def linear(self, x, fqn: str) -> ir.Value:
        lw = self.linears[fqn]
        d_out, d_in = lw.S.shape
        if lw.B_blocks is not None:
            n1, b, _ = lw.B_blocks.shape
            bt = self.weight(f"{fqn}.B_t", lw.B_blocks.transpose(-1, -2))
            x = self.block_product(x, bt, n1, b, d_in, f"{fqn}/B")
        s_name = f"{fqn}.weight" if lw.dense else f"{fqn}.S"
        s = self.weight(s_name, lw.S, plus_zero=True)
        st = self.op("Transpose", [s], {"perm": [1, 0]})
        y = self.op("MatMul", [x, st], name=f"{fqn}/{'W' if lw.dense else 'S'}/matmul")
        if lw.A_blocks is not None:
            n0, b, _ = lw.A_blocks.shape
            at = self.weight(f"{fqn}.A_t", lw.A_blocks.transpose(-1, -2))
            y = self.block_product(y, at, n0, b, d_out, f"{fqn}/A")
        if lw.bias is not None:
            y = self.op("Add", [y, self.weight(f"{fqn}.bias", lw.bias)])
        y.name = f"{fqn}.out"  # probed by verify for per-layer parity
        return y

    def rmsnorm(self, x, module: str) -> ir.Value:
        """Llama: cast(x / rms) * w in the graph dtype; with the family's norm offset (Gemma) the
        product (x / rms) * (offset + w) is taken in fp32 and cast afterwards, as transformers does."""
        wname = f"{module}.weight"
        xf = self.cast(x, ir.DataType.FLOAT)
        var = self.op("ReduceMean", [self.op("Mul", [xf, xf]), self.const([-1])], {"keepdims": 1})
        eps = self.const(self.facts.rms_eps, np.float32)
        normed = self.op("Mul", [xf, self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [var, eps])])])])
        if self.fam.norm_offset:
            w = self.op("Add", [self.weight(wname, self.base[wname], dtype=torch.float32),
                                self.const(self.fam.norm_offset, np.float32)])
            return self.cast(self.op("Mul", [normed, w]), self.dtype)
        return self.op("Mul", [self.cast(normed, self.dtype), self.weight(wname, self.base[wname])])

    def softcap(self, x_f32, cap: float) -> ir.Value:
        """cap * tanh(x / cap) (fp32 in, fp32 out)."""
        c = self.const(cap, np.float32)
        return self.op("Mul", [self.op("Tanh", [self.op("Div", [x_f32, c])]), c])

    def rope_tables(self, pos):
        """pos [B|1, T] int64 -> cos, sin [B|1, 1, T, D] in the graph dtype (computed in fp32).
        inv_freq and the attention scaling come from transformers' RoPE initialiser for the config's
        rope type (default, linear, llama3, yarn: all functions of the position only)."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = LlamaRotaryEmbedding(self.cfg)
        inv = rope.inv_freq.float().numpy()
        freqs = self.op("Mul", [self.op("Unsqueeze", [self.op("Cast", [pos], {"to": ir.DataType.FLOAT}),
                                                       self.const([-1])]), self.const(inv, np.float32)])
        emb = self.op("Concat", [freqs, freqs], {"axis": -1})
        scale = float(getattr(rope, "attention_scaling", 1.0))
        out = []
        for fn in ("Cos", "Sin"):
            v = self.op(fn, [emb])
            if scale != 1.0:
                v = self.op("Mul", [v, self.const(scale, np.float32)])
            out.append(self.op("Unsqueeze", [self.cast(v, self.dtype), self.const([1])]))
        return out

    def rotate(self, x, cos, sin):
        h = self.D // 2
        x1 = self.op("Slice", [x, self.const([0]), self.const([h]), self.const([-1])])
        x2 = self.op("Slice", [x, self.const([h]), self.const([self.D]), self.const([-1])])
        rot = self.op("Concat", [self.op("Neg", [x2]), x1], {"axis": -1})
        return self.op("Add", [self.op("Mul", [x, cos]), self.op("Mul", [rot, sin])])

    def projections(self, x, names: list[str]) -> list[ir.Value]:
        """The outputs of projections reading the same x: one linear each, or, when they are a fused group of the
        artifact, the group's one linear and a Split (outputs named ``{member}.out``, probed by verify)."""
        g = self._group_of.get(names[0])
        if g is None:
            return [self.linear(x, n) for n in names]
        fg = self.groups[g]
        if fg.members != tuple(names):
            raise ValueError(f"{g}: fused group members {list(fg.members)} are not the projections {names}")
        outs = self.split(self.linear(x, g), list(fg.sizes))
        for out, m in zip(outs, fg.members):
            out.name = f"{m}.out"
        return outs

    def qkv(self, x, i: int):
        f = self.facts
        names = [f.layer(i, n) for n in self.fam.qkv]
        if self.fam.fused_qkv:
            return self.split(self.linear(x, names[0]), [f.q_dim, f.kv_dim, f.kv_dim])
        return self.projections(x, names)

    def attention(self, x, i: int, ctx: dict):
        H, D, f = self.H, self.D, self.facts
        q, k, v = self.qkv(x, i)
        q = self.op("Reshape", [q, ctx["shape_q"]])  # [B, T, H, D]
        k = self.op("Reshape", [k, ctx["shape_kv"]])
        v = self.op("Reshape", [v, ctx["shape_kv"]])
        if self.fam.qk_norm:
            q = self.rmsnorm(q, f.layer(i, self.fam.qk_norm[0]))
            k = self.rmsnorm(k, f.layer(i, self.fam.qk_norm[1]))
        q = self.rotate(self.op("Transpose", [q], {"perm": [0, 2, 1, 3]}), ctx["cos"], ctx["sin"])
        k = self.rotate(self.op("Transpose", [k], {"perm": [0, 2, 1, 3]}), ctx["cos"], ctx["sin"])
        v = self.op("Transpose", [v], {"perm": [0, 2, 1, 3]})  # [B, KVH, T, D]
        if self.spec.form == "kv":
            k = self.op("Concat", [ctx["past"][i][0], k], {"axis": 2})
            v = self.op("Concat", [ctx["past"][i][1], v], {"axis": 2})
            k.name, v.name = f"present.{i}.key", f"present.{i}.value"
            ctx["present"] += [k, v]
        q5 = self.op("Reshape", [q, ctx["shape_q5"]])  # [B, KVH, rep, T, D]
        k5 = self.op("Unsqueeze", [k, self.const([2])])  # [B, KVH, 1, S, D]
        v5 = self.op("Unsqueeze", [v, self.const([2])])
        kt = self.op("Transpose", [k5], {"perm": [0, 1, 2, 4, 3]})
        scores = self.op("Mul", [self.cast(self.op("MatMul", [q5, kt]), ir.DataType.FLOAT),
                                 self.const(f.attn_scale, np.float32)])
        if f.attn_softcap:
            scores = self.softcap(scores, float(f.attn_softcap))
        scores = self.op("Where", [ctx["allowed"][f.windows[i]], scores,
                                   self.const(np.finfo(np.float32).min, np.float32)])
        probs = self.cast(self.op("Softmax", [scores], {"axis": -1}), self.dtype)
        out = self.op("MatMul", [probs, v5])  # [B, KVH, rep, T, D]
        out = self.op("Transpose", [self.op("Reshape", [out, ctx["shape_bhtd"]])], {"perm": [0, 2, 1, 3]})
        out = self.op("Reshape", [out, self.const([-1, H * D])])
        return self.linear(out, f.layer(i, self.fam.o_proj))

    def act(self, g):
        if self.facts.activation == "silu":
            return self.op("Mul", [g, self.op("Sigmoid", [g])])
        # tanh GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in the graph dtype as PyTorch does
        c = lambda v: self.cast(self.const(v, np.float32), self.dtype)  # noqa: E731
        inner = self.op("Mul", [c(math.sqrt(2 / math.pi)),
                                self.op("Add", [g, self.op("Mul", [c(0.044715), self.op("Mul", [g, self.op(
                                    "Mul", [g, g])])])])])
        return self.op("Mul", [self.op("Mul", [c(0.5), g]), self.op("Add", [c(1.0), self.op("Tanh", [inner])])])

    def mlp(self, x, i: int):
        f = self.facts
        names = [f.layer(i, n) for n in self.fam.gate_up]
        if self.fam.fused_gate_up:
            g, u = self.split(self.linear(x, names[0]), [f.intermediate, f.intermediate])
        else:
            g, u = self.projections(x, names)
        return self.linear(self.op("Mul", [self.act(g), u]), f.layer(i, self.fam.down_proj))

    def masks(self, q_pos, s0) -> dict:
        """window (None = full causal) -> bool mask [B, 1, 1, T, S] of the keys each query may see."""
        k_pos = self.op("Range", [self.const(0), s0, self.const(1)])
        kk, qq = self.op("Unsqueeze", [k_pos, self.const([0])]), self.op("Unsqueeze", [q_pos, self.const([1])])
        causal = self.op("LessOrEqual", [kk, qq])  # [T, S]
        pad = self.op("Reshape", [self.op("Cast", [self._mask], {"to": ir.DataType.BOOL}),
                                  self.const([0, 1, 1, 1, -1])])
        out = {None: self.op("And", [causal, pad])}
        for w in sorted({w for w in self.facts.windows if w is not None}):
            recent = self.op("Less", [self.op("Sub", [qq, kk]), self.const(w)])  # q - k < window
            out[w] = self.op("And", [self.op("And", [causal, recent]), pad])
        return out

    # ---- whole model ---------------------------------------------------------------------------
    def build(self) -> ir.Model:
        f, fam, kv = self.facts, self.fam, self.spec.form == "kv"
        I64 = ir.DataType.INT64
        ids = ir.Value(name="input_ids", shape=ir.Shape(["batch_size", "sequence_length"]), type=ir.TensorType(I64))
        mask = ir.Value(name="attention_mask", shape=ir.Shape(["batch_size", "total_sequence_length"]),
                        type=ir.TensorType(I64))
        self._mask = mask
        inputs = [ids, mask]
        ctx: dict = {"present": [], "past": []}
        shp = self.op("Shape", [ids])
        B = self.op("Slice", [shp, self.const([0]), self.const([1])])
        T = self.op("Slice", [shp, self.const([1]), self.const([2])])
        S = self.op("Slice", [self.op("Shape", [mask]), self.const([1]), self.const([2])])
        ctx["shape_q"] = self.op("Concat", [shp, self.const([self.H, self.D])], {"axis": 0})
        ctx["shape_kv"] = self.op("Concat", [shp, self.const([self.KVH, self.D])], {"axis": 0})
        ctx["shape_q5"] = self.op("Concat", [B, self.const([self.KVH, self.H // self.KVH]), T, self.const([self.D])],
                                  {"axis": 0})
        ctx["shape_bhtd"] = self.op("Concat", [B, self.const([self.H]), T, self.const([self.D])], {"axis": 0})
        s0, t0 = self.op("Squeeze", [S, self.const([0])]), self.op("Squeeze", [T, self.const([0])])
        past_len = self.op("Sub", [s0, t0])
        q_pos = self.op("Range", [past_len, s0, self.const(1)])  # absolute positions of the new tokens
        if kv:
            pos = ir.Value(name="position_ids", shape=ir.Shape(["batch_size", "sequence_length"]),
                           type=ir.TensorType(I64))
            inputs.append(pos)
            for i in range(f.num_layers):
                pair = [ir.Value(name=f"past_key_values.{i}.{kind}", type=ir.TensorType(self.dtype),
                                 shape=ir.Shape(["batch_size", self.KVH, "past_sequence_length", self.D]))
                        for kind in ("key", "value")]
                inputs += pair
                ctx["past"].append(pair)
        else:
            pos = self.op("Unsqueeze", [q_pos, self.const([0])])
        ctx["cos"], ctx["sin"] = self.rope_tables(pos)
        ctx["allowed"] = self.masks(q_pos, s0)

        emb_name = f"{fam.embed}.weight"
        emb = self.weight(emb_name, self.base[emb_name])
        h = self.op("Reshape", [self.op("Gather", [emb, ids]), self.const([-1, f.hidden])])  # [N, hidden]
        if fam.embed_scale:  # sqrt(hidden) rounded to the graph dtype, as transformers does
            h = self.op("Mul", [h, self.cast(self.const(f.hidden ** 0.5, np.float32), self.dtype)])
        for i in range(f.num_layers):
            a = self.attention(self.rmsnorm(h, f.layer(i, fam.attn_norm)), i, ctx)
            if fam.post_attn_norm:
                a = self.rmsnorm(a, f.layer(i, fam.post_attn_norm))
            h = self.op("Add", [h, a])
            m = self.mlp(self.rmsnorm(h, f.layer(i, fam.mlp_norm)), i)
            if fam.post_mlp_norm:
                m = self.rmsnorm(m, f.layer(i, fam.post_mlp_norm))
            h = self.op("Add", [h, m])
        h = self.rmsnorm(h, fam.final_norm)
        if "lm_head" in self.linears:
            logits2d = self.linear(h, "lm_head")
        else:
            head = emb if f.tied_lm_head else self.weight("lm_head.weight", self.base["lm_head.weight"])
            logits2d = self.op("Gemm", [h, head], {"transB": 1})
        if f.final_softcap:
            logits2d = self.cast(self.softcap(self.cast(logits2d, ir.DataType.FLOAT), float(f.final_softcap)),
                                 self.dtype)
        logits = self.op("Reshape", [logits2d, self.op("Concat", [shp, self.const([-1])], {"axis": 0})])
        logits.name = "logits"
        logits.type = ir.TensorType(self.dtype)
        logits.shape = ir.Shape(["batch_size", "sequence_length", f.vocab])
        for pv in ctx["present"]:
            pv.type = ir.TensorType(self.dtype)
            pv.shape = ir.Shape(["batch_size", self.KVH, "total_sequence_length", self.D])
        graph = ir.Graph(inputs, [logits, *ctx["present"]], nodes=self.t.nodes, initializers=self.t.initializers,
                         opset_imports={"": OPSET}, name=f"armor_{self.cfg.model_type}_{self.spec.form}")
        return ir.Model(graph, ir_version=10, producer_name="armor-export")
