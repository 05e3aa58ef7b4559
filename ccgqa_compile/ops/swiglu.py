"""``torch.ops.ccgqa.swiglu``: silu(gate) * up, fused fwd and bwd.

Two forms: separate ``gate`` and ``up`` tensors, and ``swiglu_packed`` for a fused gate-up
projection split with ``chunk(2, -1)`` (first half gate, second half up), whose backward
writes d(gate_up) in one buffer instead of concatenating two gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from ._dispatch import composite_op, compute_dtype, use_triton


def _swiglu_composite(gate: Tensor, up: Tensor) -> Tensor:
    acc = compute_dtype(gate.dtype, up.dtype)
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(out_dtype)


def _swiglu_bwd_composite(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(gate.dtype, up.dtype, dout.dtype)
    g, u, d = gate.to(acc), up.to(acc), dout.to(acc)
    sig = torch.sigmoid(g)
    dgate = d * u * sig * (1 + g * (1 - sig))
    dup = d * g * sig
    return dgate.to(gate.dtype), dup.to(up.dtype)


swiglu_composite = composite_op("swiglu_composite", _swiglu_composite)
swiglu_bwd_composite = composite_op("swiglu_backward_composite", _swiglu_bwd_composite)


def _kernel_ok(gate: Tensor, up: Tensor) -> bool:
    return use_triton(gate, up) and gate.dtype == up.dtype and gate.shape == up.shape


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


@triton_op("ccgqa::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    if _kernel_ok(gate, up):
        from ..kernels import swiglu as kernels

        return kernels.swiglu_fwd(_rows(gate), _rows(up)).view(gate.shape)
    return swiglu_composite(gate, up)


@triton_op("ccgqa::swiglu_backward", mutates_args=())
def swiglu_backward(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if _kernel_ok(gate, up) and use_triton(dout):
        from ..kernels import swiglu as kernels

        dgate, dup = kernels.swiglu_bwd(_rows(dout), _rows(gate), _rows(up))
        return dgate.view(gate.shape), dup.view(up.shape)
    return swiglu_bwd_composite(dout, gate, up)


def _halves(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    return gate_up.chunk(2, dim=-1)


@triton_op("ccgqa::swiglu_packed", mutates_args=())
def swiglu_packed(gate_up: Tensor) -> Tensor:
    gate, up = _halves(gate_up)
    if _kernel_ok(gate, up) and gate_up.stride(-1) == 1:
        from ..kernels import swiglu as kernels

        flat = _rows(gate_up)
        half = gate.shape[-1]
        return kernels.swiglu_fwd(flat[:, :half], flat[:, half:]).view(gate.shape)
    return swiglu_composite(gate, up)


@triton_op("ccgqa::swiglu_packed_backward", mutates_args=())
def swiglu_packed_backward(dout: Tensor, gate_up: Tensor) -> Tensor:
    gate, up = _halves(gate_up)
    if _kernel_ok(gate, up) and use_triton(dout) and gate_up.stride(-1) == 1:
        from ..kernels import swiglu as kernels

        flat = _rows(gate_up)
        half = gate.shape[-1]
        d_gate_up = torch.empty(flat.shape, dtype=gate_up.dtype, device=gate_up.device)
        kernels.swiglu_bwd(
            _rows(dout), flat[:, :half], flat[:, half:], d_gate_up[:, :half], d_gate_up[:, half:]
        )
        return d_gate_up.view(gate_up.shape)
    dgate, dup = swiglu_bwd_composite(dout, gate, up)
    return torch.cat([dgate, dup], dim=-1)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, grad_out: Tensor):
    gate, up = ctx.saved_tensors
    return torch.ops.ccgqa.swiglu_backward(grad_out, gate, up)


def _swiglu_packed_grad(ctx, grad_out: Tensor):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.ccgqa.swiglu_packed_backward(grad_out, gate_up)


swiglu.register_autograd(_swiglu_grad, setup_context=_save_inputs)
swiglu_packed.register_autograd(_swiglu_packed_grad, setup_context=_save_inputs)
