"""``F.scaled_dot_product_attention`` -> ``ccgqa.gqa_attention`` (passes/attention.py).

Each SDPA spelling fires (report and generated code) and matches eager in outputs and
gradients (fp32 against eager, bf16 against a float64 reference as in ``_compare``); a
causal mask built from sizes is proven causal and fires; each near miss (not causal, a
non-causal mask, dropout, T_q != T_k, head dim above the policy limit) is left alone;
disabling ``gqa_attention`` disables it; the hook is chained, never clobbered.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import ccgqa_compile
from ccgqa_compile import config
from ccgqa_compile.backend import _pass_patches
from ccgqa_compile.passes import ChainedGraphPass, RecognitionPass

from ._backends import ccgqa_without_codegen
from ._compare import assert_as_close_as_eager, rel_err


def repeat_kv(x, groups):
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def sdpa_enable_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_repeat_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), is_causal=True)


def sdpa_repeat_interleave(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), torch.repeat_interleave(v, g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)


def sdpa_explicit_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)


def sdpa_mha(q, k, v):
    return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True)


def sdpa_tiled_kv(q, k, v):
    # x.repeat tiles the heads (head h uses kv head h % Hkv): not GQA's grouping, so the
    # repeat must not be unwrapped; the attention over the tiled K/V is still causal MHA
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), None, 0.0, True
    )


def sdpa_causal_mask(q, k, v):
    t = q.shape[-2]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def sdpa_additive_causal_mask(q, k, v):
    t = q.shape[-2]
    i = torch.arange(t)
    mask = torch.zeros(t, t).masked_fill(i[None, :] > i[:, None], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


IDIOMS = {
    "sdpa_enable_gqa": (sdpa_enable_gqa, "sdpa"),
    "sdpa_repeat_kv": (sdpa_repeat_kv, "sdpa"),
    "sdpa_repeat_interleave": (sdpa_repeat_interleave, "sdpa"),
    "sdpa_explicit_scale": (sdpa_explicit_scale, "sdpa"),
    "sdpa_tiled_kv": (sdpa_tiled_kv, "sdpa"),
    "sdpa_causal_bool_mask": (sdpa_causal_mask, "sdpa_mask"),
    "sdpa_causal_additive_mask": (sdpa_additive_causal_mask, "sdpa_mask"),
}


def qkv(dtype=torch.float32, d=16, t=7, heads=4, kv_heads=2, batch=2, t_q=None):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, t if t_q is None else t_q, d, dtype=dtype)
    k = torch.randn(batch, kv_heads, t, d, dtype=dtype)
    v = torch.randn(batch, kv_heads, t, d, dtype=dtype)
    return q, k, v


def compile_and_compare(fn, inputs, dtype, training, backend=ccgqa_without_codegen):
    """Compiled vs eager (and a float64 reference), outputs and gradients."""
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    ins_c = [t.clone().requires_grad_(training) for t in inputs]
    ins_e = [t.clone().requires_grad_(training) for t in inputs]
    ins_r = [t.detach().double().requires_grad_(training) for t in inputs]
    with torch.set_grad_enabled(training):
        out_c = torch.compile(fn, backend=backend, fullgraph=True)(*ins_c)
        out_e, out_r = fn(*ins_e), fn(*ins_r)
    assert_as_close_as_eager(out_c, out_e, out_r, dtype, "output")
    if training:
        grad = torch.randn_like(out_e)
        grads_c = torch.autograd.grad(out_c, ins_c, grad)
        grads_e = torch.autograd.grad(out_e, ins_e, grad)
        grads_r = torch.autograd.grad(out_r, ins_r, grad.double())
        for i, (gc, ge, gr) in enumerate(zip(grads_c, grads_e, grads_r)):
            assert_as_close_as_eager(gc, ge, gr, dtype, f"grad {i}")
    return ccgqa_compile.report()


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(IDIOMS))
def test_sdpa_idiom_fires_and_matches_eager(name, dtype, training):
    fn, idiom = IDIOMS[name]
    rep = compile_and_compare(fn, qkv(dtype), dtype, training)
    assert rep.idioms() == {("gqa_attention", idiom): 1}, str(rep)
    assert [g.kind for g in rep.graphs] == ["training" if training else "inference"]


@pytest.mark.parametrize("d", [8, 32])
def test_head_dims_up_to_the_policy_limit_fire(d):
    rep = compile_and_compare(sdpa_enable_gqa, qkv(d=d), torch.float32, True)
    assert rep.count("gqa_attention") == 1, str(rep)


def test_head_dim_64_is_left_to_sdpa_with_the_reason():
    assert config.SDPA_MAX_HEAD_DIM == 32
    rep = compile_and_compare(sdpa_enable_gqa, qkv(d=64), torch.float32, True)
    assert rep.count("gqa_attention") == 0, str(rep)
    reasons = [r.reason for r in rep.rejected]
    assert len(reasons) == 1 and reasons[0].startswith("head dim 64 > 32"), str(rep)


def _masked(diagonal):
    def fn(q, k, v):
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool).tril(diagonal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return fn


def _sliding_window(q, k, v):
    t = q.shape[-2]
    i = torch.arange(t)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


NEAR_MISSES = {
    "not_causal": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "not causal",
    ),
    "mask_peeks_ahead": (_masked(1), "not causal"),
    "mask_without_diagonal": (_masked(-1), "not causal"),
    "sliding_window_mask": (_sliding_window, "not causal"),
    "last_token_query": (sdpa_enable_gqa, "query length 1 != key length 7"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_sdpa_near_miss_does_not_fire(name):
    fn, reason = NEAR_MISSES[name]
    inputs = qkv(t_q=1) if name == "last_token_query" else qkv()
    rep = compile_and_compare(fn, inputs, torch.float32, True)
    assert rep.count("gqa_attention") == 0, str(rep)
    assert any(reason in r.reason for r in rep.rejected), str(rep)


def test_dropout_in_training_does_not_fire():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True
        )

    q, k, v = (t.requires_grad_() for t in qkv())
    out = torch.compile(fn, backend=ccgqa_without_codegen, fullgraph=True)(q, k, v)
    assert out.shape == q.shape
    rep = ccgqa_compile.report()
    assert rep.count("gqa_attention") == 0, str(rep)
    assert any("dropout_p=0.1" in r.reason for r in rep.rejected), str(rep)


def test_autocast_region_casts_like_sdpa():
    """Under autocast SDPA runs in the autocast dtype: the op gets q, k, v cast to it."""

    def fn(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sdpa_enable_gqa(q, k, v)

    q, k, v = qkv()
    out = torch.compile(fn, backend=ccgqa_without_codegen, fullgraph=True)(q, k, v)
    want = fn(q, k, v)
    assert out.dtype == want.dtype == torch.bfloat16
    reference = sdpa_enable_gqa(q.double(), k.double(), v.double())
    assert_as_close_as_eager(out, want, reference, torch.bfloat16, "autocast output")
    assert ccgqa_compile.report().count("gqa_attention") == 1


def test_generated_code_calls_our_op_and_no_sdpa():
    """Fails if the pre-grad pass were silently skipped: the code would call SDPA."""
    q, k, v = (t.requires_grad_() for t in qkv())
    compiled = torch.compile(sdpa_repeat_kv, backend="ccgqa", fullgraph=True)
    out, codes = run_and_get_code(compiled, q, k, v)
    out.sum().backward()  # the backward compiles too
    code = "\n".join(codes)
    assert "ccgqa.gqa_attention" in code
    assert "scaled_dot_product" not in code
    torch.testing.assert_close(out, sdpa_repeat_kv(q, k, v), rtol=1e-5, atol=1e-5)
    assert ccgqa_compile.report().count("gqa_attention") == 1


def test_sdpa_is_untouched_in_code_when_the_fusion_is_off():
    q, k, v = qkv()
    compiled = torch.compile(
        sdpa_enable_gqa, backend="ccgqa", options={"ccgqa_disable": ["gqa_attention"]}
    )
    out, codes = run_and_get_code(compiled, q, k, v)
    assert "ccgqa.gqa_attention" not in "\n".join(codes)
    torch.testing.assert_close(out, sdpa_enable_gqa(q, k, v), rtol=1e-5, atol=1e-5)


def _fired(**compile_kwargs) -> int:
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    torch.compile(sdpa_enable_gqa, backend=ccgqa_without_codegen, **compile_kwargs)(*qkv())
    return ccgqa_compile.report().count("gqa_attention")


def test_disabling_gqa_attention_disables_the_sdpa_rewrite(monkeypatch):
    assert _fired() == 1
    hook = _pass_patches({"gqa_attention"})["pre_grad_custom_pass"]
    assert isinstance(hook, RecognitionPass) and "gqa_attention" not in hook.fusions
    monkeypatch.setenv("CCGQA_DISABLE", "gqa_attention")
    assert _fired() == 0
    monkeypatch.delenv("CCGQA_DISABLE")
    config.disabled_fusions.add("gqa_attention")
    try:
        assert _fired() == 0
    finally:
        config.disabled_fusions.discard("gqa_attention")
    assert _fired() == 1


def test_cpu_graphs_are_left_to_inductor_by_default(monkeypatch):
    monkeypatch.setenv("CCGQA_FUSE_ON_CPU", "0")
    torch.compile(sdpa_enable_gqa, backend="ccgqa")(*qkv())
    rep = ccgqa_compile.report()
    assert rep.count("gqa_attention") == 0
    assert not rep.rejected
    fusions = ("gqa_attention",)
    assert RecognitionPass(fusions, False).uuid() != RecognitionPass(fusions, True).uuid()


def test_mark_dynamic_sequence_fires_for_every_length():
    """q, k, v from one tensor share its symbolic length, so T_q == T_k is known."""

    def fn(qkv_packed):
        q, k, v = qkv_packed.split([4, 2, 2], dim=1)
        return sdpa_repeat_kv(q, k, v)

    compiled = torch.compile(fn, backend=ccgqa_without_codegen, fullgraph=True)
    for t in (5, 9):
        packed = torch.cat(qkv(t=t), dim=1)
        torch._dynamo.mark_dynamic(packed, 2)
        torch.testing.assert_close(compiled(packed), fn(packed))
    rep = ccgqa_compile.report()
    assert rep.count("gqa_attention") == 1 and len(rep.graphs) == 1, str(rep)


def test_independent_dynamic_lengths_are_not_assumed_equal():
    compiled = torch.compile(sdpa_enable_gqa, backend=ccgqa_without_codegen, fullgraph=True)
    q, k, v = qkv()
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    torch.testing.assert_close(compiled(q, k, v), sdpa_enable_gqa(q, k, v))
    rep = ccgqa_compile.report()
    assert rep.count("gqa_attention") == 0, str(rep)
    assert any("not known to equal" in r.reason for r in rep.rejected), str(rep)


def test_existing_pre_grad_pass_is_chained_not_clobbered():
    calls = []

    def user_pass(graph):
        calls.append(len(graph.nodes))

    with torch._inductor.config.patch(pre_grad_custom_pass=user_pass):
        patches = _pass_patches(set())
        assert isinstance(patches["pre_grad_custom_pass"], (ChainedGraphPass, list))
        torch.compile(sdpa_enable_gqa, backend=ccgqa_without_codegen)(*qkv())
    assert calls, "the user's own pre-grad pass did not run"
    assert ccgqa_compile.report().count("gqa_attention") == 1


def test_register_global_installs_and_restores_the_pre_grad_hook():
    before = torch._inductor.config.pre_grad_custom_pass
    ccgqa_compile.register_global()
    try:
        assert torch._inductor.config.pre_grad_custom_pass is not before
        torch.compile(sdpa_enable_gqa)(*qkv())
        assert ccgqa_compile.report().count("gqa_attention") == 1
    finally:
        ccgqa_compile.unregister_global()
    assert torch._inductor.config.pre_grad_custom_pass is before


def test_uuid_is_stable():
    a, b = RecognitionPass(("gqa_attention",), True), RecognitionPass(("gqa_attention",), True)
    assert a.uuid() is not None and a.uuid() == b.uuid()


def test_fx_graph_cache_with_the_rewrite_on_and_off(tmp_path, monkeypatch):
    """Warm caches: the same function with the fusion on, then off, then on again."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    q, k, v = qkv()
    expected = sdpa_enable_gqa(q, k, v)
    with (
        torch._inductor.config.patch(fx_graph_cache=True),
        torch._functorch.config.patch(enable_autograd_cache=True),
    ):
        for disable in ([], ["gqa_attention"], []):
            torch._dynamo.reset()
            compiled = torch.compile(
                sdpa_enable_gqa, backend="ccgqa", options={"ccgqa_disable": disable}
            )
            out, codes = run_and_get_code(compiled, q, k, v)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            if disable:
                assert codes, "the fusion-off compile was served the fusion-on cache entry"
            if codes:  # a cache hit generates no code
                assert ("ccgqa.gqa_attention" in "\n".join(codes)) == (not disable)


