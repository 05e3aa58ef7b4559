"""Decode steps: a few new query tokens attending a KV cache -> ``ccgqa.gqa_decode_attention``.

SDPA over a cache, as HF (repeat_kv, no mask for one token), gpt-fast (static cache
buffers updated in place, ``enable_gqa``, a bool row of a causal table at the token's
position) and speculative decoding (a few tokens, a mask) write it, fuses and matches eager
and a float64 copy; near misses (SDPA's top-left ``is_causal`` over a longer cache, dropout,
a training graph, a long query chunk) are left alone with their reason. HF Llama and ZAYA
``generate`` with the model compiled by ``backend="ccgqa"`` give eager's greedy tokens, and
the report shows the decode fusion in the decode graphs (and ZAYA's whole CCGQA block in
its cached prefill).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ccgqa_compile
from ccgqa_compile import config

from ._backends import ccgqa_without_codegen
from ._compare import assert_as_close_as_eager, rel_err


def repeat_kv(x, groups):
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def hf_decode(q, k, v):
    """HF's SDPA path for one token: K/V repeated, no mask, not causal."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), is_causal=False)


def decode_with_bool_mask(q, k, v):
    """Speculative tokens at the end of the cache: each sees the cache up to itself."""
    t_q, t_k = q.shape[2], k.shape[2]
    pos = torch.arange(t_k - t_q, t_k)
    mask = torch.arange(t_k)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def decode_with_additive_mask(q, k, v):
    t_q, t_k = q.shape[2], k.shape[2]
    pos = torch.arange(t_k - t_q, t_k)
    mask = torch.zeros(t_q, t_k).masked_fill(torch.arange(t_k)[None, :] > pos[:, None], float("-inf"))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)


def hand_one_token_einsum(q, k, v):
    """Written out for one token: einsum scores over the repeated cache, no mask."""
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q, repeat_kv(k, g)) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), repeat_kv(v, g))


def hand_speculative_manual_softmax(q, k, v):
    """A few speculative tokens, the softmax written out in fp32, a bottom-right causal
    bool table over the cache."""
    t_q, t_k = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    keep = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
    s = (q.float() @ k.repeat_interleave(g, 1).float().mT) * 0.3
    s = s.masked_fill(~keep, float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return ((e / e.sum(-1, keepdim=True)).to(q.dtype) @ v.repeat_interleave(g, 1))


SPELLINGS = {
    "hf_one_token": (hf_decode, 1, "sdpa"),
    "hand_one_token_einsum": (hand_one_token_einsum, 1, "handwritten"),
    "hand_speculative_manual_softmax": (hand_speculative_manual_softmax, 3, "handwritten_mask"),
    "speculative_bool_mask": (decode_with_bool_mask, 3, "sdpa_mask"),
    "additive_mask_repeat_interleave": (decode_with_additive_mask, 2, "sdpa_mask"),
}


def qkv(t_q, t_k=23, heads=4, kv_heads=2, d=16, batch=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(t_q + t_k)
    q = torch.randn(batch, heads, t_q, d, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, t_k, d, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, t_k, d, generator=gen, dtype=dtype)
    return q, k, v


def compile_and_compare(fn, inputs, dtype=torch.float32, dynamic=None):
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    with torch.no_grad():
        out_c = torch.compile(fn, backend=ccgqa_without_codegen, fullgraph=True, dynamic=dynamic)(*inputs)
        out_e = fn(*inputs)
        out_r = fn(*(t.double() for t in inputs))
    assert_as_close_as_eager(out_c, out_e, out_r, dtype, "decode output")
    return ccgqa_compile.report()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_decode_spelling_fires_and_matches_eager(name, dtype):
    fn, t_q, idiom = SPELLINGS[name]
    rep = compile_and_compare(fn, qkv(t_q, dtype=dtype), dtype)
    assert rep.idioms() == {("gqa_decode_attention", idiom): 1}, str(rep)


def test_decode_over_a_growing_cache_with_dynamic_length():
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    compiled = torch.compile(hf_decode, backend=ccgqa_without_codegen)
    with torch.no_grad():
        for t_k in (9, 10, 17):  # the second length recompiles with the cache length symbolic
            q, k, v = qkv(1, t_k)
            got, want = compiled(q, k, v), hf_decode(q, k, v)
            assert rel_err(got, want) < 1e-5 and torch.isfinite(got).all()
    rep = ccgqa_compile.report()
    assert [g.count("gqa_decode_attention") for g in rep.graphs] == [1, 1], str(rep)


class StaticCacheAttention(nn.Module):
    """gpt-fast's decode step: the new K/V written into static cache buffers with
    ``index_copy_``, then SDPA over the whole cache with the causal table's rows at the
    tokens' positions as a bool mask."""

    def __init__(self, batch=2, heads=4, kv_heads=2, d=16, max_len=32):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, kv_heads, max_len, d))
        self.register_buffer("v_cache", torch.zeros(batch, kv_heads, max_len, d))
        table = torch.ones(max_len, max_len, dtype=torch.bool).tril()
        self.register_buffer("causal", table)

    def forward(self, q, k, v, input_pos):
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        mask = self.causal[None, None, input_pos]
        return F.scaled_dot_product_attention(
            q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True
        )


def _compiled_and_eager(module: nn.Module, backend=ccgqa_without_codegen):
    """A fresh report; the module compiled (no code generation by default) and an eager
    twin."""
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    eager = copy.deepcopy(module)
    return torch.compile(module, backend=backend, fullgraph=True), eager


