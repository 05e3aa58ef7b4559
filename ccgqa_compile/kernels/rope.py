"""Rotary position embedding (RoPE) forward and backward as Triton kernels.

The kernels apply RoPE elementwise with explicit full-width ``cos``/``sin``
tables, so they are exact for *any* table values (not only the usual
duplicated-frequency tables):

    out[..., :R] = x[..., :R] * cos + rot(x[..., :R]) * sin
    out[..., R:] = x[..., R:]

with ``R = rotary_dim`` and ``rot`` one of two layouts:

* rotate-half (HF Llama / GPT-NeoX): ``rot(x)[i] = -x[i + R/2]`` for
  ``i < R/2`` and ``x[i - R/2]`` otherwise;
* interleaved (GPT-J / Meta complex): ``rot(x)[2j] = -x[2j + 1]`` and
  ``rot(x)[2j + 1] = x[2j]``.

Both layouts pair element ``a`` with element ``b`` (``(i, i + R/2)`` or
``(2j, 2j + 1)``), and within a pair the map is

    out_a = x_a * cos_a - x_b * sin_a
    out_b = x_b * cos_b + x_a * sin_b

Its vector-Jacobian product w.r.t. ``x`` (``dx = dy * cos + rot^T(dy * sin)``)
is, per pair,

    dx_a = dy_a * cos_a + dy_b * sin_b
    dx_b = dy_b * cos_b - dy_a * sin_a

which is the forward map with ``(sin_a, sin_b)`` replaced by
``(-sin_b, -sin_a)``. One kernel therefore serves both directions, switched by
a compile-time flag.

Launch layout: a program owns a ``(BLOCK_T, BLOCK_H)`` tile of rows of one
batch element, so each ``cos``/``sin`` row is loaded once and reused for all
heads of the tile (the tables are usually broadcast over heads). The inputs
may be arbitrary strided views (for example HF's
``q.view(B, T, H, D).transpose(1, 2)``) as long as the last dimension is
contiguous; nothing is copied. The output is always a fresh contiguous
``(B, H, T, D)`` tensor.

The wrappers launch through ``torch.library.wrap_triton`` so they can be
called from ``torch.library.triton_op`` bodies that Inductor traces. Autograd
is wired up elsewhere; ``rope_reference`` is the naive (differentiable) PyTorch
definition used for testing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import traceable

__all__ = ["rope_bwd", "rope_fwd", "rope_reference"]

# Target number of x elements per program: large enough to keep many 16-byte
# loads in flight per thread, small enough to avoid register spills with the
# fp32 intermediates (x, cos, sin, out for two halves). Swept on an H100 with
# q = (4, 32, 4096, 128) bf16 (2048..16384 elements, 256..2048 per warp):
# 4096 / 1024 was best or tied, ~2.78 TB/s against 2.97 TB/s for a plain copy.
_ELEMENTS_PER_PROGRAM = 4096
# One warp per this many tile elements (capped at 16 warps): 32 elements per
# thread, i.e. a few 16-byte vectors of each pair half.
_ELEMENTS_PER_WARP = 1024


@triton.jit
def _load_rotary_pairs(
    ptr,
    row_offsets,
    row_mask,
    HALF_ROTARY_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Load the rotary part of a tile of rows as its two pair halves.

    ``row_offsets``/``row_mask`` are 2-D ``[rows_t, rows_h]``; the result is
    two ``[rows_t, rows_h, BLOCK_HALF]`` tensors holding elements ``a`` and
    ``b`` of every rotation pair, padded with zeros past ``HALF_ROTARY_DIM``.
    """
    if INTERLEAVED:
        # Load the contiguous span [0, R) in one go so the load vectorizes,
        # then de-interleave in registers: (..., 2 * BLOCK_HALF) viewed as
        # (..., BLOCK_HALF, 2) and split along the last axis. Padding sits at
        # the end of the span, so the pairs stay aligned for any even R.
        cols = tl.arange(0, 2 * BLOCK_HALF)
        offsets = row_offsets[:, :, None] + cols[None, None, :]
        mask = row_mask[:, :, None] & (cols < 2 * HALF_ROTARY_DIM)[None, None, :]
        values = tl.load(ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        values = tl.reshape(values, (values.shape[0], values.shape[1], BLOCK_HALF, 2))
        first, second = tl.split(values)
    else:
        # Rotate-half pairs are two contiguous halves; two loads keep each
        # one contiguous (R/2 is a constexpr, so alignment is known).
        cols = tl.arange(0, BLOCK_HALF)
        offsets = row_offsets[:, :, None] + cols[None, None, :]
        mask = row_mask[:, :, None] & (cols < HALF_ROTARY_DIM)[None, None, :]
        first = tl.load(ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        second = tl.load(ptr + offsets + HALF_ROTARY_DIM, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    return first, second


@triton.jit
def _store_rotary_pairs(
    ptr,
    row_offsets,
    row_mask,
    first,
    second,
    HALF_ROTARY_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Inverse of ``_load_rotary_pairs``: write both pair halves back."""
    out_dtype = ptr.dtype.element_ty
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)
        offsets = row_offsets[:, :, None] + cols[None, None, :]
        mask = row_mask[:, :, None] & (cols < 2 * HALF_ROTARY_DIM)[None, None, :]
        values = tl.join(first, second)
        values = tl.reshape(values, (values.shape[0], values.shape[1], 2 * BLOCK_HALF))
        tl.store(ptr + offsets, values.to(out_dtype), mask=mask)
    else:
        cols = tl.arange(0, BLOCK_HALF)
        offsets = row_offsets[:, :, None] + cols[None, None, :]
        mask = row_mask[:, :, None] & (cols < HALF_ROTARY_DIM)[None, None, :]
        tl.store(ptr + offsets, first.to(out_dtype), mask=mask)
        tl.store(ptr + offsets + HALF_ROTARY_DIM, second.to(out_dtype), mask=mask)


@triton.jit
def _rope_kernel(
    src_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    num_heads,
    seq_len,
    src_stride_b,
    src_stride_h,
    src_stride_t,
    cos_stride_b,
    cos_stride_h,
    cos_stride_t,
    sin_stride_b,
    sin_stride_h,
    sin_stride_t,
    out_stride_b,
    out_stride_h,
    out_stride_t,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BACKWARD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TABLE_BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    """RoPE (or its VJP when ``BACKWARD``) on a (BLOCK_T, BLOCK_H) row tile.

    Grid: axis 0 = batch * cdiv(seq_len, BLOCK_T) (axis 0 allows 2^31 - 1
    programs, so large B*T never overflows the grid), axis 1 = head blocks.
    ``TABLE_BLOCK_H`` is 1 when cos/sin are broadcast over heads (load one
    table row per time step) and ``BLOCK_H`` when they differ per head.
    """
    HALF_ROTARY_DIM: tl.constexpr = ROTARY_DIM // 2
    num_t_blocks = tl.cdiv(seq_len, BLOCK_T)
    pid_bt = tl.program_id(0)
    pid_h = tl.program_id(1)
    # int64 row offsets: B*H*T*D can exceed 2^31 for long sequences.
    batch = (pid_bt // num_t_blocks).to(tl.int64)
    t_idx = ((pid_bt % num_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    h_idx = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    table_h_idx = (pid_h * BLOCK_H + tl.arange(0, TABLE_BLOCK_H)).to(tl.int64)

    t_mask = t_idx < seq_len
    row_mask = t_mask[:, None] & (h_idx < num_heads)[None, :]
    table_mask = t_mask[:, None] & (table_h_idx < num_heads)[None, :]

    src_rows = batch * src_stride_b + t_idx[:, None] * src_stride_t + h_idx[None, :] * src_stride_h
    # The output has a unit last stride (contiguous, or laid out like the backward's x)
    out_rows = batch * out_stride_b + t_idx[:, None] * out_stride_t + h_idx[None, :] * out_stride_h
    cos_rows = (
        batch * cos_stride_b + t_idx[:, None] * cos_stride_t + table_h_idx[None, :] * cos_stride_h
    )
    sin_rows = (
        batch * sin_stride_b + t_idx[:, None] * sin_stride_t + table_h_idx[None, :] * sin_stride_h
    )

    cos_a, cos_b = _load_rotary_pairs(
        cos_ptr, cos_rows, table_mask, HALF_ROTARY_DIM, BLOCK_HALF, INTERLEAVED, COMPUTE_DTYPE
    )
    sin_a, sin_b = _load_rotary_pairs(
        sin_ptr, sin_rows, table_mask, HALF_ROTARY_DIM, BLOCK_HALF, INTERLEAVED, COMPUTE_DTYPE
    )
    if BACKWARD:
        # VJP: rot^T = -rot and sin multiplies before the transposed
        # rotation, which amounts to swapping and negating the sin pair.
        sin_a, sin_b = -sin_b, -sin_a
    x_a, x_b = _load_rotary_pairs(
        src_ptr, src_rows, row_mask, HALF_ROTARY_DIM, BLOCK_HALF, INTERLEAVED, COMPUTE_DTYPE
    )

    out_a = x_a * cos_a - x_b * sin_a
    out_b = x_b * cos_b + x_a * sin_b
    _store_rotary_pairs(
        out_ptr, out_rows, row_mask, out_a, out_b, HALF_ROTARY_DIM, BLOCK_HALF, INTERLEAVED
    )

    if HEAD_DIM > ROTARY_DIM:
        # Partial rotary: dims >= R are copied bit-exactly (no dtype round
        # trip), which is the identity in both directions.
        pass_cols = tl.arange(0, BLOCK_PASS)
        pass_mask = row_mask[:, :, None] & (pass_cols < HEAD_DIM - ROTARY_DIM)[None, None, :]
        passthrough = tl.load(
            src_ptr + src_rows[:, :, None] + ROTARY_DIM + pass_cols[None, None, :],
            mask=pass_mask,
        )
        tl.store(
            out_ptr + out_rows[:, :, None] + ROTARY_DIM + pass_cols[None, None, :],
            passthrough,
            mask=pass_mask,
        )


def _check_rope_inputs(src: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, name: str) -> None:
    if src.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(src.shape)}")
    if not src.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {src.dtype}")
    head_dim = src.shape[-1]
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"rotary_dim must be even and in [2, head_dim={head_dim}], got {rotary_dim}"
        )
    for table_name, table in (("cos", cos), ("sin", sin)):
        if table.shape[-1] != rotary_dim:
            raise ValueError(
                f"{table_name} last dim must equal rotary_dim={rotary_dim}, "
                f"got shape {tuple(table.shape)}"
            )
        if not table.is_floating_point():
            raise TypeError(f"{table_name} must be a floating tensor, got {table.dtype}")
        if table.device != src.device:
            raise ValueError(f"{table_name} is on {table.device} but {name} is on {src.device}")


def _floor_power_of_2(n: int) -> int:
    """Largest power of two <= n (1 for n < 1): tl.arange sizes must be powers of 2."""
    return 1 << (max(n, 1).bit_length() - 1)


def _prepare_table(table: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """Broadcast a cos/sin table to (B, H, T, R) as a view (stride 0 where
    broadcast); only a non-unit last stride forces a copy."""
    table = table.expand(shape)
    if table.stride(-1) != 1:
        table = table.contiguous()
    return table


def _launch_rope(
    src: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int,
    interleaved: bool,
    backward: bool,
    out: Tensor | None = None,
) -> Tensor:
    batch, num_heads, seq_len, head_dim = src.shape
    if src.stride(-1) != 1:
        # The contract promises a unit last stride; fall back rather than
        # compute garbage if a caller breaks it.
        src = src.contiguous()
    table_shape = (batch, num_heads, seq_len, rotary_dim)
    cos = _prepare_table(cos, table_shape)
    sin = _prepare_table(sin, table_shape)

    if out is None:
        out = torch.empty_like(src, memory_format=torch.contiguous_format)
    elif out.shape != src.shape or out.dtype != src.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"rope out must be {tuple(src.shape)} {src.dtype} with a unit last stride; "
            f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    if out.numel() == 0:
        return out

    block_half = triton.next_power_of_2(rotary_dim // 2)
    pass_dim = head_dim - rotary_dim
    block_pass = triton.next_power_of_2(pass_dim) if pass_dim > 0 else 1
    padded_row = 2 * block_half + (block_pass if pass_dim > 0 else 0)
    # Spend the per-program budget on heads first (they share the cos/sin
    # row), then on time steps. The tile shape depends only on H and D, never
    # on T, so dynamic sequence lengths do not recompile the kernel.
    block_h = min(
        triton.next_power_of_2(num_heads),
        _floor_power_of_2(_ELEMENTS_PER_PROGRAM // padded_row),
    )
    block_t = _floor_power_of_2(_ELEMENTS_PER_PROGRAM // (block_h * padded_row))
    tables_per_head = num_heads > 1 and (cos.stride(1) != 0 or sin.stride(1) != 0)
    compute_dtype = tl.float64 if src.dtype == torch.float64 else tl.float32
    tile_elements = block_t * block_h * padded_row
    num_warps = _floor_power_of_2(min(tile_elements // _ELEMENTS_PER_WARP, 16))

    grid = (batch * triton.cdiv(seq_len, block_t), triton.cdiv(num_heads, block_h))
    traceable(_rope_kernel)[grid](
        src,
        cos,
        sin,
        out,
        num_heads,
        seq_len,
        src.stride(0),
        src.stride(1),
        src.stride(2),
        cos.stride(0),
        cos.stride(1),
        cos.stride(2),
        sin.stride(0),
        sin.stride(1),
        sin.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        HEAD_DIM=head_dim,
        ROTARY_DIM=rotary_dim,
        INTERLEAVED=interleaved,
        BACKWARD=backward,
        COMPUTE_DTYPE=compute_dtype,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        TABLE_BLOCK_H=block_h if tables_per_head else 1,
        BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass,
        num_warps=num_warps,
    )
    return out


def rope_fwd(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool) -> Tensor:
    """Apply rotary embedding to ``x`` of shape (B, H, T, D).

    ``cos``/``sin`` have last dim ``rotary_dim`` and broadcast to
    (B, H, T, rotary_dim) (normally already ``expand``-ed views). ``x`` may be
    any strided view with a unit last stride. Computes in fp32 (fp64 for fp64
    ``x``) and returns a new contiguous tensor of ``x.dtype``.
    """
    _check_rope_inputs(x, cos, sin, rotary_dim, "x")
    return _launch_rope(x, cos, sin, rotary_dim, interleaved, backward=False)


def rope_bwd(
    dy: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int,
    interleaved: bool,
    out: Tensor | None = None,
) -> Tensor:
    """Gradient of ``rope_fwd`` w.r.t. ``x`` given the output gradient ``dy``.

    ``dx[..., :R] = dy * cos + rot^T(dy * sin)`` and ``dx[..., R:] =
    dy[..., R:]``; cos/sin receive no gradient. Same input contract as
    ``rope_fwd``; returns a new contiguous tensor of ``dy.dtype``, or writes ``out`` (dy's
    shape and dtype, unit last stride, any other strides: x's layout, so that autograd
    and the projection's backward need no copy).
    """
    _check_rope_inputs(dy, cos, sin, rotary_dim, "dy")
    return _launch_rope(dy, cos, sin, rotary_dim, interleaved, backward=True, out=out)


def rope_reference(
    x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool
) -> Tensor:
    """Naive PyTorch RoPE, differentiable w.r.t. ``x``; the spec for the kernels.

    Computes in at least fp32 (like the kernels) and returns ``x.dtype``.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x_rot = x[..., :rotary_dim].to(compute_dtype)
    x_pass = x[..., rotary_dim:]
    if interleaved:
        x_even, x_odd = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((-x_odd, x_even), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out_rot = x_rot * cos.to(compute_dtype) + rotated * sin.to(compute_dtype)
    return torch.cat((out_rot.to(x.dtype), x_pass), dim=-1)
