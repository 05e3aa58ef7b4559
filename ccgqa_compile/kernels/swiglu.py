"""SwiGLU (silu(gate) * up) forward and backward as Triton kernels, plus a naive
PyTorch reference.

Autograd lives elsewhere; the wrappers are meant to be called from inside
`torch.library.triton_op` bodies, so every launch goes through
`torch.library.wrap_triton` to stay traceable by Inductor.

Inputs and outputs are 2-D with any row and column strides (Triton specialises a
column stride of 1; contiguous operands take a flat, unmasked tiling), so `gate, up =
h.chunk(2, dim=-1)` of a fused gate-up projection `h` (M, 2N), or the interleaved
columns `h[:, 0::2]`, `h[:, 1::2]`, are read in place, and the backward can write `dgate`/`dup` straight into the two
halves of one (M, 2N) gradient buffer (no cat).  Arithmetic is float32:

    out   = silu(gate) * up,                  silu(g) = g * sigmoid(g)
    dup   = dout * silu(gate)
    dgate = dout * up * sig * (1 + gate * (1 - sig)),  sig = sigmoid(gate)
"""

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import traceable

# Elementwise and memory bound: each program moves a tile of about this many
# elements, a whole power-of-two span of a row when rows are short.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_N = 1024
_NUM_WARPS = 8


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_rows,
    n_cols,
    gate_row_stride,
    up_row_stride,
    out_row_stride,
    gate_col_stride,
    up_col_stride,
    out_col_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    # int64 row offsets: M * row_stride can exceed 2**31 for large activations.
    rows_i64 = rows.to(tl.int64)[:, None]
    cols = cols[None, :]

    gate = tl.load(
        gate_ptr + rows_i64 * gate_row_stride + cols * gate_col_stride, mask=mask, other=0.0
    )
    up = tl.load(up_ptr + rows_i64 * up_row_stride + cols * up_col_stride, mask=mask, other=0.0)
    gate = gate.to(tl.float32)
    out = gate * tl.sigmoid(gate) * up.to(tl.float32)
    tl.store(
        out_ptr + rows_i64 * out_row_stride + cols * out_col_stride,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    n_rows,
    n_cols,
    dout_row_stride,
    gate_row_stride,
    up_row_stride,
    dgate_row_stride,
    dup_row_stride,
    dout_col_stride,
    gate_col_stride,
    up_col_stride,
    dgate_col_stride,
    dup_col_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows_i64 = rows.to(tl.int64)[:, None]
    cols = cols[None, :]

    dout = tl.load(
        dout_ptr + rows_i64 * dout_row_stride + cols * dout_col_stride, mask=mask, other=0.0
    )
    gate = tl.load(
        gate_ptr + rows_i64 * gate_row_stride + cols * gate_col_stride, mask=mask, other=0.0
    )
    up = tl.load(up_ptr + rows_i64 * up_row_stride + cols * up_col_stride, mask=mask, other=0.0)
    dout = dout.to(tl.float32)
    gate = gate.to(tl.float32)
    up = up.to(tl.float32)

    # Recompute silu rather than saving it: one less activation-sized tensor.
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dup = dout * silu
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(
        dgate_ptr + rows_i64 * dgate_row_stride + cols * dgate_col_stride,
        dgate.to(dgate_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        dup_ptr + rows_i64 * dup_row_stride + cols * dup_col_stride,
        dup.to(dup_ptr.dtype.element_ty),
        mask=mask,
    )


# Contiguous operands are viewed as rows of this width (when it divides their size): every
# tile is then full and unmasked, as in Inductor's flat pointwise kernels, whose speed
# (at the copy roof on an H100) the padded 2-D tiling of odd widths such as 11008 missed.
_FLAT_WIDTH = 1024
_FLAT_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": _FLAT_WIDTH}, num_warps=warps)
    for block_m in (1, 2, 4, 8)
    for warps in (4, 8)
]
_swiglu_fwd_flat = triton.autotune(_FLAT_CONFIGS, key=["n_rows"])(_swiglu_fwd_kernel)
_swiglu_bwd_flat = triton.autotune(_FLAT_CONFIGS, key=["n_rows"])(_swiglu_bwd_kernel)


def _flat_views(*tensors: Tensor) -> tuple[Tensor, ...] | None:
    """(numel / _FLAT_WIDTH, _FLAT_WIDTH) views of contiguous operands, or None."""
    numel = tensors[0].numel()
    if numel % _FLAT_WIDTH or not all(t.is_contiguous() for t in tensors):
        return None
    return tuple(t.view(numel // _FLAT_WIDTH, _FLAT_WIDTH) for t in tensors)


def _flat_launch(tuned, plain, n_rows: int):
    """The autotuned kernel and its grid; under the Triton interpreter (no device to time
    configs on) the plain kernel with the first config."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        config = _FLAT_CONFIGS[0]
        grid = (triton.cdiv(n_rows, config.kwargs["BLOCK_M"]), 1)
        return functools.partial(traceable(plain)[grid], **config.kwargs)
    return traceable(tuned)[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), 1)]


def _tile_settings(n_cols: int) -> tuple[int, int, int]:
    """Block shape (rows, columns) and warp count for the elementwise kernels.

    Wide rows are split into column blocks of `_MAX_BLOCK_N`; short rows are
    stacked so every program still moves about `_TILE_ELEMENTS` elements.
    """
    block_n = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_N)
    block_m = max(1, _TILE_ELEMENTS // block_n)
    return block_m, block_n, _NUM_WARPS


def _check_operand(name: str, t: Tensor, shape: tuple[int, int]) -> None:
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def swiglu_fwd(gate: Tensor, up: Tensor, out: Tensor | None = None) -> Tensor:
    """silu(gate) * up for 2-D `gate`, `up` (any strides).

    Writes into `out` when given (2-D, any strides, any float dtype); otherwise returns a new contiguous tensor of `gate.dtype`.
    """
    if gate.dim() != 2:
        raise ValueError(f"gate must be 2-D (M, N), got shape {tuple(gate.shape)}")
    shape = tuple(gate.shape)
    _check_operand("gate", gate, shape)
    _check_operand("up", up, shape)
    if out is None:
        out = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    else:
        _check_operand("out", out, shape)
    n_rows, n_cols = shape
    if n_rows == 0 or n_cols == 0:
        return out
    flat = _flat_views(gate, up, out)
    if flat is not None:
        rows = flat[0].shape[0]
        _flat_launch(_swiglu_fwd_flat, _swiglu_fwd_kernel, rows)(
            *flat, rows, _FLAT_WIDTH, _FLAT_WIDTH, _FLAT_WIDTH, _FLAT_WIDTH, 1, 1, 1
        )
        return out

    block_m, block_n, num_warps = _tile_settings(n_cols)
    # Row blocks on grid axis 0, whose limit (2**31 - 1) is far larger than
    # axis 1's (65535), which only has to count column blocks.
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    traceable(_swiglu_fwd_kernel)[grid](
        gate,
        up,
        out,
        n_rows,
        n_cols,
        gate.stride(0),
        up.stride(0),
        out.stride(0),
        gate.stride(1),
        up.stride(1),
        out.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out


def swiglu_bwd(
    dout: Tensor,
    gate: Tensor,
    up: Tensor,
    dgate: Tensor | None = None,
    dup: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of `swiglu_fwd` with respect to `gate` and `up`.

    All tensors are 2-D (M, N) with any strides.
    `dgate`/`dup` may be given as views to write into (e.g. the two halves of
    one (M, 2N) buffer); those not given are allocated contiguous in
    `gate.dtype` / `up.dtype`.
    """
    if gate.dim() != 2:
        raise ValueError(f"gate must be 2-D (M, N), got shape {tuple(gate.shape)}")
    shape = tuple(gate.shape)
    _check_operand("dout", dout, shape)
    _check_operand("gate", gate, shape)
    _check_operand("up", up, shape)
    if dgate is None:
        dgate = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    else:
        _check_operand("dgate", dgate, shape)
    if dup is None:
        dup = torch.empty(shape, dtype=up.dtype, device=up.device)
    else:
        _check_operand("dup", dup, shape)
    n_rows, n_cols = shape
    if n_rows == 0 or n_cols == 0:
        return dgate, dup
    flat = _flat_views(dout, gate, up, dgate, dup)
    if flat is not None:
        rows = flat[0].shape[0]
        _flat_launch(_swiglu_bwd_flat, _swiglu_bwd_kernel, rows)(
            *flat, rows, _FLAT_WIDTH, *([_FLAT_WIDTH] * 5), *([1] * 5)
        )
        return dgate, dup

    block_m, block_n, num_warps = _tile_settings(n_cols)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    traceable(_swiglu_bwd_kernel)[grid](
        dout,
        gate,
        up,
        dgate,
        dup,
        n_rows,
        n_cols,
        dout.stride(0),
        gate.stride(0),
        up.stride(0),
        dgate.stride(0),
        dup.stride(0),
        dout.stride(1),
        gate.stride(1),
        up.stride(1),
        dgate.stride(1),
        dup.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dgate, dup


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """Naive, differentiable silu(gate) * up in `gate.dtype`.

    Computes in float32, or in float64 when given float64 inputs (tests use
    that as the high-precision reference).
    """
    compute_dtype = torch.promote_types(gate.dtype, torch.float32)
    out = F.silu(gate.to(compute_dtype)) * up.to(compute_dtype)
    return out.to(gate.dtype)
