"""The PyTorch runtime of an artifact: ``ArmorLinear`` and the model loader built on it.

ArmorLinear computes y = ((x . B^T) . S^T) . A^T + bias, in that order:
  1. block-diagonal batched matmul with B_blocks [n1, b, b] on the [T, n1, b] view of x,
  2. the 2:4 GEMM with S [d_out, d_in] (2:4 along d_in): on CUDA in fp16/bf16 S may be a
     ``torch.sparse.to_sparse_semi_structured`` tensor; elsewhere a dense tensor with zeros,
  3. block-diagonal batched matmul with A_blocks [n0, b, b],
  4. + bias.
This module is the reference every other engine is compared with.

A fused group of the artifact (``--fuse``: q/k/v or gate/up solved as one stacked layer with one B) runs as
ONE ``ArmorLinear`` over the stacked output, owned by a ``FusedArmor`` registered under the fused name
(``self_attn.qkv_proj``, ``mlp.gate_up_proj``); each member projection is replaced by a ``FusedPart`` that
returns its slice of the fused output, so the HF model's forward is unchanged: the first member called with
an input computes the fused linear once, the others reuse it for the same input tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from solver.blockdiag import apply_input_side, apply_output_side


# backend name -> torch.sparse class whose from_dense builds it (None: PyTorch's default choice)
SEMI_STRUCTURED = {"auto": None, "cutlass": "SparseSemiStructuredTensorCUTLASS",
                   "cusparselt": "SparseSemiStructuredTensorCUSPARSELT"}


class ArmorLinear(nn.Module):
    def __init__(self, S: torch.Tensor, A_blocks: torch.Tensor | None, B_blocks: torch.Tensor | None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = S.shape
        self.register_buffer("S", S)
        self.register_buffer("A_blocks", A_blocks)
        self.register_buffer("B_blocks", B_blocks)
        self.register_buffer("bias", bias)
        self._S_sparse = None  # semi-structured copy of S on CUDA (built by to_semi_structured)

    @property
    def weight(self) -> torch.Tensor:
        """Dense effective weight A.S.B (for inspection and references; not used in forward)."""
        from solver.blockdiag import product

        return product(self.A_blocks, self.S, self.B_blocks)

    def to_semi_structured(self, backend: str = "auto", *, strict: bool = False) -> bool:
        """Use a 2:4 compressed copy of S for the GEMM: ``backend`` "cutlass", "cusparselt" or "auto"
        (PyTorch's default choice). Returns False and keeps dense S where PyTorch cannot (CPU, fp32,
        unsupported GPU or shape); with ``strict`` it raises instead, naming the reason."""
        if backend not in SEMI_STRUCTURED:
            raise ValueError(f"unknown semi-structured backend {backend!r}; choose one of {sorted(SEMI_STRUCTURED)}")
        reason = None
        if self.S.device.type != "cuda" or self.S.dtype not in (torch.float16, torch.bfloat16):
            reason = f"needs S on CUDA in fp16/bf16 (S is {self.S.dtype} on {self.S.device.type})"
        elif backend == "cusparselt" and not torch.backends.cusparselt.is_available():
            reason = "cuSPARSELt is not available in this PyTorch build"
        if reason is None:
            try:
                S = self.S.contiguous()
                cls = SEMI_STRUCTURED[backend]
                self._S_sparse = (torch.sparse.to_sparse_semi_structured(S) if cls is None
                                  else getattr(torch.sparse, cls).from_dense(S))
                return True
            except (RuntimeError, ValueError, NotImplementedError) as e:
                reason = f"PyTorch refused the {backend} 2:4 conversion: {e}"
        self._S_sparse = None
        if strict:
            raise RuntimeError(f"ArmorLinear [{self.out_features}x{self.in_features}]: {reason}")
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.B_blocks is not None:
            x = apply_input_side(x, self.B_blocks)
        if self._S_sparse is not None:
            lead = x.shape[:-1]
            z = F.linear(x.reshape(-1, self.in_features), self._S_sparse).reshape(*lead, self.out_features)
        else:
            z = F.linear(x, self.S)
        if self.A_blocks is not None:
            z = apply_output_side(z, self.A_blocks)
        if self.bias is not None:
            z = z + self.bias
        return z

    def extra_repr(self) -> str:
        b = None if self.A_blocks is None else self.A_blocks.shape[-1]
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={b}"


class FusedArmor(nn.Module):
    """One ArmorLinear for a fused group; ``part(j, x)`` is member j's slice of its output for input x."""

    def __init__(self, linear: ArmorLinear, sizes: list[int]):
        super().__init__()
        self.linear, self.sizes = linear, list(sizes)
        self._x = self._parts = None
        self._served: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def part(self, j: int, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x or j in self._served:  # a new input (or a member asked twice): compute once
            self._x, self._parts, self._served = x, torch.split(self.linear(x), self.sizes, dim=-1), set()
        self._served.add(j)
        y = self._parts[j]
        if len(self._served) == len(self.sizes):  # every member served: hold no activation between calls
            self._x = self._parts = None
        return y

    def extra_repr(self) -> str:
        return f"split={self.sizes}"


class FusedPart(nn.Module):
    """Member j of a fused group, in the member's place in the HF model (holds no tensor of its own)."""

    def __init__(self, group: FusedArmor, j: int):
        super().__init__()
        object.__setattr__(self, "_group", group)  # not a submodule: the group is registered once, by its name
        self.j = j
        self.in_features, self.out_features = group.linear.in_features, group.sizes[j]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.part(self.j, x)

    def extra_repr(self) -> str:
        return f"part={self.j} of the fused group, out_features={self.out_features}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def load_armor_model(artifact_dir, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                     semi_structured: bool = False, fused: bool = True):
    """Build the HF model of an artifact with every pruned linear replaced by ArmorLinear; with ``fused``
    (default) every fused group of the artifact runs as one ArmorLinear and a split (``FusedArmor``).

    Reads only the artifact directory. Returns (model, artifact)."""
    from armor_export.artifact import load_artifact, build_base_model
    from solver.fused import stack_biases, stack_factorizations

    art = load_artifact(artifact_dir)
    model = build_base_model(art, dtype=dtype)
    cast = (lambda t: None if t is None else t.to(dtype=dtype))
    grouped = {m for ms in art.groups.values() for m in ms} if fused else set()
    for name, lf in art.layers.items():
        if name not in grouped:
            f = lf.factors
            set_submodule(model, name, ArmorLinear(cast(f.S), cast(f.A_blocks), cast(f.B_blocks), cast(lf.bias)))
    for g, members in (art.groups.items() if fused else ()):
        f = stack_factorizations([art.layers[m].factors for m in members])
        sizes = [art.layers[m].factors.S.shape[0] for m in members]
        bias = stack_biases([art.layers[m].bias for m in members], sizes)
        group = FusedArmor(ArmorLinear(cast(f.S), cast(f.A_blocks), cast(f.B_blocks), cast(bias)), sizes)
        set_submodule(model, g, group)
        for j, m in enumerate(members):
            set_submodule(model, m, FusedPart(group, j))
    model.to(device)
    if semi_structured:
        for m in model.modules():
            if isinstance(m, ArmorLinear):
                m.to_semi_structured()
    model.eval()
    return model, art


class TorchLowering:
    """The 'torch' engine: the artifact itself, loaded into PyTorch. ``lower`` loads it once and writes only
    ``out/torch_runtime.json`` (artifact, dtype, ArmorLinear count, load time; the artifact is untouched);
    ``verify`` compares the runtime at ``cfg.dtype`` with fp32 and reports into ``out``."""

    name = "torch"

    def requires(self, artifact_dir, cfg=None) -> None:
        import json
        from pathlib import Path

        from armor_export.adapters import family_for
        from engines.parity import DTYPES

        cfg_path = Path(artifact_dir) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{Path(artifact_dir)}: no config.json (pass an artifact or model folder)")
        family_for(json.loads(cfg_path.read_text()).get("model_type"), str(cfg_path))
        if cfg is not None and cfg.dtype is not None and cfg.dtype not in DTYPES:
            raise ValueError(f"--dtype {cfg.dtype}: the 'torch' engine runs {'/'.join(DTYPES)}")

    def lower(self, artifact_dir, out_dir, cfg=None):
        import json
        import time
        from pathlib import Path

        from armor_export.fsutil import atomic_dir
        from engines.parity import DTYPES

        self.requires(artifact_dir, cfg)
        dtype = (cfg and cfg.dtype) or "fp32"
        t0 = time.perf_counter()
        model, _ = load_armor_model(artifact_dir, dtype=DTYPES[dtype])
        rec = {"artifact": str(Path(artifact_dir).resolve()), "dtype": dtype,
               "armor_linears": sum(isinstance(m, ArmorLinear) for m in model.modules()),
               "load_seconds": round(time.perf_counter() - t0, 2),
               "load": "engines.torch_module.load_armor_model(artifact, dtype=...)"}
        with atomic_dir(Path(out_dir), overwrite=bool(cfg and cfg.overwrite)) as tmp:
            (tmp / "torch_runtime.json").write_text(json.dumps(rec, indent=2) + "\n")
        return Path(out_dir)

    def verify(self, artifact_dir, engine_dir, cfg=None) -> dict:
        from pathlib import Path

        from armor_export.adapters import model_facts
        from engines.base import ExportConfig
        from engines.onnx_export import read_config
        from engines.parity import DTYPES, TOLERANCES, Check, logits_checks, model_logits, parity_tokens, \
            write_report

        cfg = cfg or ExportConfig()
        dtype = cfg.dtype or "fp32"
        tokens = parity_tokens(cfg.parity_tokens, model_facts(read_config(artifact_dir)), cfg.parity_seqlen)
        ref = model_logits(load_armor_model(artifact_dir)[0], tokens)
        got = model_logits(load_armor_model(artifact_dir, dtype=DTYPES[dtype])[0], tokens)
        checks: list[Check] = logits_checks(ref, got, tokens, TOLERANCES[dtype], f"PyTorch {dtype} vs fp32")
        return write_report(Path(cfg.report_dir or engine_dir), f"PyTorch runtime parity ({dtype})",
                            checks, {"engine": "torch", "dtype": dtype})
