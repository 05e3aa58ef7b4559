"""The report names every whole CCGQA block that runs on the fused prologue + attention, and
says which half is missing where only one half fused (passes/blocks.py)."""

from __future__ import annotations

import torch
from torch import nn

import ccgqa_compile
from patterns.ccgqa import CCGQAttention

from ._backends import ccgqa_without_codegen
from ._compare import rel_err


class TwoBlocks(nn.Module):
    """Two CCGQA blocks in a row (residual), as in a two-layer model."""

    def __init__(self, **options):
        super().__init__()
        self.first = CCGQAttention(32, 4, 2, 8, **options)
        self.second = CCGQAttention(32, 4, 2, 8, **options)

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


def _compile_and_check(model: nn.Module, training: bool) -> ccgqa_compile.FusionReport:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32, requires_grad=training)
    ccgqa_compile.reset_report()
    compiled = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)
    with torch.set_grad_enabled(training):
        assert rel_err(compiled(x), model(x)) < 1e-5
    return ccgqa_compile.report()


def test_each_block_of_a_two_layer_model_is_named():
    torch.manual_seed(0)
    rep = _compile_and_check(TwoBlocks(), training=True)
    assert rep.count("ccgqa_block") == 2, str(rep)
    assert rep.count("ccgqa_prologue") == 2 and rep.count("gqa_attention") == 2, str(rep)
    assert "fused    ccgqa_block    x2   idiom=prologue+attention" in str(rep)
    assert not [r for r in rep.unfused_candidates if r.fusion == "ccgqa_block"], str(rep)


def test_a_block_whose_attention_stays_unfused_says_so():
    """Non-causal attention is no causal kernel's job: the prologue fuses, the block does
    not, and the report says which half is missing."""
    torch.manual_seed(0)
    rep = _compile_and_check(CCGQAttention(32, 4, 2, 8, attention="sdpa", causal=False), False)
    assert rep.count("ccgqa_prologue") == 1 and rep.count("ccgqa_block") == 0, str(rep)
    missing = [r for r in rep.unfused_candidates if r.fusion == "ccgqa_block"]
    assert len(missing) == 1 and "its attention did not" in missing[0].reason, str(rep)


def test_a_block_whose_prologue_stays_unfused_says_so():
    """A block without qk-mean is not a prologue spelling yet: attention fuses, the block
    does not."""
    torch.manual_seed(0)
    rep = _compile_and_check(CCGQAttention(32, 4, 2, 8, qk_mean=False), False)
    assert rep.count("gqa_attention") == 1 and rep.count("ccgqa_block") == 0, str(rep)
    missing = [r for r in rep.unfused_candidates if r.fusion == "ccgqa_block"]
    assert len(missing) == 1 and "q/k prologue did not" in missing[0].reason, str(rep)
