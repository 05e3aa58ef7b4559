"""Inputs real users pass: NaN/inf, non-contiguous, fp64, autocast, eval/no_grad."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ccgqa_compile
from patterns import BY_NAME, Shape

from ._backends import ccgqa_without_codegen
from ._compare import assert_as_close_as_eager, assert_close, rel_err


def _compile_pair(name):
    model = BY_NAME[name].build(Shape())
    return torch.compile(model, backend="ccgqa"), copy.deepcopy(model)


@pytest.mark.parametrize("name", ["rms_hf_llama", "swiglu_hf_llama", "rope_hf_rotate_half"])
def test_nan_and_inf_propagate_like_eager(name):
    compiled, eager = _compile_pair(name)
    x = torch.randn(2, 5, 16)
    x[0, 1, 3] = float("nan")
    x[1, 2, 0] = float("inf")
    with torch.no_grad():
        out_c, out_e = compiled(x), eager(x)
    assert ccgqa_compile.report().count(BY_NAME[name].fusion) == BY_NAME[name].expect
    assert torch.equal(torch.isnan(out_c), torch.isnan(out_e))
    assert torch.equal(torch.isinf(out_c), torch.isinf(out_e))
    finite = torch.isfinite(out_e)
    torch.testing.assert_close(out_c[finite], out_e[finite], rtol=1e-5, atol=1e-6)


def test_non_contiguous_input():
    compiled, eager = _compile_pair("rms_hf_llama")
    x = torch.randn(16, 5, 2).permute(2, 1, 0)  # (2, 5, 16), last dim strided
    assert not x.is_contiguous()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), torch.float32, "non-contiguous")
    assert ccgqa_compile.report().count("rms_norm") == 1


def test_float64_model_fuses_and_stays_exact():
    model = BY_NAME["rms_rsqrt"].build(Shape()).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    out = torch.compile(model, backend="ccgqa")(x)
    ref = copy.deepcopy(model)(x)
    assert ccgqa_compile.report().count("rms_norm") == 1
    assert_close(out, ref, torch.float64, "fp64")


def test_fp64_input_to_an_fp32_cast_idiom():
    # the HF idiom rounds fp64 input to fp32 on the way; recognised by its real function,
    # the op computes it in fp64: the same function, within the fp32 rounding eager adds
    model = BY_NAME["rms_hf_llama"].build(Shape()).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        out = torch.compile(model, backend="ccgqa")(x)
        ref = copy.deepcopy(model)(x)
    assert out.dtype == ref.dtype == torch.float64
    assert (out - ref).abs().max() < 1e-6


def test_autocast_region():
    compiled, eager = _compile_pair("swiglu_hf_llama")
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out_c, out_e = compiled(x), eager(x)
    assert out_c.dtype == out_e.dtype == torch.bfloat16
    assert_close(out_c, out_e, torch.bfloat16, "autocast")
    assert ccgqa_compile.report().count("swiglu") == 1


def test_eval_and_no_grad_inference_graph():
    model = BY_NAME["rope_neox_partial"].build(Shape()).eval()
    with torch.no_grad():
        out = torch.compile(model, backend="ccgqa")(torch.randn(2, 5, 16))
    rep = ccgqa_compile.report()
    assert {g.kind for g in rep.graphs} == {"inference"}
    assert rep.count("rope") == 2
    assert torch.isfinite(out).all()


def test_channels_last_input_trains_like_eager():
    """A 4-D activation in channels-last memory (last dim not the densest): the norm over
    its last dim still fuses, and output and input gradient match eager."""
    compiled, eager = _compile_pair("rms_hf_llama")
    x = torch.randn(2, 16, 5, 16).to(memory_format=torch.channels_last)
    assert x.stride(-1) != 1
    x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(x_c), eager(x_e)
    assert_close(out_c, out_e, torch.float32, "channels-last output")
    g = torch.randn_like(out_e)
    out_c.backward(g)
    out_e.backward(g)
    assert_close(x_c.grad, x_e.grad, torch.float32, "channels-last dx")
    assert ccgqa_compile.report().count("rms_norm") == 1


# ---- part of a region under torch.no_grad() inside a training forward ----------------------


def _rms_stats_without_grad(x, w):
    with torch.no_grad():
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x * r * w


def _gate_without_grad(x, w):
    a, b = (x * w).chunk(2, -1)
    with torch.no_grad():
        g = torch.nn.functional.silu(a)
    return g * b


def _rotation_without_grad(x, w):
    t, d = x.shape[-2], x.shape[-1]
    angles = torch.arange(t, dtype=x.dtype)[:, None] * torch.arange(d // 2, dtype=x.dtype)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x = (x * w).unflatten(-1, (2, d // 2)).transpose(1, 2)  # (B, 2 heads, T, D/2)
    x = x.reshape(x.shape[0], 2, t, d // 2)
    x = torch.cat((x, x), -1)
    with torch.no_grad():
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


def _softmax_without_grad(x, w):
    q = k = v = (x * w).unflatten(-1, (2, -1)).transpose(1, 2)
    t = q.shape[-2]
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    with torch.no_grad():
        p = s.softmax(-1)
    return p @ v


@pytest.mark.parametrize(
    "fn", [_rms_stats_without_grad, _gate_without_grad, _rotation_without_grad, _softmax_without_grad]
)
def test_a_region_partly_under_no_grad_is_left_as_written(fn, monkeypatch):
    """Eager gives the no_grad part no gradient; a fused op's backward would: not fused,
    and every gradient equals eager's."""
    monkeypatch.setenv("CCGQA_FUSE_ON_CPU", "1")
    torch.manual_seed(0)
    x, w = torch.randn(2, 7, 16), torch.randn(16)
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    leaves_c = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    out_c = torch.compile(fn, backend="ccgqa")(*leaves_c)
    grads_c = torch.autograd.grad(out_c, leaves_c, torch.ones_like(out_c), allow_unused=True)
    rep = ccgqa_compile.report()
    assert not rep.counts(), str(rep)
    torch.testing.assert_close(out_c, out)
    for g, g_c in zip(grads, grads_c):
        assert (g is None) == (g_c is None), str(rep)
        if g is not None:
            torch.testing.assert_close(g_c, g)