def _cache_steps(step, eager, steps: int, seed: int) -> None:
    """``steps`` decode steps of one token (q of 4 heads, k and v of 2, d 16) at positions
    0, 1, ...: the compiled step's output is finite and eager's, each step reading the
    cache the earlier ones wrote."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pos in range(steps):
            q = torch.randn(2, 4, 1, 16, generator=gen)
            k, v = torch.randn(2, 2, 1, 16, generator=gen), torch.randn(2, 2, 1, 16, generator=gen)
            input_pos = torch.tensor([pos])
            got, want = step(q, k, v, input_pos), eager(q, k, v, input_pos)
            assert torch.isfinite(got).all(), pos
            assert rel_err(got, want) < 1e-5, (pos, str(ccgqa_compile.report()))


def test_static_cache_steps_match_eager_and_fuse():
    fused = StaticCacheAttention()
    step, eager = _compiled_and_eager(fused)
    _cache_steps(step, eager, 6, seed=3)
    assert torch.equal(fused.k_cache, eager.k_cache) and torch.equal(fused.v_cache, eager.v_cache)
    assert ccgqa_compile.report().idioms() == {("gqa_decode_attention", "sdpa_mask"): 1}


@pytest.mark.parametrize("start", [0, 4], ids=["prefill-at-0", "chunk-at-4"])
def test_a_prefill_longer_than_a_decode_step_over_a_static_cache(start, monkeypatch):
    """gpt-fast's prefill: more query tokens than config.DECODE_MAX_QUERY_LEN over the
    whole static cache, masked by the causal table's rows. With config.PREFILL_OVER_CACHE,
    fused as a run-time masked op:
    at position 0 our causal kernel on the prompt's keys, elsewhere SDPA as written; the
    output and the cache equal eager's."""
    from ccgqa_compile.ops import gqa_attention as attention_ops

    monkeypatch.setattr(config, "PREFILL_OVER_CACHE", True)  # off by default (config.py)
    causal_runs = []
    real = attention_ops.causal_over_prefix
    monkeypatch.setattr(
        attention_ops, "causal_over_prefix", lambda *a: causal_runs.append(real(*a)) or real(*a)
    )
    torch.manual_seed(0)
    fused = StaticCacheAttention()
    torch.nn.init.normal_(fused.k_cache)  # stale slots hold data: reading them would show
    torch.nn.init.normal_(fused.v_cache)
    step, eager = _compiled_and_eager(fused)
    t = config.DECODE_MAX_QUERY_LEN + 4
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, t, 16, generator=gen)
    k, v = torch.randn(2, 2, t, 16, generator=gen), torch.randn(2, 2, t, 16, generator=gen)
    input_pos = torch.arange(start, start + t)
    with torch.no_grad():
        got, want = step(q, k, v, input_pos), eager(q, k, v, input_pos)
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5
    assert torch.equal(fused.k_cache, eager.k_cache)
    rep = ccgqa_compile.report()
    assert rep.idioms() == {("gqa_attention", "sdpa_prefill_over_cache"): 1}, str(rep)
    assert causal_runs == [start == 0]


class StaticCacheRepeatedKV(StaticCacheAttention):
    """The same step with K/V repeated for SDPA as HF's ``repeat_kv`` does."""

    def forward(self, q, k, v, input_pos):
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        b, hkv, t, d = self.k_cache.shape
        g = q.shape[1] // hkv
        kr = self.k_cache[:, :, None].expand(b, hkv, g, t, d).reshape(b, hkv * g, t, d)
        vr = self.v_cache[:, :, None].expand(b, hkv, g, t, d).reshape(b, hkv * g, t, d)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=self.causal[None, None, input_pos])


