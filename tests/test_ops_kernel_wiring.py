"""The ops' kernel path (op -> launch wrapper -> Triton kernel -> registered backward),
run eagerly on CPU under the Triton interpreter, against the composite fallback and a
float64 reference. On the GPU the same test runs with real kernels (marked cuda)."""

from __future__ import annotations

import pytest
import torch

import ccgqa_compile  # noqa: F401
from ccgqa_compile.ops import _dispatch

from ._compare import rel_err

pytest.importorskip("triton")
ops = torch.ops.ccgqa


def _signed(*shape, device, dtype=torch.float32):
    t = torch.rand(*shape, device=device) + 0.5
    return (t * torch.where(torch.rand(*shape, device=device) < 0.5, -1.0, 1.0)).to(dtype)


def _check(fn_args, run, device, tol=1e-5):
    """Kernel path vs float64 composite: outputs and gradients of every tensor input."""
    assert _dispatch.use_triton(*[a for a in fn_args if isinstance(a, torch.Tensor)])
    grads_in = [
        a.detach().clone().requires_grad_(a.is_floating_point())
        if isinstance(a, torch.Tensor)
        else a
        for a in fn_args
    ]
    out = run(*grads_in)
    g = torch.randn_like(out)
    out.backward(g)
    ref_in = [
        a.detach().double().requires_grad_(True) if isinstance(a, torch.Tensor) else a
        for a in fn_args
    ]
    ref = run(*ref_in)  # fp64: composite path
    ref.backward(g.double())
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    for a, r in zip(grads_in, ref_in):
        if isinstance(a, torch.Tensor) and a.grad is not None:
            assert torch.isfinite(a.grad).all()
            assert rel_err(a.grad, r.grad) < tol, rel_err(a.grad, r.grad)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_kernel_path(device, offset):
    x, w = _signed(3, 5, 33, device=device), _signed(33, device=device)

    def run(x, w):
        return ops.rms_norm(x, w, 1e-5, offset, x.dtype)[0]

    _check([x, w], run, device)


def test_swiglu_kernel_paths(device):
    g, u = _signed(4, 3, 19, device=device), _signed(4, 3, 19, device=device)
    _check([g, u], ops.swiglu, device)
    _check([_signed(5, 38, device=device)], ops.swiglu_packed, device)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [12, 8])
def test_rope_kernel_path_on_transposed_q(device, interleaved, rotary_dim):
    q = _signed(2, 7, 3, 12, device=device).transpose(1, 2)  # HF layout: a strided view
    cos, sin = _signed(7, rotary_dim, device=device), _signed(7, rotary_dim, device=device)

    def run(q, cos, sin):
        return ops.rope(q, cos, sin, rotary_dim, interleaved, q.dtype)

    _check([q, cos.requires_grad_(False), sin], run, device)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_backward_writes_dx_in_the_layout_of_x(device, interleaved):
    """dx of a (B, T, H, D) projection seen as (B, H, T, D) comes back in that layout
    (autograd's leaf-gradient layout and the projection's backward then copy nothing),
    with the same values as the contiguous composite."""
    from ccgqa_compile.ops.rope import stride_order

    q = _signed(2, 7, 3, 16, device=device).transpose(1, 2).requires_grad_()
    cos, sin = _signed(7, 16, device=device), _signed(7, 16, device=device)
    out = ops.rope(q, cos, sin, 16, interleaved, q.dtype)
    dy = _signed(*out.shape, device=device)
    (dx,) = torch.autograd.grad(out, q, dy)
    assert dx.stride() == q.stride(), (dx.stride(), q.stride())
    direct = ops.rope_backward(dy, cos, sin, 16, interleaved, q.dtype, stride_order(q))
    assert direct.stride() == q.stride()
    ref = ops.rope_backward(dy.double(), cos.double(), sin.double(), 16, interleaved, torch.float64)
    assert ref.is_contiguous()  # the composite (fp64) path ignores the layout
    for got in (dx, direct):
        assert torch.isfinite(got).all() and rel_err(got, ref) < 1e-5


