"""RMSNorm forward and backward as Triton kernels, plus a naive PyTorch reference.

Layout: one Triton kernel per direction, a thin launch wrapper for each, and
`rms_norm_reference` beside them.  Autograd lives elsewhere; the wrappers are
meant to be called from inside `torch.library.triton_op` bodies, so every launch
goes through `torch.library.wrap_triton` to stay traceable by Inductor.

All arithmetic is done in float32 whatever the storage dtypes are:

    rstd = 1 / sqrt(mean(x^2, -1) + eps)
    y    = x * rstd * (weight_offset + weight)            (no multiply if weight is None)
    dx   = rstd * (g - x_hat * mean(g * x_hat, -1))
    dw   = sum over rows of dy * x_hat
    with x_hat = x * rstd and g = dy * (weight_offset + weight).

With ``clamp`` the norm is clamped from below instead (``F.normalize(x) * sqrt(N)``,
``x / max(rms, eps)``): rstd = 1 / max(sqrt(mean(x^2)), eps), and where the clamp binds
rstd is a constant, dx = rstd * g. The forward stores such a row's rstd negated, which
tells the backward (and the magnitude is the rstd).
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import traceable

# A whole row is held in registers as float32; past this the kernels would spill
# heavily (the same limit Liger-Kernel uses).
MAX_FUSED_COLUMNS = 65536

# Short rows are packed several to a program so that small hidden sizes still
# give each program a few thousand elements to move.
_TARGET_TILE_ELEMENTS = 4096
_MAX_ROWS_PER_TILE = 64

# Backward programs loop over row tiles; this many per SM keeps the loads of a
# few programs in flight on each SM while keeping the dw partial-sum buffer small.
_BWD_PROGRAMS_PER_SM = 2
# Program count used when the tensors are not on a GPU (Triton interpreter):
# small, so that each program loops over several row tiles even in tiny tests.
_BWD_PROGRAMS_WITHOUT_GPU = 2


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    weight_ptr,
    y_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    y_row_stride,
    eps,
    eps_ptr,
    weight_offset,
    HAS_WEIGHT: tl.constexpr,
    HAS_EPS_TENSOR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CLAMP: tl.constexpr = False,
):
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    eps = tl.cast(eps, tl.float32)
    if HAS_EPS_TENSOR:  # eps known only when the program runs (a float lifted to an input)
        eps += tl.load(eps_ptr).to(tl.float32)
    weight_offset = tl.cast(weight_offset, tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    # int64 row offsets: M * row_stride can exceed 2**31 for large activations.
    rows_i64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows_i64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    # Masked columns load as 0, so they add nothing to the sum of squares.
    mean_square = tl.sum(x * x, axis=1) / n_cols
    if CLAMP:
        rms = tl.sqrt(mean_square)
        rstd = 1.0 / tl.maximum(rms, eps)
        stored = tl.where(rms < eps, -rstd, rstd)
    else:
        rstd = tl.rsqrt(mean_square + eps)
        stored = rstd
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * (weight_offset + weight)[None, :]

    tl.store(
        y_ptr + rows_i64[:, None] * y_row_stride + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(rstd_ptr + rows, stored, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    dy_row_stride,
    x_row_stride,
    dx_row_stride,
    weight_offset,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    weight_offset = tl.cast(weight_offset, tl.float32)  # fp64 when Inductor inlines the launch
    # Persistent grid: each program walks row tiles pid, pid + P, ... and keeps
    # its share of dw in registers, so dw costs one (P, N) float32 store in total
    # instead of a store (or an atomic) per row.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols

    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        effective_weight = weight_offset + weight
        dw_accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    num_row_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, num_row_tiles, num_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows_i64 = rows.to(tl.int64)

        # Out-of-range rows and columns load as 0 and so contribute 0 to the
        # row reduction and to dw.
        dy = tl.load(
            dy_ptr + rows_i64[:, None] * dy_row_stride + cols[None, :],
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        x = tl.load(
            x_ptr + rows_i64[:, None] * x_row_stride + cols[None, :],
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        clamped = rstd < 0  # a norm clamped from below: rstd does not depend on x there
        rstd = tl.abs(rstd)

        x_hat = x * rstd[:, None]
        if HAS_WEIGHT:
            grad_x_hat = dy * effective_weight[None, :]
            dw_accumulator += dy * x_hat
        else:
            grad_x_hat = dy
        mean_grad_dot_x_hat = tl.where(clamped, 0.0, tl.sum(grad_x_hat * x_hat, axis=1) / n_cols)
        dx = (grad_x_hat - x_hat * mean_grad_dot_x_hat[:, None]) * rstd[:, None]
        tl.store(
            dx_ptr + rows_i64[:, None] * dx_row_stride + cols[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=mask,
        )

    if HAS_WEIGHT:
        # Every program writes its row of the partial buffer, even one that got
        # no tiles (it writes zeros), so the buffer needs no zero-fill.
        tl.store(
            dw_partial_ptr + pid * n_cols + cols,
            tl.sum(dw_accumulator, axis=0),
            mask=col_mask,
        )


def _tile_settings(n_cols: int) -> tuple[int, int, int]:
    """Block shape (rows, columns) and warp count for a row-wise kernel.

    Like Liger-Kernel's `calculate_settings`: a whole row in one block, warps
    scaled with the elements per block so each thread holds a few 16-byte vectors.
    """
    if n_cols > MAX_FUSED_COLUMNS:
        raise ValueError(
            f"rms_norm kernels hold a whole row in registers; n_cols={n_cols} "
            f"exceeds the supported maximum of {MAX_FUSED_COLUMNS}"
        )
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(_MAX_ROWS_PER_TILE, _TARGET_TILE_ELEMENTS // block_n))
    tile_elements = block_m * block_n
    if tile_elements >= 32768:
        num_warps = 32
    elif tile_elements >= 8192:
        num_warps = 16
    elif tile_elements >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return block_m, block_n, num_warps


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_program_count(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _BWD_PROGRAMS_PER_SM * _multiprocessor_count(index)
    return _BWD_PROGRAMS_WITHOUT_GPU


def _check_row_major(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (M, N), got shape {tuple(t.shape)}")
    # A single column has no meaningful column stride.
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {t.stride()}")


def _check_weight(weight: Tensor | None, n_cols: int) -> None:
    if weight is None:
        return
    if weight.shape != (n_cols,):
        raise ValueError(f"weight must have shape ({n_cols},), got {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")


def rms_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    weight_offset: float,
    out_dtype: torch.dtype,
    eps_tensor: Tensor | None = None,
    clamp: bool = False,
) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim of a 2-D `x` (unit column stride, any row stride), with
    eps + ``eps_tensor`` (one fp32 value on x's device) when that is given; ``clamp``:
    the norm clamped from below by eps instead (the rstd of a clamped row negated).

    Returns `y` (M, N) contiguous in `out_dtype` and `rstd` (M,) float32, the
    latter saved for `rms_norm_bwd`.
    """
    _check_row_major("x", x)
    n_rows, n_cols = x.shape
    if n_cols == 0:
        raise ValueError("rms_norm needs at least one column")
    _check_weight(weight, n_cols)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd

    block_m, block_n, num_warps = _tile_settings(n_cols)
    grid = (triton.cdiv(n_rows, block_m),)
    traceable(_rms_norm_fwd_kernel)[grid](
        x,
        weight if weight is not None else x,  # dummy pointer, never read
        y,
        rstd,
        n_rows,
        n_cols,
        x.stride(0),
        y.stride(0),
        float(eps),
        eps_tensor if eps_tensor is not None else rstd,  # dummy pointer, never read
        float(weight_offset),
        HAS_WEIGHT=weight is not None,
        HAS_EPS_TENSOR=eps_tensor is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CLAMP=bool(clamp),
        num_warps=num_warps,
    )
    return y, rstd