def sdpa_additive_from_bool_mask(q, k, v, keep):
    """A (B, 1, T, T) bool mask passed in, made additive with the dtype's lowest value."""
    bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def sdpa_additive_from_inverted_mask(q, k, v, keep):
    """Near miss: the bool mask read the other way (True blocks)."""
    bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(keep, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_a_4d_bool_mask_passed_in_is_checked_at_run_time(training):
    """A mask built from a (T, T) user mask is causal when that mask is: it fuses as a
    run-time mask, our op for a causal mask, SDPA as written for a padded one."""
    q, k, v = qkv()
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(2, 1, t, t)
    padded = causal.clone()
    padded[1, :, :, :2] = False
    padded[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # padding rows see themselves
    for keep in (causal, padded):
        rep = compile_and_compare(
            functools.partial(sdpa_additive_from_bool_mask, keep=keep), (q, k, v),
            torch.float32, training,
        )  # fmt: skip
        assert rep.idioms() == {("gqa_attention", "sdpa_runtime_mask"): 1}, str(rep)


def test_a_mask_passed_in_and_read_inverted_is_left_alone():
    q, k, v = qkv()
    t = q.shape[2]
    keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(2, 1, t, t)
    keep = keep | torch.eye(t, dtype=torch.bool)
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    blocked = ~keep  # read inverted, it blocks the future: the values are finite
    out = torch.compile(sdpa_additive_from_inverted_mask, backend=ccgqa_without_codegen)(q, k, v, blocked)
    want = sdpa_additive_from_inverted_mask(q, k, v, blocked)
    assert torch.isfinite(want).all() and rel_err(out, want) < 1e-6
    rep = ccgqa_compile.report()
    assert rep.count("gqa_attention") == 0, str(rep)
    assert "all ones, or causal" in str(rep), str(rep)