@pytest.mark.parametrize("probe_limit", [None, 64], ids=["float64-probes", "byte-codes"])
def test_repeated_cache_is_read_unrepeated(monkeypatch, probe_limit):
    """The op reads the cache's own kv heads, never a materialised repeat (4x the bytes at
    G = 4): proven on float64 probes, and, for caches past config.PROBE_MAX_ELEMENTS (a
    large batch and context), on one-byte codes."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    from ccgqa_compile.backend import _pass_patches

    if probe_limit is not None:
        monkeypatch.setattr(config, "PROBE_MAX_ELEMENTS", probe_limit)
    kv_heads_read = []

    def inner(gm, example_inputs, **kwargs):
        for n in gm.graph.nodes:
            if "gqa_decode_attention" in str(n.target):
                kv_heads_read.append(n.args[1].meta["val"].shape[1])
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=_pass_patches(set()))

    step, eager = _compiled_and_eager(StaticCacheRepeatedKV(), backend)
    _cache_steps(step, eager, 3, seed=4)
    assert ccgqa_compile.report().count("gqa_decode_attention") == 1, str(ccgqa_compile.report())
    assert kv_heads_read == [2], kv_heads_read


class HandWrittenCacheStep(StaticCacheAttention):
    """A decode step written out over a static cache filled by slice assignment; ``mask``:
    a row of the causal table at the token's position (a run-time mask), or none (every
    cached key, as HF reads a cache that holds only the past). Without a mask the op's
    only inputs exist before the cache write: it must still read the cache after it."""

    def __init__(self, mask: bool):
        super().__init__()
        self.mask = mask
        torch.nn.init.normal_(self.k_cache)  # unwritten slots hold data: reading them shows
        torch.nn.init.normal_(self.v_cache)

    def forward(self, q, k, v, input_pos):
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        g = q.shape[1] // self.k_cache.shape[1]
        s = q @ self.k_cache.repeat_interleave(g, 1).transpose(-1, -2) * 0.25
        if self.mask:
            s = s.masked_fill(~self.causal[input_pos][None, None], float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ self.v_cache.repeat_interleave(g, 1)


@pytest.mark.parametrize("mask", [True, False], ids=["causal-row", "no-mask"])
def test_handwritten_step_over_a_written_cache(mask):
    torch.manual_seed(0)
    fused = HandWrittenCacheStep(mask)
    step, eager = _compiled_and_eager(fused)
    _cache_steps(step, eager, 4, seed=5)
    assert torch.equal(fused.k_cache, eager.k_cache)
    idiom = "handwritten_mask" if mask else "handwritten"
    assert ccgqa_compile.report().idioms() == {("gqa_decode_attention", idiom): 1}


class ProjectedCacheStep(nn.Module):
    """A whole attention layer's decode step written out, as one writes it from a paper:
    q projected from x before this step's K/V go into the static cache by slice
    assignment, then attention over the cache. ``core``: "repeat" (K/V expanded to every
    query head, a (1, 1, T, S) bool row mask), "grouped" (q viewed per kv-head group,
    einsum against the unrepeated cache, a 5-D (1, 1, 1, T, S) mask), or "stale-keys"
    (the scores read the key cache before this step's write, the values after it: an
    odd function, but the one the op must then compute)."""

    def __init__(self, core: str, width=32, heads=4, kv_heads=2, d=8, batch=2, max_len=16):
        super().__init__()
        self.core, self.heads, self.kv_heads, self.d = core, heads, kv_heads, d
        self.wq = nn.Linear(width, heads * d, bias=False)
        self.wk = nn.Linear(width, kv_heads * d, bias=False)
        self.wv = nn.Linear(width, kv_heads * d, bias=False)
        self.register_buffer("k_cache", torch.randn(batch, kv_heads, max_len, d))
        self.register_buffer("v_cache", torch.randn(batch, kv_heads, max_len, d))
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril())

    def forward(self, x, input_pos):
        b, t, _ = x.shape
        hkv, g, d = self.kv_heads, self.heads // self.kv_heads, self.d
        q = self.wq(x).view(b, t, self.heads, d).transpose(1, 2)
        k = self.wk(x).view(b, t, hkv, d).transpose(1, 2)
        v = self.wv(x).view(b, t, hkv, d).transpose(1, 2)
        stale = q @ self.k_cache.repeat_interleave(g, 1).transpose(-1, -2)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        row = self.causal[input_pos]  # (T, S)
        s_len = self.k_cache.shape[2]
        if self.core == "grouped":
            s = torch.einsum("bjgtd,bjsd->bjgts", q.view(b, hkv, g, t, d), self.k_cache) / d**0.5
            s = s.masked_fill(~row[None, None, None], float("-inf"))
            o = torch.einsum("bjgts,bjsd->bjgtd", s.softmax(-1), self.v_cache)
            return o.reshape(b, self.heads, t, d)
        if self.core == "stale-keys":
            s = stale / d**0.5
        else:
            kk = self.k_cache[:, :, None].expand(b, hkv, g, s_len, d).reshape(b, -1, s_len, d)
            s = q @ kk.transpose(-1, -2) / d**0.5
        s = s.masked_fill(~row[None, None], float("-inf"))
        vv = self.v_cache[:, :, None].expand(b, hkv, g, s_len, d).reshape(b, -1, s_len, d)
        return torch.softmax(s, dim=-1) @ vv


@pytest.mark.parametrize("core", ["repeat", "grouped", "stale-keys"])
def test_a_decode_step_projecting_q_before_the_cache_write_fuses(core):
    """The op goes after the cache writes its reads come after, and before those it reads
    ahead of (the stale keys): the cache, the outputs and every step's state equal
    eager's."""
    torch.manual_seed(0)
    fused = ProjectedCacheStep(core)
    step, eager = _compiled_and_eager(fused)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for pos in [0, 1, 2, 3, 4]:
            x = torch.randn(2, 1, 32, generator=gen)
            input_pos = torch.tensor([pos])
            got, want = step(x, input_pos), eager(x, input_pos)
            assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5, pos
            assert torch.equal(fused.k_cache, eager.k_cache), pos
    idioms = ccgqa_compile.report().idioms()
    assert idioms == {("gqa_decode_attention", "handwritten_mask"): 1}, str(ccgqa_compile.report())


class CacheReadAcrossItsWrite(ProjectedCacheStep):
    """Near miss: the scores read the key cache both before and after this step's write
    (two halves of the head dims, added): no single cache an op could read."""

    def forward(self, x, input_pos):
        b, t, _ = x.shape
        g, d = self.heads // self.kv_heads, self.d
        q = self.wq(x).view(b, t, self.heads, d).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv_heads, d).transpose(1, 2)
        before = q[..., : d // 2] @ self.k_cache[..., : d // 2].repeat_interleave(g, 1).transpose(-1, -2)
        self.k_cache[:, :, input_pos] = k
        after = q[..., d // 2 :] @ self.k_cache[..., d // 2 :].repeat_interleave(g, 1).transpose(-1, -2)
        s = (before + after).masked_fill(~self.causal[input_pos][None, None], float("-inf"))
        return torch.softmax(s / d**0.5, dim=-1) @ self.v_cache.repeat_interleave(g, 1)


def test_a_cache_read_on_both_sides_of_its_write_is_left_alone():
    torch.manual_seed(0)
    fused = CacheReadAcrossItsWrite("repeat")
    step, eager = _compiled_and_eager(fused)
    with torch.no_grad():
        for pos in range(3):
            x = torch.randn(2, 1, 32)
            input_pos = torch.tensor([pos])
            assert rel_err(step(x, input_pos), eager(x, input_pos)) < 1e-5, pos
    rep = ccgqa_compile.report()
    assert rep.count("gqa_decode_attention") == 0 and rep.count("gqa_attention") == 0, str(rep)


def test_handwritten_decode_in_training_is_left_alone():
    q, k, v = (t.requires_grad_() for t in qkv(1))
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    out = torch.compile(hand_one_token_einsum, backend=ccgqa_without_codegen, fullgraph=True)(q, k, v)
    assert rel_err(out, hand_one_token_einsum(q, k, v)) < 1e-5
    rep = ccgqa_compile.report()
    assert rep.count("gqa_decode_attention") == 0 and rep.count("gqa_attention") == 0, str(rep)
    assert "training graph" in str(rep), str(rep)


def test_op_runs_the_kernel_under_the_interpreter(monkeypatch):
    """The op's wiring to the kernel (strides, mask broadcast, dtype) on CPU."""
    monkeypatch.setenv("CCGQA_INTERPRET_KERNELS_ON_CPU", "1")
    q, k, v = qkv(2, 70, heads=8, kv_heads=2, d=32)
    mask = torch.rand(2, 1, 2, 70, generator=torch.Generator().manual_seed(1)) < 0.8
    got = torch.ops.ccgqa.gqa_decode_attention(q, k, v, mask, 0.25)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                          scale=0.25, enable_gqa=True)  # fmt: skip
    assert rel_err(got, want) < 1e-5


def test_op_gradients_match_sdpa():
    q, k, v = (t.double().requires_grad_() for t in qkv(2, 11))
    mask = torch.rand(2, 1, 2, 11, generator=torch.Generator().manual_seed(2)) < 0.7
    mask[..., 0] = True

    def op(q, k, v):
        return torch.ops.ccgqa.gqa_decode_attention(q, k, v, mask, 0.4)

    assert torch.autograd.gradcheck(op, (q, k, v))


NEAR_MISSES = {
    # SDPA aligns is_causal top-left: with one query token only key 0 is visible
    "top_left_causal": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        1, "is_causal with query length 1 != key length 40",
    ),
    "dropout": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True),
        1, "dropout_p=0.5",
    ),
    "long_query_chunk": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        config.DECODE_MAX_QUERY_LEN + 1, "DECODE_MAX_QUERY_LEN",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_decode_near_miss_is_left_alone(name):
    fn, t_q, reason = NEAR_MISSES[name]
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    q, k, v = qkv(t_q, t_k=40)
    with torch.no_grad():
        torch.compile(fn, backend=ccgqa_without_codegen, fullgraph=True)(q, k, v)
    rep = ccgqa_compile.report()
    assert rep.count("gqa_decode_attention") == 0, str(rep)
    assert any(reason in r.reason for r in rep.rejected), str(rep)