def rms_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    rstd: Tensor,
    weight_offset: float,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of `rms_norm_fwd` with respect to `x` and `weight`.

    `dy` and `x` are 2-D with unit column stride (any row stride, any float
    dtypes); `rstd` is the float32 (M,) tensor from the forward.  Returns `dx`
    (M, N) contiguous in `x.dtype` and `dw` (N,) in `weight.dtype`, or None when
    there is no weight.
    """
    _check_row_major("x", x)
    _check_row_major("dy", dy)
    n_rows, n_cols = x.shape
    if n_cols == 0:
        raise ValueError("rms_norm needs at least one column")
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    if rstd.shape != (n_rows,) or rstd.dtype != torch.float32:
        raise ValueError(f"rstd must be float32 of shape ({n_rows},)")
    _check_weight(weight, n_cols)
    rstd = rstd.contiguous()

    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        dw = torch.zeros_like(weight) if weight is not None else None
        return dx, dw

    block_m, block_n, num_warps = _tile_settings(n_cols)
    num_programs = _bwd_program_count(x.device)
    if isinstance(n_rows, int):
        # With a concrete row count, do not launch programs that get no tile
        # (under dynamic-shape tracing n_rows is symbolic; keep the fixed count
        # rather than guard on it).
        num_programs = min(num_programs, triton.cdiv(n_rows, block_m))
    # One float32 row of partial dw sums per program, reduced by torch below:
    # deterministic, and exact up to float32 summation order.
    dw_partial = (
        torch.empty((num_programs, n_cols), dtype=torch.float32, device=x.device)
        if weight is not None
        else dx  # dummy pointer, never written (dx, so no input looks mutated)
    )
    traceable(_rms_norm_bwd_kernel)[(num_programs,)](
        dy,
        x,
        weight if weight is not None else x,  # dummy pointer, never read
        rstd,
        dx,
        dw_partial,
        n_rows,
        n_cols,
        dy.stride(0),
        x.stride(0),
        dx.stride(0),
        float(weight_offset),
        HAS_WEIGHT=weight is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    dw = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    return dx, dw


def rms_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    weight_offset: float,
    out_dtype: torch.dtype,
    clamp: bool = False,
) -> Tensor:
    """Naive, differentiable RMSNorm with the kernels' semantics.

    Computes in float32, or in float64 when given float64 inputs (tests use
    that as the high-precision reference).
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x_compute = x.to(compute_dtype)
    if clamp:  # (the norm's gradient at a row of zeros is 0, sqrt's is not defined)
        rms = torch.linalg.vector_norm(x_compute, dim=-1, keepdim=True) / x.shape[-1] ** 0.5
        rstd = 1 / rms.clamp_min(eps)
    else:
        rstd = torch.rsqrt(x_compute.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = x_compute * rstd
    if weight is not None:
        y = y * (weight_offset + weight.to(compute_dtype))
    return y.to(out_dtype)