def test_same_computation_means_equal_values():
    """Region inputs computed twice by the same ops get one probe value (a RoPE table sliced
    once for q, once for k); never two draws, two uninitialised buffers, two reads of a
    tensor the graph writes in place, or one computed under autocast and one not."""
    from ccgqa_compile.passes.fx_util import same_computation

    def f(table, cache, x):
        a, b = table[:4].view(2, 2), table[:4].view(2, 2)
        c = table[:4].view(2, 2) * 1.0
        e1, e2 = torch.empty_like(x), torch.empty_like(x)
        r1, r2 = torch.rand_like(x), torch.rand_like(x)
        k1 = cache[:2] + 0
        cache.add_(1)
        k2 = cache[:2] + 0
        return a, b, c, e1, e2, r1, r2, k1, k2

    graph = torch.fx.symbolic_trace(f).graph
    a, b, c, e1, e2, r1, r2, k1, k2 = next(n for n in graph.nodes if n.op == "output").args[0]
    assert same_computation(a, b) and not same_computation(a, a)
    for x, y in ((a, c), (e1, e2), (r1, r2), (k1, k2)):
        assert not same_computation(x, y), (x.name, y.name)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    def g(table):
        plain = table[:4] * 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = table[:4] * 2
        return plain, autocast, table[:4] * 2

    torch._dynamo.reset()
    torch.compile(g, backend=capture, fullgraph=True)(torch.randn(8))
    plain, autocast, again = next(n for n in graphs[0].nodes if n.op == "output").args[0]
    assert same_computation(plain, again) and not same_computation(plain, autocast)


def _mask_set_after_building(q, k, v):
    """A causal table built from sizes, then one future entry set in place: not causal."""
    t = q.shape[2]
    keep = torch.ones(t, t, dtype=torch.bool).tril()
    keep[0, 1] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)


def _mask_set_after_building_handwritten(q, k, v):
    t = q.shape[2]
    bias = torch.full((t, t), float("-inf")).triu(1)
    bias[2, 5] = 0.0  # query 2 sees key 5
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    return s.softmax(-1) @ vv


def _mask_widened_through_out(q, k, v):
    """``out=`` writes the table too: causal or'ed with the next key."""
    t = q.shape[2]
    keep = torch.ones(t, t, dtype=torch.bool).tril()
    next_key = torch.arange(t)[:, None] + 1 == torch.arange(t)[None, :]
    torch.logical_or(keep, next_key, out=keep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)


