"""``torch.ops.ccgqa.rope``: rotary position embedding on one tensor, fused fwd and bwd.

The op takes full-width cos/sin tables (last dim = rotary_dim, broadcast against
x[..., :rotary_dim]) and applies out = x*cos + rot(x)*sin elementwise, so it is exact for
any table, not only for duplicated frequencies. Dims >= rotary_dim pass through.
``interleaved=False`` is rotate-half (HF Llama, GPT-NeoX); ``True`` rotates adjacent pairs
(GPT-J, Meta's complex multiply). cos and sin never receive a gradient: the patterns only
match graphs in which they do not require one.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from ._dispatch import composite_op, compute_dtype, unit_last_stride, use_triton


def rotate(x: Tensor, interleaved: bool) -> Tensor:
    """rot(x) such that x*cos + rot(x)*sin rotates each pair by the angle."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_transposed(y: Tensor, interleaved: bool) -> Tensor:
    """The adjoint of ``rotate`` (a rotation by -90 degrees is its transpose)."""
    return -rotate(y, interleaved)


def _rope_composite(
    x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool, out_dtype: torch.dtype
) -> Tensor:
    acc = compute_dtype(x.dtype, cos.dtype, sin.dtype)
    xr = x[..., :rotary_dim].to(acc)
    out = xr * cos.to(acc) + rotate(xr, interleaved) * sin.to(acc)
    if rotary_dim < x.shape[-1]:
        out = torch.cat((out, x[..., rotary_dim:].to(acc)), dim=-1)
    return out.to(out_dtype)


def _rope_bwd_composite(
    dy: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool, x_dtype: torch.dtype
) -> Tensor:
    acc = compute_dtype(dy.dtype, cos.dtype, sin.dtype)
    dyr = dy[..., :rotary_dim].to(acc)
    dx = dyr * cos.to(acc) + rotate_transposed(dyr * sin.to(acc), interleaved)
    if rotary_dim < dy.shape[-1]:
        dx = torch.cat((dx, dy[..., rotary_dim:].to(acc)), dim=-1)
    return dx.to(x_dtype)


def _as_4d(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


rope_composite = composite_op("rope_composite", _rope_composite)
rope_bwd_composite = composite_op("rope_backward_composite", _rope_bwd_composite)


def _kernel_ok(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> bool:
    return use_triton(x, cos, sin) and out_dtype == x.dtype and x.dim() <= 4


def stride_order(x: Tensor) -> list[int]:
    """x's dims from the largest stride to the smallest (ties keep dim order)."""
    return sorted(range(x.dim()), key=lambda i: -x.stride(i))


def _empty_in_order(like: Tensor, order: list[int] | None, dtype: torch.dtype) -> Tensor:
    """A dense tensor of ``like``'s shape whose strides follow ``order``: the gradient of a
    (B, T, H, D) projection seen as (B, H, T, D) is written in that layout, so neither
    autograd (a leaf's gradient layout) nor the projection's backward copies it. Only
    orders that keep the last dim innermost (the kernel's unit stride) are followed."""
    if order is None or len(order) != like.dim() or order[-1] != like.dim() - 1:
        return torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)
    strides = [0] * like.dim()
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(like.shape[dim], 1)
    return torch.empty_strided(like.shape, strides, dtype=dtype, device=like.device)


def _tables_4d(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int) -> tuple[Tensor, Tensor]:
    rot_shape = (*x.shape[:-1], rotary_dim)
    return _as_4d(cos.broadcast_to(rot_shape)), _as_4d(sin.broadcast_to(rot_shape))


@triton_op("ccgqa::rope", mutates_args=())
def rope(
    x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool, out_dtype: torch.dtype
) -> Tensor:
    if _kernel_ok(x, cos, sin, out_dtype):
        from ..kernels import rope as kernels

        x = unit_last_stride(x)
        cos4, sin4 = _tables_4d(x, cos, sin, rotary_dim)
        out = kernels.rope_fwd(_as_4d(x), cos4, sin4, rotary_dim, interleaved)
        return out.view(x.shape)
    return rope_composite(x, cos, sin, rotary_dim, interleaved, out_dtype)


@triton_op("ccgqa::rope_backward", mutates_args=())
def rope_backward(
    dy: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int,
    interleaved: bool,
    x_dtype: torch.dtype,
    x_stride_order: list[int] | None = None,
) -> Tensor:
    if _kernel_ok(dy, cos, sin, x_dtype):
        from ..kernels import rope as kernels

        dy = unit_last_stride(dy)
        cos4, sin4 = _tables_4d(dy, cos, sin, rotary_dim)
        dx = _empty_in_order(dy, x_stride_order, x_dtype)
        kernels.rope_bwd(_as_4d(dy), cos4, sin4, rotary_dim, interleaved, out=_as_4d(dx))
        return dx
    return rope_bwd_composite(dy, cos, sin, rotary_dim, interleaved, x_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, cos, sin, rotary_dim, interleaved, _out_dtype = inputs
    ctx.save_for_backward(cos, sin)
    ctx.rotary_dim, ctx.interleaved, ctx.x_dtype = rotary_dim, interleaved, x.dtype
    ctx.x_stride_order = stride_order(x)


def _backward(ctx, grad_out: Tensor):
    cos, sin = ctx.saved_tensors
    dx = torch.ops.ccgqa.rope_backward(
        grad_out, cos, sin, ctx.rotary_dim, ctx.interleaved, ctx.x_dtype, ctx.x_stride_order
    )
    return dx, None, None, None, None, None


rope.register_autograd(_backward, setup_context=_setup_context)