def test_kernel_path_is_used_only_when_enabled(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.delenv("CCGQA_INTERPRET_KERNELS_ON_CPU", raising=False)
    assert not _dispatch.use_triton(x)
    monkeypatch.setenv("CCGQA_DISABLE_KERNELS", "1")
    monkeypatch.setenv("CCGQA_INTERPRET_KERNELS_ON_CPU", "1")
    assert not _dispatch.use_triton(x)


def _fp32_attention_tolerance(device, monkeypatch) -> float:
    """On the GPU the attention kernel takes fp32 only where tf32 is allowed (as eager's
    matmuls would use it): allow it, and expect tf32's ~1e-3. The interpreter is IEEE."""
    if device != "cuda":
        return 1e-4
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    # tf32 keeps 10 mantissa bits (2^-11 = 4.9e-4 per rounding); on the H100, T = 2 gave
    # 2.3e-3 for dq, whose first row is an exact 0 computed as a tf32 difference
    return 5e-3


@pytest.mark.parametrize(
    "heads, seq", [((4, 2), 19), ((3, 1), 2)]
)  # T=1: dq is exactly 0, see kernel tests
def test_gqa_attention_kernel_path(device, heads, seq, monkeypatch):
    h_q, h_kv = heads
    q = _signed(2, seq, h_q, 16, device=device).transpose(1, 2)
    k = _signed(2, seq, h_kv, 16, device=device).transpose(1, 2)
    v = _signed(2, seq, h_kv, 16, device=device).transpose(1, 2)

    def run(q, k, v):
        return ops.gqa_attention(q, k, v, 0.25)[0]

    _check([q, k, v], run, device, tol=_fp32_attention_tolerance(device, monkeypatch))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_attention_without_tf32_is_exact_on_the_gpu(monkeypatch):
    """fp32 on the GPU with tf32 off (PyTorch's default): the exact composite runs, so
    the result is as close to float64 as eager's fp32 matmuls, not tf32's 1e-3."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    q, k, v = (_signed(2, h, 37, 32, device="cuda") for h in (4, 2, 2))
    out = ops.gqa_attention(q, k, v, 0.2)[0]
    ref = ops.gqa_attention(q.double(), k.double(), v.double(), 0.2)[0]
    assert rel_err(out, ref) < 1e-5


def _composites_forbidden(monkeypatch):
    """Make every composite fallback of rope and attention raise: the kernel must run."""
    from ccgqa_compile.ops import gqa_attention as attention_op
    from ccgqa_compile.ops import rope as rope_op

    def refuse(*args, **kwargs):
        raise AssertionError("the composite fallback ran where the kernel should")

    for module, names in (
        (attention_op, ("gqa_attention_composite", "gqa_attention_bwd_composite")),
        (rope_op, ("rope_composite", "rope_bwd_composite")),
    ):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


def test_kernels_take_tensors_whose_last_dim_is_not_unit_stride(device, monkeypatch):
    """A CCGQA block hands the ops q/k laid out as its convolutions left them, (B, C, T) in
    memory: last-dim stride T. The kernels must still run (one copy), not the composite,
    which materialises the T x T scores (seen on the H100: 17 GB and 5x slower)."""
    tol = _fp32_attention_tolerance(device, monkeypatch)
    b, t, h_q, h_kv, d = 2, 9, 4, 2, 16
    q = _signed(b, h_q * d, t, device=device).transpose(1, 2).view(b, t, h_q, d).transpose(1, 2)
    k = _signed(b, h_kv * d, t, device=device).transpose(1, 2).view(b, t, h_kv, d).transpose(1, 2)
    v = _signed(b, t, h_kv, d, device=device).transpose(1, 2)
    assert q.stride(-1) == t and k.stride(-1) == t
    cos, sin = _signed(t, d, device=device), _signed(t, d, device=device)
    expected = [
        ops.gqa_attention(q.double(), k.double(), v.double(), 0.25)[0],
        ops.rope(q.double(), cos.double(), sin.double(), d, False, torch.float64),
    ]
    _composites_forbidden(monkeypatch)

    def attention(q, k, v):
        return ops.gqa_attention(q, k, v, 0.25)[0]

    def rope(q):
        return ops.rope(q, cos, sin, d, False, q.dtype)

    for run, args, ref in ((attention, (q, k, v), expected[0]), (rope, (q,), expected[1])):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out = run(*leaves)
        assert rel_err(out, ref) < tol
        out.backward(torch.randn_like(out))  # the backward kernels too
        assert all(torch.isfinite(a.grad).all() for a in leaves)