def test_training_graph_is_left_to_sdpa():
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    q, k, v = (t.requires_grad_() for t in qkv(1))
    out = torch.compile(hf_decode, backend=ccgqa_without_codegen, fullgraph=True)(q, k, v)
    out.sum().backward()
    rep = ccgqa_compile.report()
    assert rep.count("gqa_decode_attention") == 0, str(rep)
    assert any("training graph" in r.reason for r in rep.rejected), str(rep)


def test_disabling_the_fusion_keeps_sdpa():
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    config.disabled_fusions.add("gqa_decode_attention")
    try:
        with torch.no_grad():
            torch.compile(hf_decode, backend=ccgqa_without_codegen)(*qkv(1))
    finally:
        config.disabled_fusions.discard("gqa_decode_attention")
    assert ccgqa_compile.report().count("gqa_decode_attention") == 0


# ------------------------------------------------------------------ HF generate


transformers = pytest.importorskip("transformers")


def _greedy(model, ids, new_tokens, **kwargs):
    """HF's own compile is off unless asked for (``compile_config``): on CUDA, with a static
    cache, ``generate`` otherwise compiles ``__call__`` with Inductor around whatever the
    model's forward was compiled with (the "eager" run too)."""
    kwargs.setdefault("disable_compile", "compile_config" not in kwargs)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                              output_logits=True, **kwargs)  # fmt: skip


def _decode_graph_counts(rep):
    """Per graph with a decode fusion: its fusion counts."""
    return [g for g in rep.graphs if g.count("gqa_decode_attention")]


def _generate_compiled_and_eager(
    lm, ids, new_tokens, device="cpu", dtype=torch.float32, dynamic=None, **kwargs
):
    """Greedy tokens of ``lm`` compiled with backend="ccgqa" equal eager's; the report.
    In half precision a near tie may flip a later token, so there the tokens are compared
    for the first two steps, and those steps' logits against a float64 copy."""
    lm, ids = lm.to(device), ids.to(device)
    reference = copy.deepcopy(lm).double() if dtype != torch.float32 else None
    lm = lm.to(dtype)
    want = _greedy(lm, ids, new_tokens, **kwargs)
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    compiled = copy.deepcopy(lm)
    compiled.forward = torch.compile(compiled.forward, backend="ccgqa", dynamic=dynamic)
    got = _greedy(compiled, ids, new_tokens, **kwargs)
    rep = ccgqa_compile.report()
    if reference is None:
        assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences, str(rep))
        return rep
    steps = ids.shape[1] + 2
    assert torch.equal(got.sequences[:, :steps], want.sequences[:, :steps]), str(rep)
    ref = _greedy(reference, ids, 2, **kwargs)
    for i in range(2):
        assert_as_close_as_eager(got.logits[i], want.logits[i], ref.logits[i], dtype, f"step {i}\n{rep}")
    return rep


DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
]


# HF's attention as SDPA or written out ("eager": matmul, additive mask, softmax), over its
# dynamic cache (past and new keys concatenated) or its static one (index_copy_ into
# preallocated tensors, the prefill reading the whole cache)
LLAMA_CACHES = [
    pytest.param("sdpa", "dynamic", id="sdpa-dynamic"),
    pytest.param("eager", "dynamic", id="eager-dynamic"),
    pytest.param("sdpa", "static", id="sdpa-static"),
    pytest.param("eager", "static", id="eager-static"),
]


@pytest.mark.parametrize(("attn", "cache"), LLAMA_CACHES)
@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_llama_generate_greedy_tokens_equal_eager(device, dtype, attn, cache):
    if device == "cuda" and (attn, cache) != ("sdpa", "dynamic"):
        pytest.skip("the GPU run checks HF's default")
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=44, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    rep = _generate_compiled_and_eager(lm, ids, 6, device, dtype, **kwargs)
    decode_graphs = _decode_graph_counts(rep)
    assert decode_graphs, str(rep)
    for g in decode_graphs:  # every layer's attention, in every decode graph
        assert g.count("gqa_decode_attention") == 2, str(rep)
        idioms = {"handwritten_mask"} if attn == "eager" else {"sdpa_mask"}
        if (attn, cache) == ("sdpa", "dynamic"):  # HF passes a mask there or not, by version
            idioms.add("sdpa")  # and device (a mask with transformers 5.24 on CUDA)
        fired = {i: n for (f, i), n in g.fused.items() if f == "gqa_decode_attention"}
        assert sum(fired.values()) == 2 and set(fired) <= idioms, str(rep)
    if (attn, cache) == ("sdpa", "static"):
        # the prompt's attention fuses either way HF writes it, by torch version: SDPA over
        # the prompt's keys (gqa_attention), or its 7 tokens over the cache's 64 slots with
        # a mask (a few tokens over a cache: gqa_decode_attention; torch 2.11)
        for g in rep.graphs:
            assert g.count("gqa_attention") + g.count("gqa_decode_attention") == 2, str(rep)
        assert rep.count("gqa_attention") in (0, 2), str(rep)
    elif (attn, cache) != ("eager", "static"):
        assert rep.count("gqa_attention") == 2, str(rep)
    else:  # a written-out prefill of 7 tokens over the 64 slots of a cache made and filled
        # inside the graph: a few tokens over a cache, fused as such (the cache's value
        # when read is a run-time value, not the zeros it was made as)
        assert len(decode_graphs) == len(rep.graphs), str(rep)
        assert not [r for r in rep.rejected if r.fusion == "gqa_attention"], str(rep)