def _bias_filled_in_place(q, k, v):
    """Zeros, then ``masked_fill_`` above the first superdiagonal only."""
    t = q.shape[2]
    bias = torch.zeros(t, t)
    bias.masked_fill_(torch.ones(t, t, dtype=torch.bool).triu(2), float("-inf"))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    return ((q @ kk.transpose(-1, -2)) * 0.25 + bias).softmax(-1) @ vv


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize(
    "fn",
    [
        _mask_set_after_building,
        _mask_set_after_building_handwritten,
        _mask_widened_through_out,
        _bias_filled_in_place,
    ],
)
def test_a_mask_written_in_place_after_it_is_built_is_not_proven_causal(fn, training):
    """Evaluating a table from its definition misses writes made to it later: such a table
    is a value known only when the program runs (the hand-written attention may fuse with
    it as a run-time mask, checked when it runs), never a causal mask proven here."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    ins = [x.clone().requires_grad_(training) for x in (q, k, v)]
    with torch.set_grad_enabled(training):
        got = torch.compile(fn, backend=ccgqa_without_codegen, fullgraph=True)(*ins)
    want = fn(q, k, v)
    assert torch.isfinite(want).all() and rel_err(got, want) < 1e-5, str(ccgqa_compile.report())
    idioms = {idiom for (_, idiom) in ccgqa_compile.report().idioms()}
    assert idioms <= {"handwritten_runtime_mask", "sdpa_runtime_mask"}, idioms


class _ScoresClamped(torch.nn.Module):
    """Attention whose scores are clamped to [-30, 30] before the mask."""

    def forward(self, q, k, v):
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = ((q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5).clamp(-30.0, 30.0)
        t = q.shape[2]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ vv


class _ScoresCappedByMinimum(_ScoresClamped):
    """The same cap as ``torch.minimum`` against a constant tensor."""

    def forward(self, q, k, v):
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = torch.minimum((q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5, torch.tensor(30.0))
        t = q.shape[2]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ vv


class _NormCapped(torch.nn.Module):
    """RMSNorm whose normalised values are capped at 4 before the weight."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(1 + 0.1 * torch.randn(64))

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y.clamp_max(4.0) * self.w


