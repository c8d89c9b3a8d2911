"""ArmorLinear equals the dense product, and the artifact runtime equals the pruned model."""
from __future__ import annotations

import torch

from engines.torch_module import ArmorLinear, load_armor_model
from solver.blockdiag import to_dense
from solver.sparsity import mask_24


def test_armor_linear_equals_dense_product():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, b = 20, 12, 4  # valid but neither square nor powers of two
    W = torch.randn(d_out, d_in, generator=g)
    S = torch.where(mask_24(W.abs()), W, torch.zeros(()))
    A = torch.randn(d_out // b, b, b, generator=g)
    B = torch.randn(d_in // b, b, b, generator=g)
    bias = torch.randn(d_out, generator=g)
    x = torch.randn(3, 5, d_in, generator=g)
    ref = x.double() @ (to_dense(A).double() @ S.double() @ to_dense(B).double()).T + bias.double()
    y = ArmorLinear(S, A, B, bias)(x)
    # fp32 reimplementation vs fp64 reference: errors ~1e-6 relative for these magnitudes
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # identity wrappers (None) reduce to a plain linear
    torch.testing.assert_close(ArmorLinear(S, None, None, None)(x), x @ S.T, rtol=0, atol=0)


def test_semi_structured_is_refused_on_cpu():
    lin = ArmorLinear(torch.zeros(8, 16), None, None)
    assert lin.to_semi_structured() is False


def test_artifact_runtime_matches_dense_reconstruction(tiny_artifact):
    from armor_export.artifact import build_base_model, load_artifact

    model, art = load_armor_model(tiny_artifact)
    ref = build_base_model(load_artifact(tiny_artifact))
    with torch.no_grad():
        for name, lf in art.layers.items():
            ref.get_submodule(name).weight.copy_(lf.factors.to_dense())
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = ref.eval()(input_ids=ids).logits
    # same math in a different association order, fp32: agree to ~1e-5
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_semi_structured_backend_names_and_strict_reason():
    import pytest

    lin = ArmorLinear(torch.zeros(8, 16), None, None)
    with pytest.raises(ValueError, match="unknown semi-structured backend"):
        lin.to_semi_structured("bogus")
    with pytest.raises(RuntimeError, match="needs S on CUDA in fp16/bf16"):
        lin.to_semi_structured("cutlass", strict=True)