def _tiny_zaya_lm():
    """A one-layer random ZayaForCausalLM (eval) and a prompt of 7 tokens, batch 2."""
    mz = pytest.importorskip("transformers.models.zaya.modeling_zaya")
    from .test_hf_models import randomise_zaya, zaya_config

    cfg = zaya_config(16)
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    lm = randomise_zaya(mz.ZayaForCausalLM(cfg)).eval()
    return lm, torch.randint(2, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _check_whole_decode_steps(rep):
    """Decode graphs were compiled, and each fused its step whole."""
    decode_graphs = _decode_graph_counts(rep)
    assert decode_graphs, str(rep)
    for g in decode_graphs:
        assert g.fused.get(("ccgqa_block", "decode_step")) == 1, str(rep)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_zaya_generate_greedy_tokens_equal_eager(device, dtype, cache):
    lm, ids = _tiny_zaya_lm()
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    rep = _generate_compiled_and_eager(lm, ids, 5, device, dtype, **kwargs)
    # prefill with a cache: the whole CCGQA block (the conv state read from its padded
    # q/k columns stays outside the fused prologue; a static cache's attention reads the
    # keys the prologue's k was written into); every decode graph: the whole step, the
    # prologue over HF's conv state feeding the attention over the cache
    prefill = [g for g in rep.graphs if g.fused.get(("ccgqa_block", "prologue+fused_attention"))]
    assert len(prefill) == 1, str(rep)
    _check_whole_decode_steps(rep)


def test_zaya_generate_dynamic_true():
    """``dynamic=True``: every size symbolic, HF's conv state (B, C, 2) and its RoPE
    tables too, and ``head_dim ** 0.5`` a run-time scalar. The prefill and every decode
    step still fuse whole (the state's sizes Dynamo fixed, the tables' width by a guard);
    greedy tokens equal eager's."""
    lm, ids = _tiny_zaya_lm()
    rep = _generate_compiled_and_eager(lm, ids, 5, dynamic=True)
    assert [g for g in rep.graphs if g.fused.get(("ccgqa_block", "prologue+fused_attention"))], str(rep)
    _check_whole_decode_steps(rep)


@pytest.mark.cuda
def test_zaya_generate_with_hf_compile_config():
    """HF's own way to compile generation (a static cache on CUDA compiles ``__call__``
    with ``generation_config.compile_config``): ``CompileConfig(backend="ccgqa")``. The
    decode steps fuse whole and the greedy tokens equal eager's."""
    from transformers import CompileConfig

    lm, ids = _tiny_zaya_lm()
    lm, ids = lm.cuda(), ids.cuda()
    want = _greedy(lm, ids, 5, cache_implementation="static")
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    config = CompileConfig(backend="ccgqa", fullgraph=False)
    got = _greedy(copy.deepcopy(lm), ids, 5, cache_implementation="static", compile_config=config)
    rep = ccgqa_compile.report()
    assert torch.equal(got.sequences, want.sequences), str(rep)
    _check_whole_decode_steps(rep)


# ---------------------------------------------- a CCGQA decode step: prologue + attention


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class OneTokenCCGQA(nn.Module):
    """One decode step of a CCGQA layer written from the spec, Zyphra-style shared convs
    over q and k channels: the convs run unpadded over the conv state (the last
    (k1-1)+(k2-1) pre-conv columns) and the new column, the state is overwritten with the
    window's tail, then L2 norm, temperature, RoPE at the token's position, the cache
    write, SDPA over the cache. ``state_first=False``: the state after the new column (a
    near miss: the convs then see the past as the future). ``sliced_read``: the attention
    reads the caches' first B rows (torchtitan's ``cache_k[:bsz]``), a view of what the
    step wrote. ``per_stream``: q and k convolved apart, each over its channels of the
    window (``window[:, :Cq]``) with its slices of the shared convs' weights.
    ``tokens_cache``: the caches laid out (B, S, Hkv, D), written ``k.transpose(1, 2)`` and
    read transposed back (flash-attn's kv-cache layout). ``slots_cache``: vLLM's flat
    (B * S, Hkv, D) caches written at slot indices, read viewed (B, S, Hkv, D) and
    transposed."""

    def __init__(
        self, state_first=True, batch=2, hq=4, hkv=2, d=16, k1=3, k2=2, max_len=16,
        sliced_read=False, per_stream=False, tokens_cache=False, slots_cache=False,
    ):  # fmt: skip
        super().__init__()
        self.hq, self.hkv, self.d, self.state_first = hq, hkv, d, state_first
        self.sliced_read, self.per_stream, self.tokens_cache = sliced_read, per_stream, tokens_cache
        self.slots_cache, self.max_len = slots_cache, max_len
        c = (hq + hkv) * d
        self.q_proj, self.k_proj = nn.Linear(32, hq * d), nn.Linear(32, hkv * d)
        self.v_proj = nn.Linear(32, hkv * d)
        self.conv1 = nn.Conv1d(c, c, k1, groups=c)
        self.conv2 = nn.Conv1d(c, c, k2, groups=hq + hkv)
        self.temp = nn.Parameter(0.1 * torch.randn(hkv))
        self.register_buffer("conv_state", torch.randn(batch, c, k1 - 1 + k2 - 1))
        cache = (batch, max_len, hkv, d) if tokens_cache else (batch, hkv, max_len, d)
        cache = (batch * max_len, hkv, d) if slots_cache else cache
        self.register_buffer("k_cache", torch.randn(cache))
        self.register_buffer("v_cache", torch.randn(cache))
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril())
        freqs = torch.outer(torch.arange(max_len).float(), 1.0 / 100 ** (torch.arange(0, d, 2) / d))
        self.register_buffer("cos", torch.cat((freqs, freqs), -1).cos())
        self.register_buffer("sin", torch.cat((freqs, freqs), -1).sin())

    def forward(self, x, pos):
        b, hq, hkv, d = x.shape[0], self.hq, self.hkv, self.d
        cols = torch.cat([self.q_proj(x), self.k_proj(x)], -1).transpose(1, 2)
        parts = [self.conv_state, cols] if self.state_first else [cols, self.conv_state]
        window = torch.cat(parts, dim=-1)
        self.conv_state.copy_(window[..., 1:])
        if self.per_stream:
            c1, c2, cq = self.conv1, self.conv2, hq * d
            q, k = (
                F.conv1d(F.conv1d(window[:, part], c1.weight[part], c1.bias[part], groups=width),
                         c2.weight[part], c2.bias[part], groups=heads)
                for part, width, heads in ((slice(None, cq), cq, hq), (slice(cq, None), hkv * d, hkv))
            )  # fmt: skip
            y = torch.cat([q, k], 1).transpose(1, 2)
        else:
            y = self.conv2(self.conv1(window)).transpose(1, 2)
        q = y[..., : hq * d].reshape(b, 1, hq, d)
        k = y[..., hq * d :].reshape(b, 1, hkv, d)
        q = F.normalize(q, dim=-1) * d**0.5
        k = F.normalize(k, dim=-1) * d**0.5 * self.temp.exp().view(1, 1, hkv, 1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        v = self.v_proj(x).view(b, 1, hkv, d).transpose(1, 2)
        if self.slots_cache:
            slots = pos + torch.arange(b) * self.max_len
            self.k_cache[slots] = k.transpose(1, 2).reshape(b, hkv, d)
            self.v_cache[slots] = v.transpose(1, 2).reshape(b, hkv, d)
            k_cache, v_cache = (c.view(b, self.max_len, hkv, d).transpose(1, 2)
                                for c in (self.k_cache, self.v_cache))  # fmt: skip
        elif self.tokens_cache:
            self.k_cache.index_copy_(1, pos, k.transpose(1, 2))
            self.v_cache.index_copy_(1, pos, v.transpose(1, 2))
            k_cache, v_cache = self.k_cache.transpose(1, 2), self.v_cache.transpose(1, 2)
        else:
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
            k_cache, v_cache = self.k_cache, self.v_cache
        mask = self.causal[pos][None, None]
        if self.sliced_read:
            k_cache, v_cache = k_cache[:b], v_cache[:b]
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                              enable_gqa=True)  # fmt: skip