def test_a_clamp_the_probes_never_reach_is_left_as_written():
    """On unit-scale probes these clamps never bind, so every probe agrees with the plain
    function; on real data they do (a dominant score, a spike in one channel). Left as
    written: the outputs equal eager's where the clamps bind."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, 16) * 40, torch.randn(2, 2, 8, 16) * 40, torch.randn(2, 2, 8, 16)
    x = torch.randn(2, 5, 64)
    x[..., 3] = 50.0  # one channel dominates: its normalised value is near sqrt(64)
    # the norm's unweighted core, before the clamp, may fuse; never through the clamp
    allowed = {
        _ScoresClamped: set(), _ScoresCappedByMinimum: set(),
        _NormCapped: {("rms_norm", "unweighted")},
    }  # fmt: skip
    cases = ((_ScoresClamped(), (q, k, v)), (_ScoresCappedByMinimum(), (q, k, v)), (_NormCapped(), (x,)))
    for model, inputs in cases:
        torch._dynamo.reset()
        ccgqa_compile.reset_report()
        with torch.no_grad():
            got = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)(*inputs)
            want = model(*inputs)
        assert rel_err(got, want) < 1e-6, str(ccgqa_compile.report())
        rep = ccgqa_compile.report()
        assert set(rep.idioms()) <= allowed[type(model)], str(rep)
        assert any("clamps at" in r.reason for r in rep.rejected), str(rep)


def _rotate_half(x):  # HF's: slices of x, views of the storage the clamp writes
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class _ClippedQKV(torch.nn.Module):
    """OLMo's ``clip_qkv``: q, k, v clamped in place after the projections, then RoPE and
    causal GQA (SDPA or written out)."""

    H, KV, D, CLIP = 4, 2, 16, 0.05

    def __init__(self, sdpa: bool):
        super().__init__()
        self.sdpa = sdpa
        self.q = torch.nn.Linear(32, self.H * self.D, bias=False)
        self.k = torch.nn.Linear(32, self.KV * self.D, bias=False)
        self.v = torch.nn.Linear(32, self.KV * self.D, bias=False)

    def heads(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.H, self.D).transpose(1, 2)
        k = self.k(x).view(b, t, self.KV, self.D).transpose(1, 2)
        v = self.v(x).view(b, t, self.KV, self.D).transpose(1, 2)
        return q, k, v

    def rotate(self, q, k, cos, sin):
        for z in (q, k):
            z.clamp_(min=-self.CLIP, max=self.CLIP)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def forward(self, x, cos, sin):
        q, k, v = self.heads(x)
        v.clamp_(min=-self.CLIP, max=self.CLIP)
        q, k = self.rotate(q, k, cos, sin)
        g = self.H // self.KV
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t = x.shape[1]
        s = q @ k.transpose(-1, -2) * self.D**-0.5 + torch.full((t, t), float("-inf")).triu(1)
        return torch.softmax(s, dim=-1) @ v


class _ClampedMidRotation(_ClippedQKV):
    """Near miss: q clamped in place between its two products, so ``q * cos`` reads q
    before the clamp and ``rotate_half(q)`` after it: no single rotation of one q."""

    def rotate(self, q, k, cos, sin):
        q_cos = q * cos
        q.clamp_(min=-self.CLIP, max=self.CLIP)
        return q_cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rope_tables(t, d):
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    f = torch.outer(torch.arange(t).float(), inv)
    f = torch.cat((f, f), dim=-1)
    return f.cos(), f.sin()


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize(
    ("build", "rope"),
    [
        (lambda: _ClippedQKV(sdpa=True), 2),
        (lambda: _ClippedQKV(sdpa=False), 2),
        (lambda: _ClampedMidRotation(sdpa=True), 1),
    ],
    ids=["sdpa", "handwritten", "near_clamp_mid_rotation"],
)
def test_projections_clamped_in_place_before_rope(build, rope, training):
    """A write to q/k/v before every read of the regions (RoPE, attention) leaves the
    regions reading the written values: they fuse, the op placed after the write. A write
    between two reads of one region leaves that region as written. The clamp binds here
    (weights of scale 0.3 against a bound of 0.05)."""
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 12, 32)
    cos, sin = _rope_tables(12, model.D)
    ins = [x.clone().requires_grad_(training) for _ in range(2)]
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    with torch.set_grad_enabled(training):
        got = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)(ins[0], cos, sin)
        want = model(ins[1], cos, sin)
    rep = ccgqa_compile.report()
    assert rel_err(got, want) < 1e-5, str(rep)
    if training:
        (g_got,) = torch.autograd.grad(got, ins[0], torch.ones_like(got))
        (g_want,) = torch.autograd.grad(want, ins[1], torch.ones_like(want))
        assert rel_err(g_got, g_want) < 1e-5, str(rep)
    assert rep.count("rope") == rope and rep.count("gqa_attention") == 1, str(rep)


def _rms_weighted_loss(w, x):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w * x).sum()


def _rope_of_projection_loss(wq, x, cos, sin):
    q = (x @ wq).view(2, 8, 4, 16).transpose(1, 2)
    return ((q * cos + _rotate_half(q) * sin) * 0.5).square().sum()


def test_functorch_transforms_compiled_whole_are_left_alone():
    """``torch.compile(torch.func.grad(f))``: the transform marks the differentiated input
    as requiring grad partway through Dynamo's graph, and the ops' autograd has no
    functorch levels. A fused RMSNorm placed before that mark returned a zero gradient, a
    fused RoPE failed the compile; such graphs are left to Inductor, with a note."""
    torch.manual_seed(0)
    x, w, wq = torch.randn(2, 8, 64), torch.randn(64), torch.randn(64, 64) / 8
    cos, sin = _rope_tables(8, 16)
    cases = [
        (torch.func.grad(_rms_weighted_loss), (w, x)),
        (torch.func.grad(_rope_of_projection_loss), (wq, x, cos, sin)),
        (torch.vmap(lambda xi: _rms_weighted_loss(w, xi)), (x,)),
    ]
    for fn, args in cases:
        torch._dynamo.reset()
        ccgqa_compile.reset_report()
        got = torch.compile(fn, backend=ccgqa_without_codegen)(*args)
        want = fn(*args)
        rep = ccgqa_compile.report()
        assert want.norm() > 0 and rel_err(got, want) < 1e-5, str(rep)
        assert not rep.counts(), str(rep)
        assert "functorch transform" in str(rep), str(rep)


class _RopeSdpaUnderAutocast(torch.nn.Module):
    """Projections, RoPE with float32 tables, SDPA causal GQA: under a bf16 autocast q and
    k come out float32 (bf16 projections times float32 tables), v bfloat16; SDPA casts the
    three to bf16."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(32, 4 * 16, bias=False)
        self.k = torch.nn.Linear(32, 2 * 16, bias=False)
        self.v = torch.nn.Linear(32, 2 * 16, bias=False)
        self.DIM = 32

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 16).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 16).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 16).transpose(1, 2)
        cos, sin = _rope_tables(t, 16)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("name", ["rope_sdpa", "ccgqa_zaya_style", "ccgqa_conv_pad_slice"])
