"""The seed variant's prologue: ``torch.ops.ccgqa.ccgqa_prologue`` with the original
project's convs (per-head conv1, dense conv2) and ``qk_mean="all"``, its composite and
kernel paths (kernels/ccgqa_seed_prologue.py), and its recognition (passes/prologue.py).

By default the pass fuses inference graphs and leaves training graphs to Inductor (the
policy: our backward kernels measured slower on the H100) with the reason in the report;
with the policy off the tests check that the patterns fire in training graphs too and
that the compiled module matches eager, outputs and every gradient, so the patterns, the
op and its autograd stay exact for the day the backward kernels win."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import ccgqa_compile
from ccgqa_compile import config
from ccgqa_compile.kernels.ccgqa_seed_prologue import ccgqa_seed_prologue_reference
from ccgqa_compile.ops import ccgqa_prologue as prologue_op
from patterns import CORPUS, Shape
from patterns.ccgqa import CCGQAAttentionSeed, _block_counts

from ._backends import ccgqa_without_codegen
from ._compare import rel_err
from .test_corpus_equivalence import run_entry

f64 = torch.float64


def _op_inputs(dtype, device="cpu", heads=4, kv_heads=2, d=8, t=7, k=3, temp=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        v = (torch.rand(shape, generator=gen) + 0.5) * (torch.randint(0, 2, shape) * 2 - 1)
        return (v * scale).to(device=device, dtype=dtype)

    e_q, e_kv = heads * d, kv_heads * d
    qkv = r(2, t, e_q + 2 * e_kv)
    tensors = [
        qkv[..., :e_q],
        qkv[..., e_q : e_q + e_kv],
        r(e_q, d, k, scale=1 / math.sqrt(d * k)),
        r(e_q, e_q, k, scale=1 / math.sqrt(e_q * k)),
        r(e_kv, d, k, scale=1 / math.sqrt(d * k)),
        r(e_kv, e_kv, k, scale=1 / math.sqrt(e_kv * k)),
        r(1, scale=2.0).reshape(()) if temp else None,
        r(t, d),
        r(t, d),
    ]
    return tensors, (heads, kv_heads, 1e-12, True)


def _seed_op(q_pre, k_pre, qw1, qw2, kw1, kw2, temp, cos, sin, heads, kv_heads, eps, inter):
    """The seed's prologue as the unified op computes it: no biases, a raw scalar
    temperature, no norm scale, full-width RoPE."""
    return torch.ops.ccgqa.ccgqa_prologue(
        q_pre, k_pre, qw1, None, qw2, None, kw1, None, kw2, None, temp, cos, sin,
        heads, kv_heads, "all", "raw" if temp is not None else "none", 1.0, eps,
        cos.shape[-1], inter,
    )  # fmt: skip


@pytest.mark.parametrize("temp", [True, False], ids=["temperature", "no-temperature"])
def test_composite_gradients_pass_gradcheck(temp):
    """float64 through the op (the composite path): every input's gradient, against finite
    differences."""
    tensors, scalars = _op_inputs(torch.float64, heads=3, kv_heads=1, d=4, t=5, k=2, temp=temp)
    leaves = [x.detach().clone().requires_grad_(i < 7) if x is not None else None
              for i, x in enumerate(tensors)]  # fmt: skip

    def fn(*grad_inputs):
        it = iter(grad_inputs)
        args = [next(it) if (i < 7 and x is not None) else x for i, x in enumerate(leaves)]
        return _seed_op(*args, *scalars)

    assert torch.autograd.gradcheck(fn, [x for x in leaves[:7] if x is not None])


def test_kernel_path_through_the_op_matches_the_reference(device):
    """The op's Triton path (interpreter on CPU, or a GPU) with its registered backward,
    against the float64 reference: q, k and every gradient."""
    tensors, scalars = _op_inputs(torch.float32, device=device, t=37)
    leaves = [x.detach().clone().requires_grad_(i < 7) if x is not None else None
              for i, x in enumerate(tensors)]  # fmt: skip
    q, k = _seed_op(*leaves, *scalars)
    ref_leaves = [x.detach().double().requires_grad_(i < 7) for i, x in enumerate(tensors)]
    q_ref, k_ref = ccgqa_seed_prologue_reference(*ref_leaves, *scalars)
    gen = torch.Generator().manual_seed(3)
    dq = torch.randn(q.shape, generator=gen).to(q)
    dk = torch.randn(k.shape, generator=gen).to(k)
    grads = torch.autograd.grad((q, k), leaves[:7], (dq, dk))
    want = torch.autograd.grad((q_ref, k_ref), ref_leaves[:7], (dq.double(), dk.double()))
    assert rel_err(q, q_ref) < 2e-5 and rel_err(k, k_ref) < 2e-5
    for i, (got, expected) in enumerate(zip(grads, want)):
        assert torch.isfinite(got).all() and rel_err(got, expected) < 2e-5, i


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.__setitem__(2, t[2][:, :2]), "conv1 must be depthwise"),
        (lambda t: t.__setitem__(3, t[3][:, :4]), "conv2 must be grouped per head"),
        (lambda t: t.__setitem__(6, torch.ones(3)), "temp must hold 1 or 2 values"),
        (lambda t: t.__setitem__(7, torch.ones(7, 6)), "is not a"),
    ],
    ids=["conv1-two-channels-per-group", "conv2-four-inputs", "three-temperatures", "narrow-table"],
)
def test_bad_arguments_raise_a_clear_error(change, match):
    tensors, scalars = _op_inputs(torch.float32)
    change(tensors)
    with pytest.raises(ValueError, match=match):
        _seed_op(*tensors, *scalars)


def test_seed_and_stock_convs_mixed_take_the_composite():
    """q's convs in the seed's form, k's in ZAYA's: no kernel family computes that, the
    composite does (it is the same function as two separate chains)."""
    tensors, scalars = _op_inputs(torch.float64)
    q_pre, k_pre, qw1, qw2, kw1, kw2, temp, cos, sin = tensors
    heads, kv_heads, eps, inter = scalars
    e_kv, d = k_pre.shape[-1], q_pre.shape[-1] // heads
    kw1_dw, kw2_ph = torch.randn(e_kv, 1, kw1.shape[-1], dtype=f64), kw2[:, :d]
    tensors13 = (q_pre, k_pre, qw1, None, qw2, None, kw1_dw, None, kw2_ph, None, temp, cos, sin)
    assert prologue_op._form(tensors13, heads, kv_heads, "all") is None
    q, k = torch.ops.ccgqa.ccgqa_prologue(
        *tensors13, heads, kv_heads, "all", "raw", 1.0, eps, d, inter
    )
    # k's chain by hand: depthwise conv1, per-head conv2, plus half the mean of q_pre
    pad = torch.nn.functional.pad
    x = pad(k_pre.transpose(1, 2), (kw1.shape[-1] - 1, 0))
    y = torch.nn.functional.conv1d(x, kw1_dw, groups=e_kv)
    y = torch.nn.functional.conv1d(pad(y, (kw2.shape[-1] - 1, 0)), kw2_ph, groups=kv_heads)
    b, t = q_pre.shape[:2]
    raw = y.transpose(1, 2).reshape(b, t, kv_heads, d)
    raw = raw + q_pre.reshape(b, t, heads, d).mean(2, keepdim=True) / 2
    unit = torch.nn.functional.normalize(raw, dim=-1, eps=eps) * temp
    unit = unit.transpose(1, 2)
    rot = torch.stack((-unit[..., 1::2], unit[..., 0::2]), -1).flatten(-2)
    torch.testing.assert_close(k, unit * cos + rot * sin, rtol=1e-12, atol=1e-12)
    q_ref, _ = ccgqa_seed_prologue_reference(*tensors, *scalars)
    torch.testing.assert_close(q, q_ref, rtol=1e-12, atol=1e-12)


def _compile_and_compare(module: torch.nn.Module, training: bool, width: int):
    torch.manual_seed(1)
    x = torch.randn(2, 6, width, requires_grad=training)
    ccgqa_compile.reset_report()
    compiled = torch.compile(module, backend=ccgqa_without_codegen, fullgraph=True)
    with torch.set_grad_enabled(training):
        out_c, out_e = compiled(x), module(x)
    assert rel_err(out_c, out_e) < 2e-5
    if training:
        wrt = [x, *module.parameters()]
        grad_out = torch.randn_like(out_e)
        grads_c = torch.autograd.grad(out_c, wrt, grad_out)
        grads_e = torch.autograd.grad(out_e, wrt, grad_out)
        for i, (got, want) in enumerate(zip(grads_c, grads_e)):
            assert rel_err(got, want) < 2e-5, i
    return ccgqa_compile.report()


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 1)], ids=["grouped", "single-kv-head"])
def test_seed_prologue_fuses_with_the_policy_off(monkeypatch, heads, training):
    monkeypatch.setattr(config, "SEED_PROLOGUE_IN_TRAINING", True)
    h_q, h_kv = heads
    module = CCGQAAttentionSeed(2 * h_q * 8, h_q, h_kv, 2)  # d = 8
    rep = _compile_and_compare(module, training, 2 * h_q * 8)
    assert rep.count("ccgqa_prologue") == 1, str(rep)
    assert rep.count("ccgqa_block") == 1 and rep.count("gqa_attention") == 1, str(rep)
    assert "idiom=seed_variant" in str(rep), str(rep)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_default_policy_fuses_inference_and_leaves_training_to_inductor(training):
    """The policy: inference graphs fuse (the forward kernels are faster); in training
    graphs the match is found, rejected with the measured reason, and the module still
    computes what eager does (its attention fuses)."""
    assert not config.SEED_PROLOGUE_IN_TRAINING
    rep = _compile_and_compare(CCGQAAttentionSeed(64, 4, 2, 2), training, 64)
    assert rep.count("gqa_attention") == 1, str(rep)
    reasons = [r.reason for r in rep.rejected if r.fusion == "ccgqa_prologue"]
    if training:
        assert rep.count("ccgqa_prologue") == 0 and rep.count("ccgqa_block") == 0, str(rep)
        assert reasons and all("SEED_PROLOGUE_IN_TRAINING" in r for r in reasons), str(rep)
    else:
        assert rep.count("ccgqa_prologue") == 1 and rep.count("ccgqa_block") == 1, str(rep)
        assert not any("SEED_PROLOGUE_IN_TRAINING" in r for r in reasons), str(rep)


@pytest.mark.parametrize("mean_scale", [0.25, 1.0])
def test_another_mean_coefficient_is_a_near_miss(monkeypatch, mean_scale):
    """q + c * mean with c != 1/2 is another computation: never replaced."""
    monkeypatch.setattr(config, "SEED_PROLOGUE_IN_TRAINING", True)
    module = CCGQAAttentionSeed(64, 4, 2, 2, mean_scale=mean_scale)
    rep = _compile_and_compare(module, False, 64)
    assert rep.count("ccgqa_prologue") == 0, str(rep)
    assert [r for r in rep.rejected if r.fusion == "ccgqa_prologue"], str(rep)


def test_kernel_support_limits():
    """What the pass may hand the kernels (the rest is the composite or Inductor)."""
    def seed_kernels(e_q, e_kv, d, k1, k2, **change):
        options = dict(temp=torch.ones(()), temperature="raw", norm_scale=1.0,
                       eps_mode="clamp", rotary_dim=d, rotary_start=0)  # fmt: skip
        options.update(change)
        q_pre, k_pre = torch.empty(1, 2, e_q), torch.empty(1, 2, e_kv)
        tensors = (q_pre, k_pre, *([None] * 8))
        return prologue_op._seed_kernel_ok(tensors, e_q // d, k1, k2, tuple(options.values()))

    with pytest.MonkeyPatch.context() as mp:  # as if on a GPU
        mp.setattr(prologue_op, "use_triton", lambda *tensors: True)
        assert seed_kernels(128, 32, 16, 3, 3)
        assert not seed_kernels(256, 64, 32, 3, 3)  # wider than one program holds
        assert not seed_kernels(96, 24, 12, 3, 3)  # head dim not a power of two
        assert not seed_kernels(128, 32, 16, 5, 3)
        assert not seed_kernels(128, 32, 16, 3, 3, temperature="exp")
        assert not seed_kernels(128, 32, 16, 3, 3, norm_scale=4.0)
        assert not seed_kernels(128, 32, 16, 3, 3, rotary_dim=8)
        assert not seed_kernels(128, 32, 16, 3, 3, temp=torch.ones(2))
        # forward and backward (which also reads dq and dk) take the same kernels
        tensors, (heads, kv_heads, eps, inter) = _op_inputs(torch.float32)
        q_pre, k_pre, qw1, qw2, kw1, kw2, temp, cos, sin = tensors
        args13 = (q_pre, k_pre, qw1, None, qw2, None, kw1, None, kw2, None, temp, cos, sin)
        options = (temp, "raw", 1.0, "clamp", cos.shape[-1], 0)
        grads = (torch.empty(2, heads, 7, 8), torch.empty(2, kv_heads, 7, 8))
        for checked in ((), grads):
            assert prologue_op._kernels_for(args13, heads, kv_heads, "all", options, inter, checked) == "seed"


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize(
    "widths",
    [(512, 8, 2, 4, 300), (192, 3, 1, 2, 37)],
    ids=["seed-E512-T300", "E192-hq3-T37"],
)
def test_seed_kernels_inside_a_compiled_module_on_cuda(monkeypatch, widths, training):
    """With the policy off, Inductor inlines the seed kernels (triton_op) into the
    compiled module on the GPU: bf16 output and every gradient as close to float64 as
    eager's, the prologue and the whole block reported fused (the block report pairs the
    seed's two per-stream launches). The first config is the seed's own (widths 128 + 32,
    T not a multiple of the 64-row tile), the second pads 96 channels to 128."""
    monkeypatch.setattr(config, "SEED_PROLOGUE_IN_TRAINING", True)
    dim, h_q, h_kv, c, t = widths
    seed_entry = next(e for e in CORPUS if e.name == "ccgqa_seed_variant")
    entry = dataclasses.replace(
        seed_entry,
        build=lambda s: CCGQAAttentionSeed(dim, h_q, h_kv, c),
        make_inputs=lambda s, dtype, device: (
            torch.randn(s.batch, s.seq, dim, dtype=dtype, device=device),
        ),
        also=_block_counts(1, 1),
        also_in_training=None,  # the policy is off: training graphs fuse too
        note="policy off",
    )
    run_entry(entry, Shape(batch=2, seq=t, heads=h_q), torch.bfloat16, training, device="cuda")