@pytest.mark.parametrize(
    ("state_first", "variant"),
    [(True, None), (True, "sliced_read"), (True, "per_stream"), (True, "tokens_cache"),
     (True, "slots_cache"), (False, None)],
    ids=["state-first", "state-first-sliced-read", "state-first-per-stream",
         "state-first-tokens-cache", "state-first-slots-cache", "near-state-after"],
)  # fmt: skip
def test_ccgqa_decode_step_fuses_whole_and_keeps_state(state_first, variant):
    """The step's prologue over the conv state fuses with the attention over the cache
    (a near miss only the attention); outputs and every state (conv state, caches) equal
    eager's step after step (the state write is moved after the op that reads the old
    state). The step's new keys are found behind a slice of the cache too."""
    torch.manual_seed(0)
    fused = OneTokenCCGQA(state_first, **({variant: True} if variant else {}))
    step, eager = _compiled_and_eager(fused)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for pos in range(4):
            x = torch.randn(2, 1, 32, generator=gen)
            got, want = step(x, torch.tensor([pos])), eager(x, torch.tensor([pos]))
            assert rel_err(got, want) < 1e-5, (pos, str(ccgqa_compile.report()))
            for name in ("conv_state", "k_cache", "v_cache"):
                assert rel_err(getattr(fused, name), getattr(eager, name)) < 1e-6, (pos, name)
    rep = ccgqa_compile.report()
    assert rep.count("gqa_decode_attention") == 1, str(rep)
    assert rep.count("ccgqa_prologue") == rep.count("ccgqa_block") == int(state_first), str(rep)
    if state_first:
        assert rep.idioms()[("ccgqa_block", "decode_step")] == 1, str(rep)


def _attention_with_fill(q, k, v, keep, fill):
    """Hand-written GQA attention over k/v with ``keep`` (True: visible) applied by
    ``masked_fill`` with ``fill``."""
    g = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~keep, fill)
    return torch.softmax(s, dim=-1) @ v.repeat_interleave(g, 1)