def test_attention_and_blocks_fuse_under_an_autocast_around_the_call(name, training):
    """``with torch.autocast(...): model(x)``: Dynamo keeps no autocast region in the graph
    for an autocast around the call, it compiles under it. The attention's q, k, v dtypes
    then differ as written (fp32 RoPE tables) and agree once SDPA's autocast casts them;
    the op we emit casts them the same way. Outputs and gradients are as close to float64
    as eager's under the same autocast."""
    from . import spellings as sp

    build = {
        "rope_sdpa": _RopeSdpaUnderAutocast,
        "ccgqa_zaya_style": sp.CCGQAZayaStyle,
        "ccgqa_conv_pad_slice": sp.CCGQAConvPadSlice,
    }[name]
    torch.manual_seed(0)
    model = build().train(training)
    eager, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(2, 9, model.DIM)
    x_c, x_e = (x.clone().requires_grad_(training) for _ in range(2))
    x_r = x.double().requires_grad_(training)
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    compiled = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)
    with torch.set_grad_enabled(training):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_c, out_e = compiled(x_c), eager(x_e)
        out_r = reference(x_r)
    rep = ccgqa_compile.report()
    assert out_c.dtype == out_e.dtype, str(rep)
    assert_as_close_as_eager(out_c, out_e, out_r, torch.bfloat16, f"{name} output\n{rep}")
    expect = {"gqa_attention": 1} if name == "rope_sdpa" else {"ccgqa_block": 1}
    for fusion, count in expect.items():
        assert rep.count(fusion) == count, str(rep)
    if training:
        g = torch.randn_like(out_r)
        params = [x_c, *model.parameters()], [x_e, *eager.parameters()], [x_r, *reference.parameters()]
        grads = [
            torch.autograd.grad(o, p, g.to(o.dtype), allow_unused=True)
            for o, p in zip((out_c, out_e, out_r), params)
        ]
        for gc, ge, gr in zip(*grads):
            if gr is not None:
                assert_as_close_as_eager(gc, ge, gr, torch.bfloat16, f"{name} gradient\n{rep}", True)


class _ScoresTimesTensor(torch.nn.Module):
    """Causal GQA whose scores are multiplied by a tensor known only when the program runs:
    a 0-d one (a buffer, or Swin-v2's / CLIP's learned ``logit_scale``), the same for
    every key of a row, is q's scale (moved onto q, ``passes/score_factors.py``); a
    (T, T) one is not. The 0-d one was once taken for a run-time additive mask, and the
    probes drew that one-element 'mask' fully blocked, where region and op both give NaN:
    'proven', fused, 84% wrong."""

    def __init__(self, kind: str):
        super().__init__()
        scale = torch.tensor(0.25) if kind != "per_key_pair" else 0.25 + torch.rand(12, 12)
        if kind == "parameter":
            self.scale = torch.nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def forward(self, q, k, v):
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = (q @ k.transpose(-1, -2)) * self.scale
        t = q.shape[2]
        s = s.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), float("-inf"))
        return s.softmax(-1) @ v


@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("kind", ["buffer", "parameter", "per_key_pair"])
def test_scores_scaled_by_a_run_time_tensor(kind, training):
    torch.manual_seed(0)
    model = _ScoresTimesTensor(kind)
    reference = copy.deepcopy(model).double()
    inputs = [torch.randn(2, 4, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)]
    inputs = [x.requires_grad_(training) for x in inputs]
    inputs64 = [x.detach().double().requires_grad_(training) for x in inputs]
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    with torch.set_grad_enabled(training):
        got = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)(*inputs)
        want = model(*[x.detach().requires_grad_(training) for x in inputs])
        ref = reference(*inputs64)
    rep = ccgqa_compile.report()
    assert_as_close_as_eager(got, want, ref, torch.float32, f"output\n{rep}")
    assert rep.count("gqa_attention") == (0 if kind == "per_key_pair" else 1), str(rep)
    if training:
        upstream = torch.randn_like(ref)
        params = [p for p in model.parameters()]
        grads = torch.autograd.grad(got, [*inputs, *params], upstream.float())
        grads64 = torch.autograd.grad(ref, [*inputs64, *reference.parameters()], upstream)
        for g, g64 in zip(grads, grads64):
            assert rel_err(g, g64) < 1e-5, str(rep)



