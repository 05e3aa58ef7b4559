"""The report names every whole CCGQA block that runs on the fused prologue + attention, and
says which half is missing where only one half fused (passes/blocks.py)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import ccgqa_compile
from patterns import ccgqa as ccgqa_module
from patterns.ccgqa import CCGQAAttentionSeed, CCGQAttention
from patterns.rope import rotary_tables

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


def _compile_and_check(
    model: nn.Module, training: bool, width: int = 32
) -> ccgqa_compile.FusionReport:
    """Compiled vs eager: the output, and in training every gradient (x's included)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, width, requires_grad=training)
    ccgqa_compile.reset_report()
    compiled = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)
    with torch.set_grad_enabled(training):
        out_c, out_e = compiled(x), model(x)
    assert rel_err(out_c, out_e) < 1e-5
    if training:
        wrt = [x, *model.parameters()]
        grad_out = torch.randn_like(out_e)
        grads_c = torch.autograd.grad(out_c, wrt, grad_out)
        grads_e = torch.autograd.grad(out_e, wrt, grad_out)
        for i, (got, want) in enumerate(zip(grads_c, grads_e)):
            assert rel_err(got, want) < 1e-5, i
    return ccgqa_compile.report()


def test_each_block_of_a_two_layer_model_is_named():
    torch.manual_seed(0)
    rep = _compile_and_check(TwoBlocks(), training=True)
    assert rep.count("ccgqa_block") == 2, str(rep)
    assert rep.count("ccgqa_prologue") == 2 and rep.count("gqa_attention") == 2, str(rep)
    assert "fused    ccgqa_block    x2   idiom=prologue+fused_attention" in str(rep)
    assert not [r for r in rep.unfused_candidates if r.fusion == "ccgqa_block"], str(rep)


def test_blocks_on_sdpa_kernels_say_which_core_runs(monkeypatch):
    """Where SDPA's kernels beat ours (wide heads on CUDA), recognised hand-written attention
    runs on them: forced here on CPU. Outputs and every gradient match eager, and the
    report names the core."""
    from ccgqa_compile import config

    monkeypatch.setattr(config, "HANDWRITTEN_ATTENTION_CORE", "sdpa")
    rep = _compile_and_check(TwoBlocks(), training=True)
    assert rep.idioms()[("gqa_attention", "handwritten_sdpa_core")] == 2, str(rep)
    assert rep.idioms()[("ccgqa_block", "prologue+fused_attention_sdpa_core")] == 2, str(rep)
    assert not [r for r in rep.unfused_candidates if r.fusion == "ccgqa_block"], str(rep)
    # the core's gradient reaches SDPA contiguous, whatever layout the code around it uses
    from ccgqa_compile.ops.gqa_attention import contiguous_grad

    graphs = []
    torch._dynamo.reset()
    torch.compile(TwoBlocks(), backend=lambda gm, ex: graphs.append(gm) or ccgqa_without_codegen(gm, ex))(
        torch.randn(2, 6, 32, requires_grad=True)
    )
    assert sum(n.target is contiguous_grad for n in graphs[0].graph.nodes) == 2
    # a near miss of causal attention is still left alone
    near = CCGQAttention(32, 4, 2, 8, causal=False)
    rep = _compile_and_check(near, training=False)
    assert rep.count("gqa_attention") == 0 and rep.count("ccgqa_block") == 0, str(rep)


@pytest.mark.parametrize(
    "options",
    [dict(qk_mean=False, temperature="none"), dict(qk_concat=True)],
    ids=["no-mean-no-temperature", "zyphra-concat"],
)
def test_each_block_of_another_spelling_is_named(options):
    """Without qk-mean and temperature q's and k's chains look alike (the matcher must pair
    each q with its own block's k); Zyphra's concatenated convs are sliced and conv1's bias
    folded into conv2's."""
    torch.manual_seed(0)
    rep = _compile_and_check(TwoBlocks(**options), training=True)
    assert rep.count("ccgqa_prologue") == 2 and rep.count("ccgqa_block") == 2, str(rep)
    assert not rep.unfused_candidates, str(rep)


class MixedBlocks(nn.Module):
    """A genuine block and a near miss of it (convs that see later tokens); ``near_first``:
    the near miss is the first layer, so the genuine block's q and k have its unfused
    convolutions among their ancestors."""

    def __init__(self, near_first: bool = False, **options):
        super().__init__()
        genuine = CCGQAttention(32, 4, 2, 8, **options)
        near = CCGQAttention(32, 4, 2, 8, conv_padding="symmetric", conv_kernels=(3, 3), **options)
        self.first, self.second = (near, genuine) if near_first else (genuine, near)

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


SHARED_TABLE_SPELLINGS = {
    "mean": dict(),
    "no-mean": dict(qk_mean=False),
    "no-mean-no-temperature": dict(qk_mean=False, temperature="none"),
}