@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
@pytest.mark.parametrize("t_q", [1, 6], ids=["decode", "prefill"])
def test_rows_that_see_no_key_compute_what_eager_does(t_q, fill):
    """A run-time mask may block every key of a row (a finished sequence, a padding
    query): filled with -inf, eager's row is NaN; with the dtype's minimum, the mean of
    every value. The fused op's rows there are zeros, so the emitted code writes eager's
    value: NaN where eager has NaN, equal numbers elsewhere (the probes include such a
    row; without it the fusion was proven only where some key is seen). A 1-D key mask
    (broadcast by masked_fill) is read as (1, 1, 1, S)."""
    torch.manual_seed(0)
    value = float("-inf") if fill == "-inf" else torch.finfo(torch.float32).min
    b, hq, hkv, d = 2, 4, 2, 8
    s_len = 12 if t_q == 1 else t_q  # a prefill: as many keys as queries

    def step(q, k, v, keep):
        return _attention_with_fill(q, k, v, keep, value)

    q = torch.randn(b, hq, t_q, d)
    k, v = torch.randn(b, hkv, s_len, d), torch.randn(b, hkv, s_len, d)
    keep = torch.rand(b, 1, t_q, s_len) > 0.3
    keep[1] = False  # the second sequence sees nothing
    keep[0, :, 0] = False  # nor does the first sequence's first query
    compiled = torch.compile(step, backend=ccgqa_without_codegen)
    with torch.no_grad():
        out, ref = compiled(q, k, v, keep), step(q, k, v, keep)
    assert torch.equal(out.isnan(), ref.isnan())
    assert (ref.isnan().any()) == (fill == "-inf")
    seen = ~ref.isnan()
    assert rel_err(out[seen], ref[seen]) < 1e-5
    fusion = "gqa_decode_attention" if t_q == 1 else "gqa_attention"
    assert ccgqa_compile.report().count(fusion) == 1, str(ccgqa_compile.report())

    def key_mask_step(q, k, v, pos):  # a 1-D key mask over the cache
        return _attention_with_fill(q, k, v, torch.arange(s_len) <= pos, value)

    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    compiled = torch.compile(key_mask_step, backend=ccgqa_without_codegen)
    q1 = q[:, :, :1]
    with torch.no_grad():
        for pos in (torch.tensor(5), torch.tensor(-1)):  # -1: no key visible
            out, ref = compiled(q1, k, v, pos), key_mask_step(q1, k, v, pos)
            assert torch.equal(out.isnan(), ref.isnan())
            assert rel_err(out.nan_to_num(), ref.nan_to_num()) < 1e-5
    assert ccgqa_compile.report().count("gqa_decode_attention") == 1, str(ccgqa_compile.report())


def test_speculated_tokens_with_a_symbolic_query_length():
    """One step function for the prompt (8 tokens) and then speculated chunks (3, then 20)
    over a static cache: Dynamo's automatic dynamic shapes compile the second call for any
    query length. Judged by the length compiled for (3), it is a decode step and fuses;
    the op runs SDPA on the 20-token chunk. Outputs and the cache as eager."""
    torch.manual_seed(0)
    b, hq, hkv, s_len, d = 1, 4, 2, 40, 16

    def make_step(kc, vc):
        def step(q, k, v, pos):
            kc[:, :, pos] = k
            vc[:, :, pos] = v
            mask = torch.arange(s_len)[None, :] <= pos[:, None]
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)

        return step

    caches = [torch.zeros(b, hkv, s_len, d) for _ in range(4)]
    step_c, step_e = make_step(*caches[:2]), make_step(*caches[2:])
    compiled = torch.compile(step_c, backend=ccgqa_without_codegen)
    start = 0
    with torch.no_grad():
        for t in (8, 3, 20):
            q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
            pos = torch.arange(start, start + t)
            out, ref = compiled(q, k, v, pos), step_e(q, k, v, pos)
            assert rel_err(out, ref) < 1e-6, t
            start += t
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    rep = ccgqa_compile.report()
    assert len(rep.graphs) == 2, str(rep)
    assert all(g.count("gqa_decode_attention") == 1 for g in rep.graphs), str(rep)