def test_halves_swapped_outside_rope_fuse_nothing_and_report_nothing():
    """cat((x2, x1)) and roll are RoPE's rotation only with a signed sin table: a swap of
    halves anywhere else (a mixing layer) is tried quietly, left as written, and says
    nothing in the report."""

    def swap_mix(x, w):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x2, x1), dim=-1) @ w + torch.roll(x, 3, dims=-1)

    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 8), torch.randn(8, 8)
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    got = torch.compile(swap_mix, backend=ccgqa_without_codegen, fullgraph=True)(x, w)
    rep = ccgqa_compile.report()
    assert rel_err(got, swap_mix(x, w)) < 1e-6
    assert rep.count("rope") == 0 and not any(r.fusion == "rope" for r in rep.rejected), str(rep)


def test_the_code_a_fusion_writes_is_no_later_anchor():
    """A prologue whose rotation swaps halves without a sign (x * cos + cat(x2, x1) * sin)
    fuses with the op's sin written as cat(-sin[:h], sin[h:]); that concatenation with a
    negation, our own code, is no RoPE for the RoPE pass to try and report."""
    from .spellings import CCGQAConvPadSlice

    class SwapRotation(CCGQAConvPadSlice):
        def rotate(self, q, k, t, device):
            cos, sin = (table.to(q.dtype) for table in self.tables(t, device))

            def swap(x):
                x1, x2 = x.chunk(2, dim=-1)
                return torch.cat((x2, x1), dim=-1)

            return q * cos + swap(q) * sin, k * cos + swap(k) * sin

    torch.manual_seed(0)
    model = SwapRotation()
    x = torch.randn(2, 9, model.DIM)
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    with torch.no_grad():
        got = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)(x)
        want = copy.deepcopy(model).double()(x.double())
    rep = ccgqa_compile.report()
    assert rel_err(got, want) < 1e-5, str(rep)
    assert rep.count("ccgqa_block") == 1, str(rep)
    assert not any(r.fusion == "rope" for r in rep.rejected), str(rep)


class _NormClampedBelow(torch.nn.Module):
    """An RMS written with the norm clamped from below (``F.normalize``-style eps): a row
    of zeros (a padding position) gives zeros, where eps under the root at 0 gives NaN
    (it fused so once); the op's clamped form gives zeros."""

    def __init__(self):
        super().__init__()
        self.g = torch.nn.Parameter(1 + 0.1 * torch.randn(16))

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * 16**0.5 * self.g


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_rows_of_zeros_normalise_as_written(training):
    torch.manual_seed(0)
    model = _NormClampedBelow()
    x = torch.randn(2, 5, 16)
    x[0, 1] = 0.0
    xs = [x.clone().requires_grad_(training) for _ in range(2)]
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    with torch.set_grad_enabled(training):
        got = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)(xs[0])
        want = model(xs[1])
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-6, str(ccgqa_compile.report())
    assert ccgqa_compile.report().counts().get("rms_norm") == 1, str(ccgqa_compile.report())
    if training:
        (g_got,) = torch.autograd.grad(got.sum(), xs[0])
        (g_want,) = torch.autograd.grad(want.sum(), xs[1])
        assert torch.isfinite(g_got).all() and rel_err(g_got, g_want) < 1e-6, str(ccgqa_compile.report())


def test_activation_checkpointed_block_fuses():
    """A CCGQA block under ``torch.utils.checkpoint`` (non-reentrant): Dynamo traces it
    into a higher-order op's body graph, which Inductor hands the pre-grad passes on its
    own; the whole block fuses there, and output and every gradient match eager."""
    from torch.utils.checkpoint import checkpoint

    from .spellings import CCGQAConvPadSlice

    torch.manual_seed(0)
    block = CCGQAConvPadSlice()

    def step(x):
        return checkpoint(block, x, use_reentrant=False)

    x = torch.randn(2, 9, block.DIM, requires_grad=True)
    ccgqa_compile.reset_report()
    out_c = torch.compile(step, backend=ccgqa_without_codegen)(x)
    out_e = step(x)
    rep = ccgqa_compile.report()
    assert rep.count("ccgqa_block") == 1, str(rep)
    wrt = [x, *block.parameters()]
    grad = torch.randn_like(out_e)
    for got, want in zip(torch.autograd.grad(out_c, wrt, grad), torch.autograd.grad(out_e, wrt, grad)):
        assert torch.isfinite(got).all() and rel_err(got, want) < 2e-5
    assert rel_err(out_c, out_e) < 2e-5
