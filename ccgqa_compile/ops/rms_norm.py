"""``torch.ops.ccgqa.rms_norm``: RMSNorm with optional (offset) weight, fused fwd and bwd.

y = x * rsqrt(mean(x^2, -1) + eps) * (weight_offset + weight), computed in fp32 (fp64 for
fp64 inputs), returned in ``out_dtype``. ``weight_offset`` is 0 for Llama and 1 for Gemma.
``eps_tensor`` (one value, any device) is added to eps when the program runs: Dynamo lifts
a float module attribute to such an input under ``dynamic=True`` (gpt-fast's prefill).
The forward also returns rstd (one value per row) so the backward does not recompute it.
``clamp``: the norm clamped from below instead, y = x / max(sqrt(mean(x^2)), eps) * w
(``F.normalize(x) * sqrt(N) * w`` with eps / sqrt(N)); a clamped row's rstd is stored
negated, which tells the backward that rstd is constant there.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from ._dispatch import composite_op, compute_dtype, use_triton

MAX_KERNEL_ROW = 65536  # one row must fit in one program's registers


def _rms_norm_fwd_composite(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    weight_offset: float,
    out_dtype: torch.dtype,
    eps_tensor: Tensor | None = None,
    clamp: bool = False,
) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    mean_square = xf.pow(2).mean(-1, keepdim=True)
    if eps_tensor is not None:
        eps = eps_tensor.to(device=x.device, dtype=acc) + eps
    if clamp:
        rms = mean_square.sqrt()
        rstd = 1 / torch.maximum(rms, torch.as_tensor(eps, dtype=acc, device=x.device))
        stored = torch.where(rms < eps, -rstd, rstd)
    else:
        rstd = torch.rsqrt(mean_square + eps)
        stored = rstd
    y = xf * rstd
    if weight is not None:
        y = y * (weight.to(acc) + weight_offset)
    return y.to(out_dtype), stored.squeeze(-1)


def _rms_norm_bwd_composite(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, weight_offset: float
) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(x.dtype, dy.dtype)
    xf, dyf, r = x.to(acc), dy.to(acc), rstd.to(acc).unsqueeze(-1)
    clamped, r = r < 0, r.abs()  # a clamped row's rstd is stored negated
    x_hat = xf * r
    if weight is not None:
        g = dyf * (weight.to(acc) + weight_offset)
        dw = (dyf * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    else:
        g = dyf
        dw = x.new_empty((0,))
    dx = r * (g - x_hat * torch.where(clamped, 0.0, (g * x_hat).mean(-1, keepdim=True)))
    return dx.to(x.dtype), dw


rms_norm_fwd_composite = composite_op("rms_norm_composite", _rms_norm_fwd_composite)
rms_norm_bwd_composite = composite_op("rms_norm_backward_composite", _rms_norm_bwd_composite)


def _kernel_ok(x: Tensor, weight: Tensor | None) -> bool:
    return use_triton(x, weight) and 0 < x.shape[-1] <= MAX_KERNEL_ROW


def _check_eps_tensor(eps_tensor: Tensor | None) -> None:
    if eps_tensor is not None and (eps_tensor.numel() != 1 or not eps_tensor.is_floating_point()):
        raise ValueError(
            f"eps_tensor must hold one float, got {eps_tensor.dtype} {tuple(eps_tensor.shape)}"
        )


@triton_op("ccgqa::rms_norm", mutates_args=())
def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    weight_offset: float,
    out_dtype: torch.dtype,
    eps_tensor: Tensor | None = None,
    clamp: bool = False,
) -> tuple[Tensor, Tensor]:
    _check_eps_tensor(eps_tensor)
    if _kernel_ok(x, weight):
        from ..kernels import rms_norm as kernels

        n = x.shape[-1]
        if eps_tensor is not None:  # a one-element copy: the kernel reads it on x's device
            eps_tensor = eps_tensor.to(device=x.device, dtype=torch.float32).reshape(1)
        y, rstd = kernels.rms_norm_fwd(
            x.reshape(-1, n), weight, eps, weight_offset, out_dtype, eps_tensor, clamp
        )
        return y.view(x.shape), rstd.view(x.shape[:-1])
    return rms_norm_fwd_composite(x, weight, eps, weight_offset, out_dtype, eps_tensor, clamp)


@triton_op("ccgqa::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, weight_offset: float
) -> tuple[Tensor, Tensor]:
    """Returns (dx, dweight); dweight is an empty tensor when weight is None."""
    if _kernel_ok(x, weight) and use_triton(dy):
        from ..kernels import rms_norm as kernels

        n = x.shape[-1]
        dx, dw = kernels.rms_norm_bwd(
            dy.reshape(-1, n), x.reshape(-1, n), weight, rstd.reshape(-1), weight_offset
        )
        return dx.view(x.shape), dw if dw is not None else x.new_empty((0,))
    return rms_norm_bwd_composite(dy, x, weight, rstd, weight_offset)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _eps, weight_offset, _out_dtype, _eps_tensor, _clamp = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.weight_offset = weight_offset
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, grad_y: Tensor, _grad_rstd: Tensor | None):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.ccgqa.rms_norm_backward(grad_y, x, weight, rstd, ctx.weight_offset)
    return dx, (dw if weight is not None else None), None, None, None, None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)
