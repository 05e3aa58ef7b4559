"""``torch.ops.ccgqa.ccgqa_seed_prologue``: the original project's q/k prologue, fused.

q_pre (B, T, Hq*D), k_pre (B, T, Hkv*D) -> q (B, Hq, T, D), k (B, Hkv, T, D), exactly as
patterns/ccgqa.py ``CCGQAAttentionSeed.forward`` computes them (../shared/design/ccgqa.md,
"The original project's variant"): conv1 grouped per head (weight (C, D, K1)), conv2 dense
across the stream's heads (weight (C, C, K2)), no biases, each causally zero-padded; q plus
half the mean over all kv heads of k_pre, k plus half the mean over all query heads of
q_pre; ``F.normalize`` (``x / max(|x|, eps)``, no sqrt(D)); k times one scalar ``temp``
(or nothing); full RoPE with (..., T, D) cos/sin tables, interleaved pairs (the seed's) or
rotate-half. Gradients flow to q_pre, k_pre, the four conv weights and temp.

The stock ``ccgqa_prologue`` op (per-group mean, depthwise conv1, per-head conv2) is
another computation; its kernels cannot hold the dense conv2 (see
kernels/ccgqa_seed_prologue.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from ._dispatch import compute_dtype, use_triton
from .ccgqa_prologue import projections_problem, tables_problem


def check_args(
    q_pre: Tensor,
    k_pre: Tensor,
    q_conv1_weight: Tensor,
    q_conv2_weight: Tensor,
    k_conv1_weight: Tensor,
    k_conv2_weight: Tensor,
    temp: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    heads: int,
    kv_heads: int,
) -> str | None:
    """None when the op computes what was asked, else why not (the op raises it)."""
    problem = projections_problem(q_pre, k_pre)
    if problem is not None:
        return problem
    if heads < 1 or kv_heads < 1:
        return "head counts must be positive"
    e_q, e_kv = q_pre.shape[-1], k_pre.shape[-1]
    if e_q == 0 or e_q % heads or e_kv != kv_heads * (e_q // heads):
        return f"widths {e_q}, {e_kv} do not split into {heads}, {kv_heads} heads of one size"
    d = e_q // heads
    if d % 2:
        return f"RoPE needs an even head dim, got {d}"
    k1, k2 = q_conv1_weight.shape[-1], q_conv2_weight.shape[-1]
    if k1 < 1 or k2 < 1:
        return "conv kernels must have at least one tap"
    for name, width, w1, w2 in (
        ("q", e_q, q_conv1_weight, q_conv2_weight),
        ("k", e_kv, k_conv1_weight, k_conv2_weight),
    ):
        if tuple(w1.shape) != (width, d, k1):
            return (
                f"{name} conv1 must be grouped per head with weight ({width}, {d}, {k1}), "
                f"got {tuple(w1.shape)}"
            )
        if tuple(w2.shape) != (width, width, k2):
            return f"{name} conv2 must be dense with weight ({width}, {width}, {k2}), got {tuple(w2.shape)}"
    if temp is not None and temp.numel() != 1:
        return f"temp must be one value, got shape {tuple(temp.shape)}"
    return tables_problem(cos, sin, *q_pre.shape[:2], d)


# ----------------------------------------------------------------------------
# Exact composite (plain PyTorch, fp32 or fp64 compute) for everything the op accepts.
# ----------------------------------------------------------------------------


def _reference(*args, **kwargs):
    from ..kernels.ccgqa_seed_prologue import ccgqa_seed_prologue_reference

    return ccgqa_seed_prologue_reference(*args, **kwargs)


def _composite_fwd(
    q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin, heads, kv_heads, eps, interleaved
):
    q, k = _reference(
        q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin, heads, kv_heads, eps, interleaved
    )
    return q.contiguous(), k.contiguous()


def _composite_bwd(
    dq, dk, q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin, heads, kv_heads, eps, inter
):
    """The reference's vector-Jacobian product, every input upcast (fp32 or fp64).
    ``torch.func.vjp``, not ``autograd.grad``: a custom op's body runs below the autograd
    dispatch key, where leaves record nothing."""
    acc = compute_dtype(q_pre.dtype, q_w2.dtype, dq.dtype)
    inputs = [q_pre, k_pre, q_w1, q_w2, k_w1, k_w2] + ([temp] if temp is not None else [])

    def forward(*upcast):
        t = upcast[6] if temp is not None else None
        return _reference(*upcast[:6], t, cos, sin, heads, kv_heads, eps, inter)

    _, vjp = torch.func.vjp(forward, *(x.detach().to(acc) for x in inputs))
    grads = vjp((dq.to(acc), dk.to(acc)))
    out = [g.to(x.dtype).contiguous() for g, x in zip(grads, inputs)]
    if temp is None:
        out.append(q_pre.new_empty((0,)))
    return out


@torch.library.custom_op("ccgqa::ccgqa_seed_prologue_composite", mutates_args=())
def ccgqa_seed_prologue_composite(
    q_pre: Tensor,
    k_pre: Tensor,
    q_conv1_weight: Tensor,
    q_conv2_weight: Tensor,
    k_conv1_weight: Tensor,
    k_conv2_weight: Tensor,
    temp: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
    interleaved: bool,
) -> tuple[Tensor, Tensor]:
    return _composite_fwd(
        q_pre, k_pre, q_conv1_weight, q_conv2_weight, k_conv1_weight, k_conv2_weight,
        temp, cos, sin, heads, kv_heads, eps, interleaved,
    )  # fmt: skip


@ccgqa_seed_prologue_composite.register_fake
def _(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin, heads, kv_heads, eps, inter):
    return _fake_outputs(q_pre, k_pre, heads, kv_heads)


@torch.library.custom_op("ccgqa::ccgqa_seed_prologue_backward_composite", mutates_args=())
def ccgqa_seed_prologue_backward_composite(
    dq: Tensor,
    dk: Tensor,
    q_pre: Tensor,
    k_pre: Tensor,
    q_conv1_weight: Tensor,
    q_conv2_weight: Tensor,
    k_conv1_weight: Tensor,
    k_conv2_weight: Tensor,
    temp: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
    interleaved: bool,
) -> list[Tensor]:
    return _composite_bwd(
        dq, dk, q_pre, k_pre, q_conv1_weight, q_conv2_weight, k_conv1_weight, k_conv2_weight,
        temp, cos, sin, heads, kv_heads, eps, interleaved,
    )  # fmt: skip


@ccgqa_seed_prologue_backward_composite.register_fake
def _(dq, dk, q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin, heads, kv_heads, eps, inter):
    return _fake_grads(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp)


def _fake_outputs(q_pre, k_pre, heads, kv_heads):
    b, t, e_q = q_pre.shape
    d = e_q // heads
    return q_pre.new_empty((b, heads, t, d)), k_pre.new_empty((b, kv_heads, t, d))


def _fake_grads(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp):
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q_pre, k_pre)]
    out += [torch.empty_like(w) for w in (q_w1, q_w2, k_w1, k_w2)]
    out.append(torch.empty_like(temp) if temp is not None else q_pre.new_empty((0,)))
    return out


def _structural(heads, kv_heads) -> tuple[int, int]:
    """Head counts shape the kernels (constexprs): specialise SymInts (a guard)."""
    return int(heads), int(kv_heads)


def _kernel_ok(tensors, q_pre: Tensor, heads: int, kv_heads: int, k1: int, k2: int) -> bool:
    d = q_pre.shape[-1] // heads
    return use_triton(*tensors) and kernel_supports(heads * d, kv_heads * d, d, k1, k2)


def _dense(tensors):
    """q_pre and k_pre as contiguous tensors for the kernels. In a traced ``triton_op`` the
    row strides the kernels get are read from the fake tensors; the seed's q_pre and k_pre
    are column slices of the fused qkv output, and nothing checked yet (H100, Inductor path
    with the policy off) that Inductor hands the kernel exactly that view. A copy of the
    two projections (a few MB) makes the strides true either way."""
    q_pre, k_pre, *rest = tensors
    return (q_pre.contiguous(), k_pre.contiguous(), *rest)


def kernel_supports(q_pre_width: int, kv_width: int, head_dim: int, k1: int, k2: int) -> bool:
    """Whether the Triton kernels (not the composite) take this shape on a GPU."""
    from ..kernels.ccgqa_seed_prologue import MAX_CONV_KERNEL, MAX_KERNEL_WIDTH

    return (
        head_dim & (head_dim - 1) == 0
        and max(q_pre_width, kv_width) <= MAX_KERNEL_WIDTH
        and max(k1, k2) <= MAX_CONV_KERNEL
    )


@triton_op("ccgqa::ccgqa_seed_prologue", mutates_args=())
def ccgqa_seed_prologue(
    q_pre: Tensor,
    k_pre: Tensor,
    q_conv1_weight: Tensor,
    q_conv2_weight: Tensor,
    k_conv1_weight: Tensor,
    k_conv2_weight: Tensor,
    temp: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
    interleaved: bool,
) -> tuple[Tensor, Tensor]:
    tensors = (
        q_pre, k_pre, q_conv1_weight, q_conv2_weight, k_conv1_weight, k_conv2_weight,
        temp, cos, sin,
    )  # fmt: skip
    heads, kv_heads = _structural(heads, kv_heads)
    problem = check_args(*tensors, heads, kv_heads)
    if problem is not None:
        raise ValueError(f"ccgqa_seed_prologue: {problem}")
    k1, k2 = q_conv1_weight.shape[-1], q_conv2_weight.shape[-1]
    if _kernel_ok(tensors, q_pre, heads, kv_heads, k1, k2):
        from ..kernels import ccgqa_seed_prologue as kernels

        return kernels.ccgqa_seed_prologue_fwd(*_dense(tensors), heads, kv_heads, eps, interleaved)
    return ccgqa_seed_prologue_composite(*tensors, heads, kv_heads, eps, interleaved)


@triton_op("ccgqa::ccgqa_seed_prologue_backward", mutates_args=())
def ccgqa_seed_prologue_backward(
    dq: Tensor,
    dk: Tensor,
    q_pre: Tensor,
    k_pre: Tensor,
    q_conv1_weight: Tensor,
    q_conv2_weight: Tensor,
    k_conv1_weight: Tensor,
    k_conv2_weight: Tensor,
    temp: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
    interleaved: bool,
) -> list[Tensor]:
    """(d q_pre, d k_pre, d q_conv1 w, d q_conv2 w, d k_conv1 w, d k_conv2 w, d temp); an
    absent temp gets an empty tensor."""
    tensors = (
        q_pre, k_pre, q_conv1_weight, q_conv2_weight, k_conv1_weight, k_conv2_weight,
        temp, cos, sin,
    )  # fmt: skip
    heads, kv_heads = _structural(heads, kv_heads)
    k1, k2 = q_conv1_weight.shape[-1], q_conv2_weight.shape[-1]
    if _kernel_ok((dq, dk, *tensors), q_pre, heads, kv_heads, k1, k2):
        from ..kernels import ccgqa_seed_prologue as kernels

        grads = kernels.ccgqa_seed_prologue_bwd(
            dq, dk, *_dense(tensors), heads, kv_heads, eps, interleaved
        )
        return [g if g is not None else q_pre.new_empty((0,)) for g in grads]
    return ccgqa_seed_prologue_backward_composite(
        dq, dk, *tensors, heads, kv_heads, eps, interleaved
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:9])
    ctx.scalars = inputs[9:]


def _backward(ctx, grad_q: Tensor, grad_k: Tensor):
    tensors = ctx.saved_tensors
    grads = torch.ops.ccgqa.ccgqa_seed_prologue_backward(grad_q, grad_k, *tensors, *ctx.scalars)
    temp_grad = grads[6] if tensors[6] is not None else None
    return (*grads[:6], temp_grad, None, None, None, None, None, None)


ccgqa_seed_prologue.register_autograd(_backward, setup_context=_setup_context)
