"""Tensors known by their shape and read only when they are written (ONNX external data, tensor by tensor).

A ``Deferred`` holds a shape and a function returning the torch tensor. ``engines.onnx_graph`` turns
it into an ``onnx_ir.LazyTensor``: the graph is built from shapes alone and ``onnx_ir.save`` calls the
function once per initializer while it writes the external data, so the exporter holds one tensor (one
layer's factors) at a time instead of every weight of the model. ``transpose`` composes lazily.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Deferred:
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    def transpose(self, a: int, b: int) -> Deferred:
        n = len(self.shape)
        a, b = a % n, b % n
        shape = list(self.shape)
        shape[a], shape[b] = shape[b], shape[a]
        load = self.load
        return Deferred(tuple(shape), lambda: load().transpose(a, b))

    def ir_tensor(self, name: str, dtype: torch.dtype, *, plus_zero: bool = False):
        """An ``onnx_ir.LazyTensor`` in ``dtype`` (``plus_zero``: -0.0 becomes +0.0), evaluated when saved."""
        import onnx_ir as ir
        from onnx_ir.tensor_adapters import TorchTensor

        load = self.load

        def make():
            t = load().detach().to(dtype).contiguous()
            if tuple(t.shape) != self.shape:
                raise ValueError(f"{name}: read shape {tuple(t.shape)}, the graph was built for {self.shape}")
            return TorchTensor(t + 0.0 if plus_zero else t, name=name)

        ir_dtype = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
                    torch.bfloat16: ir.DataType.BFLOAT16}[dtype]
        return ir.LazyTensor(make, dtype=ir_dtype, shape=ir.Shape(self.shape), name=name)
