"""Dynamic sequence length: one compilation serves every length, fusions fire, results match."""

from __future__ import annotations

import copy

import pytest
import torch

import ccgqa_compile
from patterns import BY_NAME, Shape

from ._compare import assert_close


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize(
    "name", ["rms_hf_llama", "swiglu_hf_llama", "swiglu_fused_gate_up", "rope_hf_rotate_half"]
)
def test_mark_dynamic_sequence_compiles_once(name, training):
    entry = BY_NAME[name]
    model = entry.build(Shape())
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="ccgqa")
    for seq in (5, 9, 17):
        (x,) = entry.make_inputs(Shape(seq=seq), torch.float32, "cpu")
        x_c, x_e = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
        torch._dynamo.mark_dynamic(x_c, 1)
        with torch.set_grad_enabled(training):
            out_c, out_e = compiled(x_c), eager(x_e)
        assert_close(out_c, out_e, torch.float32, f"{name} seq={seq}")
        if training:
            g = torch.randn_like(out_e)
            out_c.backward(g)
            out_e.backward(g)
            assert_close(x_c.grad, x_e.grad, torch.float32, f"{name} seq={seq} dx")
    rep = ccgqa_compile.report()
    assert len(rep.graphs) == 1, f"recompiled: {len(rep.graphs)} graphs\n{rep}"
    assert rep.count(entry.fusion) == entry.expect, str(rep)