def test_a_decode_step_whose_new_keys_are_not_found_says_so():
    """Each sequence's key written at its own position (``cache[rows, :, pos] = k``: (B, Hkv,
    D) values, not a (B, Hkv, T, D) block): the decode attention fuses, and the report says
    why the convolved q/k prologue was not tried, instead of nothing."""
    torch.manual_seed(0)
    b, hq, hkv, s_len, d = 2, 4, 2, 16, 8
    conv_w = torch.randn(hq * d, 1, 2)
    k_cache, v_cache = torch.randn(b, hkv, s_len, d), torch.randn(b, hkv, s_len, d)

    def step(x_q, k, v, pos):  # x_q (B, 2, Hq*D): the conv state and the new column
        q = F.conv1d(x_q.transpose(1, 2), conv_w, groups=hq * d)  # (B, Hq*D, 1)
        q = q.view(b, hq, d, 1).transpose(-1, -2)
        rows = torch.arange(b)
        k_cache[rows, :, pos] = k
        v_cache[rows, :, pos] = v
        mask = (torch.arange(s_len)[None, :] <= pos[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)

    x_q, k, v = torch.randn(b, 2, hq * d), torch.randn(b, hkv, d), torch.randn(b, hkv, d)
    pos = torch.tensor([3, 7])
    saved = (k_cache.clone(), v_cache.clone())
    compiled = torch.compile(step, backend=ccgqa_without_codegen)
    with torch.no_grad():
        out = compiled(x_q, k, v, pos)
        k_cache.copy_(saved[0])
        v_cache.copy_(saved[1])
        ref = step(x_q, k, v, pos)
    assert rel_err(out, ref) < 1e-6
    rep = ccgqa_compile.report()
    assert rep.count("gqa_decode_attention") == 1, str(rep)
    assert "new keys were not found" in str(rep), str(rep)


def test_a_prompt_written_into_a_cache_then_read_back_repeated_fuses():
    """torchtitan's inference attention: the prompt's K/V slice-assigned into a static
    cache, then the cache's first T positions read back and repeated per query head. A
    repeat copies (it reads the cache when it runs, after the write), so the repeated keys
    are a value of the program like any other, not a view of the written cache: causal
    attention over them fuses. Output and cache as eager."""
    torch.manual_seed(0)
    b, hq, hkv, s_len, d, t = 2, 4, 2, 32, 16, 8

    def make(cache_k, cache_v):
        def attn(q, k, v):
            cache_k[:b, :, :t] = k
            cache_v[:b, :, :t] = v
            keys = torch.repeat_interleave(cache_k[:b, :, :t], hq // hkv, dim=1)
            values = torch.repeat_interleave(cache_v[:b, :, :t], hq // hkv, dim=1)
            scores = torch.matmul(q, keys.transpose(2, 3)) / d**0.5
            allowed = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
            return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), values)

        return attn

    caches = [torch.zeros(b, hkv, s_len, d) for _ in range(2)]
    qkv = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    _check_cache_step(make, caches, qkv, "gqa_attention")


def _check_cache_step(make, caches, qkv, fusion):
    """``make(cache_k, cache_v)`` compiled on copies of ``caches`` and run eagerly on
    others: output and written caches as eager's, ``fusion`` fired once."""
    caches = [c.clone() for c in caches] + [c.clone() for c in caches]
    compiled = torch.compile(make(*caches[:2]), backend=ccgqa_without_codegen)
    with torch.no_grad():
        out, ref = compiled(*qkv), make(*caches[2:])(*qkv)
    assert rel_err(out, ref) < 1e-6
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    rep = ccgqa_compile.report()
    assert rep.count(fusion) == 1, str(rep)


@pytest.mark.parametrize("near", [False, True], ids=["causal", "near_sees_next_key"])
def test_a_decode_step_over_a_slice_assigned_cache_fuses(near):
    """torchtitan's decode step: the new token's K/V slice-assigned at its position, the
    cache read back up to it and repeated, a mask built from sizes (``arange(end) <=
    arange(start, end)``), the softmax in float32 cast back with ``type_as(q)``. The
    ``type_as`` reads only q's dtype: it is not a second mask table ('a decode step masked
    by several tables' before). The mask is the op's argument, so a mask letting the query
    see the next (unwritten) key computes what eager does too."""
    torch.manual_seed(0)
    b, hq, hkv, s_len, d, start = 2, 4, 2, 32, 16, 9

    def make(cache_k, cache_v):
        def attn(q, k, v):
            end = start + q.shape[2]
            cache_k[:b, :, start:end] = k
            cache_v[:b, :, start:end] = v
            keys = torch.repeat_interleave(cache_k[:b, :, : end + near], hq // hkv, dim=1)
            values = torch.repeat_interleave(cache_v[:b, :, : end + near], hq // hkv, dim=1)
            scores = torch.matmul(q, keys.transpose(2, 3)) / d**0.5
            allowed = torch.arange(end + near)[None, :] <= torch.arange(start, end)[:, None] + near
            scores = scores.masked_fill(~allowed, float("-inf"))
            return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), values)

        return attn

    caches = [torch.randn(b, hkv, s_len, d) for _ in range(2)]
    qkv = torch.randn(b, hq, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
    _check_cache_step(make, caches, qkv, "gqa_decode_attention")


def test_a_one_row_step_with_a_shared_mask_fuses():
    """Batch 1, one query token, an additive (1, 1, 1, S) mask: the probe that blocks a
    whole row blocks every row there is, so its output is NaN everywhere (as eager's). That
    probe checks what a blocked row computes; the other one shows the values."""
    b, hq, hkv, d, s_len = 1, 4, 2, 32, 13

    def step(q, k_cache, v_cache, k_new, v_new, mask):
        k = torch.cat([k_cache, k_new], 2).repeat_interleave(hq // hkv, 1)
        v = torch.cat([v_cache, v_new], 2).repeat_interleave(hq // hkv, 1)
        s = (q @ k.transpose(-1, -2)) * d**-0.5 + mask
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    torch.manual_seed(0)
    args = (
        torch.randn(b, hq, 1, d), torch.randn(b, hkv, s_len - 1, d), torch.randn(b, hkv, s_len - 1, d),
        torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d), torch.zeros(b, 1, 1, s_len),
    )  # fmt: skip
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    with torch.no_grad():
        got = torch.compile(step, backend=ccgqa_without_codegen)(*args)
        want = step(*args)
    rep = ccgqa_compile.report()
    assert rel_err(got, want) < 1e-6, str(rep)
    assert rep.count("gqa_decode_attention") == 1, str(rep)


class TwoStateWindowSumsStep(OneTokenCCGQA):
    """A Mamba-style one-token step no reader takes: a conv state per stage, conv1 as
    ``(window * w).sum(-1) + b``, conv2 as an einsum over the per-head window. It cannot
    fuse; the report must say why instead of showing the decode attention alone."""

    def __init__(self, **kw):
        super().__init__(**kw)
        c = (self.hq + self.hkv) * self.d
        self.register_buffer("state1", torch.randn(2, c, self.conv1.kernel_size[0] - 1))
        self.register_buffer("state2", torch.randn(2, c, self.conv2.kernel_size[0] - 1))

    def forward(self, x, pos):
        b, hq, hkv, d = x.shape[0], self.hq, self.hkv, self.d
        heads, k2 = hq + hkv, self.conv2.kernel_size[0]
        w1 = torch.cat([self.state1, torch.cat([self.q_proj(x), self.k_proj(x)], -1).transpose(1, 2)], -1)
        y1 = (w1 * self.conv1.weight[:, 0]).sum(-1) + self.conv1.bias
        w2 = torch.cat([self.state2, y1[..., None]], -1)
        w = self.conv2.weight.view(heads, d, d, k2)
        y = torch.einsum("bhik,hoik->bho", w2.view(b, heads, d, k2), w).reshape(b, -1) + self.conv2.bias
        self.state1.copy_(w1[..., 1:])
        self.state2.copy_(w2[..., 1:])
        q = F.normalize(y[:, : hq * d].view(b, hq, 1, d), dim=-1)
        k = F.normalize(y[:, hq * d :].view(b, hkv, 1, d), dim=-1) * self.temp.exp().view(1, hkv, 1, 1)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, self.v_proj(x).view(b, 1, hkv, d).transpose(1, 2))
        mask = self.causal[pos][None, None]
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask,
                                              enable_gqa=True)  # fmt: skip


def test_a_decode_step_whose_convs_are_not_recognised_says_so():
    torch.manual_seed(0)
    step, eager = _compiled_and_eager(TwoStateWindowSumsStep())
    with torch.no_grad():
        for pos in range(2):
            x = torch.randn(2, 1, 32)
            assert rel_err(step(x, torch.tensor([pos])), eager(x, torch.tensor([pos]))) < 1e-5
    rep = ccgqa_compile.report()
    reasons = [r.reason for r in rep.unfused_candidates if r.fusion == "ccgqa_block"]
    assert rep.count("gqa_decode_attention") == 1 and rep.count("ccgqa_block") == 0, str(rep)
    assert any("no convolution was recognised" in r for r in reasons), str(rep)