@pytest.mark.parametrize(
    "mixed", [False, True, "near-first"], ids=["two-blocks", "block-and-near-miss", "near-miss-first"]
)
@pytest.mark.parametrize("spelling", SHARED_TABLE_SPELLINGS)
def test_blocks_sharing_one_rope_table(spelling, mixed):
    """One RoPE table for every block, as models that compute cos/sin once pass it on.
    Without qk-mean, q's and k's chains meet only in that table, so every block's chains
    are candidates for every q: each q must still be paired with its own block's k (a
    pairing with another block's would feed the op its own output), and a near miss
    sharing the table must stay unfused. Every result matches eager."""
    torch.manual_seed(0)
    options = SHARED_TABLE_SPELLINGS[spelling]
    if mixed:
        model = MixedBlocks(near_first=mixed == "near-first", **options)
    else:
        model = TwoBlocks(**options)
    cos, sin = rotary_tables(6, 8, "cpu", torch.float32)  # (T, head dim) of _compile_and_check
    with mock.patch.object(ccgqa_module, "rotary_tables", lambda *_: (cos, sin)):
        rep = _compile_and_check(model, training=True)
    expected = 1 if mixed else 2
    assert rep.count("ccgqa_prologue") == expected, str(rep)
    assert rep.count("ccgqa_block") == expected, str(rep)


def test_a_block_whose_attention_stays_unfused_says_so():
    """Non-causal attention is no causal kernel's job: the prologue fuses, the block does
    not, and the report says which half is missing."""
    torch.manual_seed(0)
    rep = _compile_and_check(CCGQAttention(32, 4, 2, 8, attention="sdpa", causal=False), False)
    assert rep.count("ccgqa_prologue") == 1 and rep.count("ccgqa_block") == 0, str(rep)
    missing = [r for r in rep.unfused_candidates if r.fusion == "ccgqa_block"]
    assert len(missing) == 1 and "not causal" in missing[0].reason, str(rep)


def test_a_block_whose_prologue_stays_unfused_says_so():
    """The original project's variant in a training graph: its prologue is recognised but
    left to Inductor there (config.SEED_PROLOGUE_IN_TRAINING): attention fuses,
    the block does not."""
    torch.manual_seed(0)
    block = CCGQAAttentionSeed(64, 4, 2, 2)  # head dim 64 / (2 * 4) = 8
    rep = _compile_and_check(block, True, width=64)
    assert rep.count("gqa_attention") == 1 and rep.count("ccgqa_block") == 0, str(rep)
    missing = [r for r in rep.unfused_candidates if r.fusion == "ccgqa_block"]
    assert len(missing) == 1 and "q/k prologue did not" in missing[0].reason, str(rep)


class _UnreadableConvBlock(nn.Module):
    """A CCGQA block whose convolutions are written as a form no reader takes (the shifted
    copies times a channel-mixing weight, summed by ``.sum``): it cannot fuse, and the
    report must say why instead of showing the attention alone."""

    def __init__(self, plain=False):
        super().__init__()
        self.plain = plain
        self.wq, self.wk = nn.Linear(32, 32, bias=False), nn.Linear(32, 16, bias=False)
        self.wv, self.wo = nn.Linear(32, 16, bias=False), nn.Linear(32, 32, bias=False)
        self.mix_q, self.mix_k = nn.Parameter(torch.randn(2, 32, 32) / 6), nn.Parameter(torch.randn(2, 16, 16) / 4)

    def conv(self, x, mix):
        if self.plain == "head-padded":  # each head's 8 dims padded to 16 (an alignment)
            return torch.nn.functional.pad(x.unflatten(-1, (-1, 8)), (0, 8)).flatten(-2)
        if self.plain:
            return x
        delayed = torch.stack([x, torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]])
        return (delayed.unsqueeze(-2) * mix[:, None, None]).sum(-1).sum(0)

    def forward(self, x):
        b, t, _ = x.shape
        d = 16 if self.plain == "head-padded" else 8
        q = self.conv(self.wq(x), self.mix_q).view(b, t, 4, d).transpose(1, 2)
        k = self.conv(self.wk(x), self.mix_k).view(b, t, 2, d).transpose(1, 2)
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        v = self.wv(x).view(b, t, 2, 8).transpose(1, 2)
        if d == 16:
            v = torch.nn.functional.pad(v, (0, 8))
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(o[..., :8].transpose(1, 2).reshape(b, t, 32))


@pytest.mark.parametrize(
    "plain", [False, True, "head-padded"], ids=["unreadable-convs", "plain-gqa", "plain-head-padded"]
)
def test_a_block_whose_convs_are_not_recognised_says_so(plain):
    rep = _compile_and_check(_UnreadableConvBlock(plain), training=False)
    reasons = [r.reason for r in rep.unfused_candidates if r.fusion == "ccgqa_block"]
    assert rep.count("gqa_attention") == 1 and rep.count("ccgqa_block") == 0, str(rep)
    if plain:
        assert not reasons, str(rep)  # plain attention: nothing to say
    else:
        assert any("no convolution was recognised" in r for r in reasons), str(rep)
