"""The original project's CCGQA q/k prologue (the seed variant) in Triton, plus a naive reference.

From the pre-conv projections ``q_pre`` (B, T, Hq*D) and ``k_pre`` (B, T, Hkv*D) to the
rotated ``q`` (B, Hq, T, D) and ``k`` (B, Hkv, T, D), as patterns/ccgqa.py
``CCGQAAttentionSeed`` computes them (../../../shared/design/ccgqa.md, "The original
project's variant"), per batch and time step::

    y1    = conv1(pad(x))     grouped per head (a D x D map per tap), kernel K1, causal
    y2    = conv2(pad(y1))    dense across the stream's heads (a C x C map per tap), K2
    raw_q = y2_q + (mean over ALL kv heads of k_pre) / 2
    raw_k = y2_k + (mean over ALL query heads of q_pre) / 2
    u     = raw / max(|raw|, eps)                  per head; no sqrt(D)
    k     = u_k * temp                             one scalar temperature (or none)
    out   = out * cos + rot(out) * sin             full RoPE: interleaved pairs (the seed's)
                                                   or rotate-half

No biases (the seed has none). Both convolutions pad with zeros on the left, separately.

Why its own kernels: the stock prologue (kernels/ccgqa_prologue.py) gives each program one
group of G + 1 heads, which is all its per-head conv2 and per-group mean couple. Here the
dense conv2 couples every head of a stream, so a program holds a stream's whole width
C = H*D (padded to a power of two, ``CP``): conv1 is one (BLOCK_T x C) @ (C x C)
``tl.dot`` per tap with the block-diagonal weight built by a masked load (H times the
FLOPs of per-head products), conv2 one dense dot per tap. Per-head sums (the norms) and
sums over heads (the means) are reshapes to (BLOCK_T, H, D) in registers.

Launches, each one per stream (q: x = q_pre, other = k_pre; k the other way round; both
streams in one program faulted on the H100), one program per (batch, BLOCK_T time steps):
  * forward: x's conv chain plus half the mean over the other stream's heads, the norm,
    the temperature (k) and RoPE; the conv halo as shifted tile loads (L1/L2 hits);
  * backward, three kernels, nothing of the forward stored:
      1. ``_seed_draw_kernel`` (laid out as the forward) recomputes raw and stores
         d loss / d raw (float32, (B, T, C)) and, for k, the temperature's partial sums,
         one per program;
      2. ``_seed_dx_kernel`` (laid out as the forward) takes the convs' transposes from
         d raw: d y1 at the K1 rows each output row needs (K1 * K2 dots), d x plus the
         share of the other stream's mean;
      3. ``_seed_dw2_kernel`` and ``_seed_dw1_kernel``, one program per (chunk of tiles,
         tap): that tap's weight gradient summed over the chunk in registers, stored once
         per chunk; the launcher adds the chunks' partials (float32 atomics per tile
         were 1.7 ms on the H100).

Whether training graphs use them is a policy (``config.SEED_PROLOGUE_IN_TRAINING``,
measured on the H100: docs/benchmarks/).

Kernel limits: D a power of two, C <= ``MAX_KERNEL_WIDTH`` per stream, K1, K2 in 1..4, tables
that differ at most per batch and time. Everything else goes to the composite of the one
prologue op (ops/ccgqa_prologue.py, ``qk_mean="all"`` with these convs).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import traceable
from .ccgqa_prologue import _rotate, _rotate_reference, _tables, _unit_last_stride

__all__ = [
    "ccgqa_seed_prologue_bwd",
    "ccgqa_seed_prologue_fwd",
    "ccgqa_seed_prologue_reference",
    "padded_width",
]

MAX_CONV_KERNEL = 4
# One program holds a (BLOCK_T x C) fp32 tile of a whole stream, and conv2's (C x C) taps
# are dot operands in shared memory: a 128 x 128 tap is 32 KB in half precision (the seed
# at E = 512, C = 4 has 128 query and 32 key channels). Wider streams would need conv2's
# output channels tiled; they go to the composite (and the pass leaves them to Inductor).
MAX_KERNEL_WIDTH = 128


# ----------------------------------------------------------------------------
# Naive reference (the spec the kernels are tested against; differentiable).
# ----------------------------------------------------------------------------


def ccgqa_seed_prologue_reference(
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
    eps: float = 1e-12,
    interleaved: bool = True,
) -> tuple[Tensor, Tensor]:
    """Naive PyTorch, written the way ``CCGQAAttentionSeed.forward`` writes it.

    Computes in at least fp32 (fp64 stays fp64) and returns ``q_pre.dtype``; cos/sin
    broadcast to (B, 1, T, D).
    """
    acc = torch.promote_types(q_pre.dtype, torch.float32)
    b, t, e_q = q_pre.shape
    d = e_q // heads

    def conv(x, w1, w2, n_heads):
        y = x.to(acc).transpose(1, 2)
        y = F.conv1d(F.pad(y, (w1.shape[-1] - 1, 0)), w1.to(acc), groups=n_heads)
        y = F.conv1d(F.pad(y, (w2.shape[-1] - 1, 0)), w2.to(acc))
        return y.transpose(1, 2).reshape(b, t, n_heads, d)

    q = conv(q_pre, q_conv1_weight, q_conv2_weight, heads)
    k = conv(k_pre, k_conv1_weight, k_conv2_weight, kv_heads)
    q_heads = q_pre.to(acc).reshape(b, t, heads, d)
    k_heads = k_pre.to(acc).reshape(b, t, kv_heads, d)
    q = q + 0.5 * k_heads.mean(dim=2, keepdim=True)
    k = k + 0.5 * q_heads.mean(dim=2, keepdim=True)
    q = F.normalize(q, dim=-1, eps=eps)
    k = F.normalize(k, dim=-1, eps=eps)
    if temp is not None:
        k = k * temp.to(acc).reshape(())
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    c, s = cos.to(acc), sin.to(acc)
    q = q * c + _rotate_reference(q, interleaved) * s
    k = k * c + _rotate_reference(k, interleaved) * s
    return q.to(q_pre.dtype), k.to(k_pre.dtype)


def padded_width(width: int) -> int:
    """Tile width of a stream: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(width))


# ----------------------------------------------------------------------------
# Tile helpers. A tile is (BLOCK_T rows = time steps, CP columns = a stream's channels,
# head h at columns h*D .. h*D + D - 1; columns >= C are padding and stay 0 where read).
# ----------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, row0, stride_t, rows, seq_len, WIDTH: tl.constexpr, CP: tl.constexpr):
    """x[b, rows, :WIDTH] in its own dtype; rows outside [0, seq_len) and padding read 0."""
    cols = tl.arange(0, CP)
    mask = ((rows >= 0) & (rows < seq_len))[:, None] & (cols < WIDTH)[None, :]
    offsets = row0 + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _conv1_tap(
    w1_ptr,
    TAP,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    CP: tl.constexpr,
    IN_BY_OUT: tl.constexpr,
):
    """conv1's tap TAP (weight (C, D, K1), grouped per head) as a block-diagonal (CP x CP)
    matrix: [in, out] when IN_BY_OUT (for x @ W), else [out, in]."""
    first = tl.arange(0, CP)[:, None]
    second = tl.arange(0, CP)[None, :]
    if IN_BY_OUT:
        inp, out = first, second
    else:
        out, inp = first, second
    mask = (inp // HEAD_DIM == out // HEAD_DIM) & (out < WIDTH) & (inp < WIDTH)
    offsets = out * (HEAD_DIM * K1) + (inp % HEAD_DIM) * K1 + TAP
    return tl.load(w1_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _conv2_tap(
    w2_ptr,
    TAP,
    WIDTH: tl.constexpr,
    K2: tl.constexpr,
    CP: tl.constexpr,
    IN_BY_OUT: tl.constexpr,
):
    """conv2's tap TAP (weight (C, C, K2), dense) as a (CP x CP) matrix, [in, out] when
    IN_BY_OUT, else [out, in]."""
    first = tl.arange(0, CP)[:, None]
    second = tl.arange(0, CP)[None, :]
    if IN_BY_OUT:
        inp, out = first, second
    else:
        out, inp = first, second
    mask = (out < WIDTH) & (inp < WIDTH)
    return tl.load(w2_ptr + out * (WIDTH * K2) + inp * K2 + TAP, mask=mask, other=0.0)


@triton.jit
def _conv1_rows(
    x_ptr,
    row0,
    stride_t,
    rows,
    seq_len,
    w1_ptr,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """conv1 at ``rows`` (0 at rows < 0: no bias, so conv2's zero padding comes for free),
    rounded to the input dtype as eager's conv1 output is; returned as fp32. The taps are a
    runtime loop, so one tap's (C x C) operand is in shared memory at a time: unrolled,
    the float32 weight-gradient kernel needed 400 KB (tf32x3 keeps two halves of each
    operand) and the bf16 forward 160 KB (now 48 KB: more programs per SM)."""
    y1 = tl.zeros((BLOCK_T, CP), dtype=tl.float32)
    for s1 in range(K1):
        x = _load_tile(x_ptr, row0, stride_t, rows - s1, seq_len, WIDTH, CP)
        w1 = _conv1_tap(w1_ptr, K1 - 1 - s1, WIDTH, HEAD_DIM, K1, CP, True)
        y1 += tl.dot(x, w1.to(x.dtype), input_precision=DOT_PRECISION)
    return y1.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _conv_chain(
    x_ptr,
    row0,
    stride_t,
    rows,
    seq_len,
    w1_ptr,
    w2_ptr,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """conv2(pad(conv1(pad(x)))) at ``rows``: a (BLOCK_T, CP) fp32 tile. conv1 is
    recomputed at each of conv2's K2 shifts (cheap dots on cached rows)."""
    dtype = x_ptr.dtype.element_ty
    y2 = tl.zeros((BLOCK_T, CP), dtype=tl.float32)
    for s2 in range(K2):
        y1 = _conv1_rows(
            x_ptr, row0, stride_t, rows - s2, seq_len, w1_ptr,
            WIDTH, HEAD_DIM, K1, CP, BLOCK_T, DOT_PRECISION,
        )  # fmt: skip
        w2 = _conv2_tap(w2_ptr, K2 - 1 - s2, WIDTH, K2, CP, True)
        y2 += tl.dot(y1.to(dtype), w2.to(dtype), input_precision=DOT_PRECISION)
    return y2


@triton.jit
def _head_sums(x, BLOCK_T: tl.constexpr, CP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """At each column, the sum of its head's D columns."""
    sums = tl.sum(tl.reshape(x, (BLOCK_T, CP // HEAD_DIM, HEAD_DIM)), axis=2)
    spread = tl.broadcast_to(sums[:, :, None], (BLOCK_T, CP // HEAD_DIM, HEAD_DIM))
    return tl.reshape(spread, (BLOCK_T, CP))


@triton.jit
def _sum_over_heads(
    x, BLOCK_T: tl.constexpr, CP_IN: tl.constexpr, CP_OUT: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """(BLOCK_T, CP_IN) -> (BLOCK_T, CP_OUT): at column c, the sum over x's heads of
    their column c % D (padding heads are 0)."""
    sums = tl.sum(tl.reshape(x, (BLOCK_T, CP_IN // HEAD_DIM, HEAD_DIM)), axis=1)
    spread = tl.broadcast_to(sums[:, None, :], (BLOCK_T, CP_OUT // HEAD_DIM, HEAD_DIM))
    return tl.reshape(spread, (BLOCK_T, CP_OUT))


@triton.jit
def _raw(
    x_ptr,
    x_row0,
    x_stride_t,
    other_pre,
    rows,
    seq_len,
    w1_ptr,
    w2_ptr,
    OTHER_HEADS: tl.constexpr,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    CP: tl.constexpr,
    CP_OTHER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """A stream's conv output plus half the mean over the other stream's heads of its
    pre-conv projection (``other_pre``, a fp32 tile)."""
    raw = _conv_chain(
        x_ptr, x_row0, x_stride_t, rows, seq_len, w1_ptr, w2_ptr,
        WIDTH, HEAD_DIM, K1, K2, CP, BLOCK_T, DOT_PRECISION,
    )  # fmt: skip
    mean = _sum_over_heads(other_pre, BLOCK_T, CP_OTHER, CP, HEAD_DIM) * (0.5 / OTHER_HEADS)
    return raw + mean


@triton.jit
def _load_tables(
    cos_ptr,
    sin_ptr,
    cos_row0,
    cos_stride_t,
    sin_row0,
    sin_stride_t,
    rows,
    seq_len,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CP: tl.constexpr,
):
    """cos/sin (one D-wide row per time step) repeated across the heads: (BLOCK_T, CP)."""
    cols = tl.arange(0, CP)
    mask = ((rows >= 0) & (rows < seq_len))[:, None] & (cols < WIDTH)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    within = (cols % HEAD_DIM)[None, :]
    cos = tl.load(cos_ptr + cos_row0 + rows64 * cos_stride_t + within, mask=mask, other=1.0)
    sin = tl.load(sin_ptr + sin_row0 + rows64 * sin_stride_t + within, mask=mask, other=0.0)
    return cos.to(tl.float32), sin.to(tl.float32)


@triton.jit
def _head_offsets(b, num_heads, rows, seq_len, HEAD_DIM: tl.constexpr, CP: tl.constexpr):
    """Offsets of a (BLOCK_T, CP) tile in a contiguous (B, H, T, D) tensor."""
    cols = tl.arange(0, CP)
    heads = (cols // HEAD_DIM).to(tl.int64)
    return ((b * num_heads + heads[None, :]) * seq_len + rows.to(tl.int64)[:, None]) * HEAD_DIM + (
        cols % HEAD_DIM
    )[None, :]


@triton.jit
def _tile_mask(rows, seq_len, WIDTH: tl.constexpr, CP: tl.constexpr):
    return (rows < seq_len)[:, None] & (tl.arange(0, CP) < WIDTH)[None, :]


@triton.jit
def _unit(raw, eps, BLOCK_T: tl.constexpr, CP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """raw / max(|raw|, eps) per head, and the head norms (spread over the columns)."""
    norm = tl.sqrt(_head_sums(raw * raw, BLOCK_T, CP, HEAD_DIM))
    return raw / tl.maximum(norm, eps), norm


# ----------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------


@triton.jit
def _tile_rows(tile, seq_len, BLOCK_T: tl.constexpr):
    """Batch and time rows of tile ``tile`` (tiles run over batches, then time blocks)."""
    num_t_blocks = tl.cdiv(seq_len, BLOCK_T)
    b = (tile // num_t_blocks).to(tl.int64)
    return b, (tile % num_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)


@triton.jit
def _program_rows(seq_len, BLOCK_T: tl.constexpr):
    """This program's batch and time rows. Computed from the program id alone, never
    returned by a helper that also takes pointers: Inductor's mutation analysis would then
    count every pointer such a helper takes as written through the store addresses built
    from b and rows, and write "updated" copies of them back (a stride-0 RoPE table was
    written back as a sum over the batch: wrong q and k under Inductor)."""
    return _tile_rows(tl.program_id(0), seq_len, BLOCK_T)


@triton.jit
def _stream_rows(
    b,
    rows,
    x_ptr,
    other_ptr,
    w1_ptr,
    w2_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    x_stride_b,
    x_stride_t,
    other_stride_b,
    other_stride_t,
    cos_stride_b,
    cos_stride_t,
    sin_stride_b,
    sin_stride_t,
    NUM_HEADS: tl.constexpr,
    OTHER_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CP: tl.constexpr,
    CP_OTHER: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The stream's raw tile at (b, rows) and its RoPE tables."""
    other_width: tl.constexpr = OTHER_HEADS * HEAD_DIM
    other_pre = _load_tile(
        other_ptr, b * other_stride_b, other_stride_t, rows, seq_len, other_width, CP_OTHER
    ).to(tl.float32)
    raw = _raw(
        x_ptr, b * x_stride_b, x_stride_t, other_pre, rows, seq_len, w1_ptr, w2_ptr,
        OTHER_HEADS, NUM_HEADS * HEAD_DIM, HEAD_DIM, K1, K2, CP, CP_OTHER, BLOCK_T,
        DOT_PRECISION,
    )  # fmt: skip
    cos, sin = _load_tables(
        cos_ptr, sin_ptr, b * cos_stride_b, cos_stride_t, b * sin_stride_b, sin_stride_t,
        rows, seq_len, NUM_HEADS * HEAD_DIM, HEAD_DIM, CP,
    )  # fmt: skip
    return raw, cos, sin


@triton.jit
def _seed_fwd_kernel(
    x_ptr,
    other_ptr,
    w1_ptr,
    w2_ptr,
    temp_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    seq_len,
    x_stride_b,
    x_stride_t,
    other_stride_b,
    other_stride_t,
    cos_stride_b,
    cos_stride_t,
    sin_stride_b,
    sin_stride_t,
    eps,
    NUM_HEADS: tl.constexpr,
    OTHER_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CP: tl.constexpr,
    CP_OTHER: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    HAS_TEMP: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (batch * time blocks,), one stream (q: x = q_pre, other = k_pre; k: the other
    way round). Both streams in one program faulted on the H100 (triton 3.6, widths 128 +
    32: an illegal memory access that neither stream alone shows), so each stream is
    its own launch; the other stream's projection is read once more, for the mean."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64
    b, rows = _program_rows(seq_len, BLOCK_T)
    raw, cos, sin = _stream_rows(
        b, rows, x_ptr, other_ptr, w1_ptr, w2_ptr, cos_ptr, sin_ptr, seq_len, x_stride_b, x_stride_t,
        other_stride_b, other_stride_t, cos_stride_b, cos_stride_t, sin_stride_b,
        sin_stride_t, NUM_HEADS, OTHER_HEADS, HEAD_DIM, CP, CP_OTHER, K1, K2, BLOCK_T,
        DOT_PRECISION,
    )  # fmt: skip
    out = _unit(raw, eps, BLOCK_T, CP, HEAD_DIM)[0]
    if HAS_TEMP:
        out = out * tl.load(temp_ptr).to(tl.float32)
    out = out * cos + _rotate(out, BLOCK_T, CP, HEAD_DIM, INTERLEAVED) * sin
    offsets = _head_offsets(b, NUM_HEADS, rows, seq_len, HEAD_DIM, CP)
    mask = _tile_mask(rows, seq_len, NUM_HEADS * HEAD_DIM, CP)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------


@triton.jit
def _grad_raw(
    d_out_ptr,
    b,
    num_heads,
    rows,
    seq_len,
    raw,
    cos,
    sin,
    temp,
    eps,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_TEMP: tl.constexpr,
):
    """d loss / d raw of one stream's tile, and sum(d loss / d (u * temp) * u) (the
    temperature's share; 0 without temp)."""
    offsets = _head_offsets(b, num_heads, rows, seq_len, HEAD_DIM, CP)
    mask = _tile_mask(rows, seq_len, WIDTH, CP)
    dy = tl.load(d_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # RoPE's transpose: rot^T = -rot
    g = dy * cos - _rotate(dy * sin, BLOCK_T, CP, HEAD_DIM, INTERLEAVED)
    unit, norm = _unit(raw, eps, BLOCK_T, CP, HEAD_DIM)
    d_temp = 0.0
    if HAS_TEMP:
        d_temp = tl.sum(tl.sum(g * unit, axis=1), axis=0)
        g = g * temp
    radial = _head_sums(unit * g, BLOCK_T, CP, HEAD_DIM)
    radial = tl.where(norm >= eps, radial, 0.0)
    return (g - unit * radial) / tl.maximum(norm, eps), d_temp


@triton.jit
def _seed_draw_kernel(
    d_out_ptr,
    x_ptr,
    other_ptr,
    w1_ptr,
    w2_ptr,
    temp_ptr,
    cos_ptr,
    sin_ptr,
    draw_ptr,
    d_temp_parts_ptr,
    seq_len,
    x_stride_b,
    x_stride_t,
    other_stride_b,
    other_stride_t,
    cos_stride_b,
    cos_stride_t,
    sin_stride_b,
    sin_stride_t,
    eps,
    NUM_HEADS: tl.constexpr,
    OTHER_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CP: tl.constexpr,
    CP_OTHER: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    HAS_TEMP: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (batch * time blocks,), one stream, laid out as the forward. d out is a
    contiguous (B, H, T, D); d raw is stored as a contiguous float32 (B, T, C)."""
    eps = tl.cast(eps, tl.float32)
    b, rows = _program_rows(seq_len, BLOCK_T)
    raw, cos, sin = _stream_rows(
        b, rows, x_ptr, other_ptr, w1_ptr, w2_ptr, cos_ptr, sin_ptr, seq_len, x_stride_b, x_stride_t,
        other_stride_b, other_stride_t, cos_stride_b, cos_stride_t, sin_stride_b,
        sin_stride_t, NUM_HEADS, OTHER_HEADS, HEAD_DIM, CP, CP_OTHER, K1, K2, BLOCK_T,
        DOT_PRECISION,
    )  # fmt: skip
    width: tl.constexpr = NUM_HEADS * HEAD_DIM
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temp_ptr).to(tl.float32)
    draw, d_temp = _grad_raw(
        d_out_ptr, b, NUM_HEADS, rows, seq_len, raw, cos, sin, temp, eps,
        width, HEAD_DIM, CP, BLOCK_T, INTERLEAVED, HAS_TEMP,
    )  # fmt: skip
    offsets = (b * seq_len + rows.to(tl.int64)[:, None]) * width + tl.arange(0, CP)[None, :]
    tl.store(draw_ptr + offsets, draw, mask=_tile_mask(rows, seq_len, width, CP))
    if HAS_TEMP:
        tl.store(d_temp_parts_ptr + tl.program_id(0), d_temp)


@triton.jit
def _load_draw(ptr, b, rows, seq_len, WIDTH: tl.constexpr, CP: tl.constexpr):
    """Rows of a contiguous float32 (B, T, C) d raw; outside [0, seq_len) 0."""
    return _load_tile(ptr, b * seq_len * WIDTH, WIDTH, rows, seq_len, WIDTH, CP)


@triton.jit
def _d_y1_rows(
    draw_ptr,
    b,
    rows,
    seq_len,
    w2_ptr,
    WIDTH: tl.constexpr,
    K2: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """d y1 at ``rows`` = sum_s2 d y2[rows + s2] @ W2[tap K2-1-s2]^T (d y2 = d raw, 0 past
    the end), products in the weights' dtype, fp32 sums."""
    dtype = w2_ptr.dtype.element_ty
    d_y1 = tl.zeros((BLOCK_T, CP), dtype=tl.float32)
    for s2 in range(K2):
        d_y2 = _load_draw(draw_ptr, b, rows + s2, seq_len, WIDTH, CP).to(dtype)
        w2 = _conv2_tap(w2_ptr, K2 - 1 - s2, WIDTH, K2, CP, False)
        d_y1 += tl.dot(d_y2, w2, input_precision=DOT_PRECISION)
    return d_y1


@triton.jit
def _seed_dx_kernel(
    w1_ptr,
    w2_ptr,
    draw_ptr,
    other_draw_ptr,
    dx_ptr,
    seq_len,
    NUM_HEADS: tl.constexpr,
    OTHER_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CP: tl.constexpr,
    CP_OTHER: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (batch * time blocks,), one stream: d x (B, T, C) contiguous, from d raw
    through both convs' transposes, plus the share of the other stream's mean.

    The products take d raw and d y1 rounded to the input dtype, as eager's half-precision
    conv backward does (float32 operands of (C x C) weights needed 256 KB of shared memory
    at C = 128 on the H100); the taps are runtime loops, so one tap's operands are live at
    a time."""
    WIDTH: tl.constexpr = NUM_HEADS * HEAD_DIM
    OTHER_WIDTH: tl.constexpr = OTHER_HEADS * HEAD_DIM
    dtype = dx_ptr.dtype.element_ty
    b, rows = _program_rows(seq_len, BLOCK_T)
    # d x = sum_s1 d y1[t + s1] @ W1[tap K1-1-s1]^T
    dx = tl.zeros((BLOCK_T, CP), dtype=tl.float32)
    for s1 in range(K1):
        d_y1 = _d_y1_rows(
            draw_ptr, b, rows + s1, seq_len, w2_ptr, WIDTH, K2, CP, BLOCK_T, DOT_PRECISION
        )
        w1 = _conv1_tap(w1_ptr, K1 - 1 - s1, WIDTH, HEAD_DIM, K1, CP, False)
        dx += tl.dot(d_y1.to(dtype), w1, input_precision=DOT_PRECISION)
    # the other stream's raw holds half the mean over this stream's heads of x
    other = _load_draw(other_draw_ptr, b, rows, seq_len, OTHER_WIDTH, CP_OTHER)
    dx += _sum_over_heads(other, BLOCK_T, CP_OTHER, CP, HEAD_DIM) * (0.5 / NUM_HEADS)
    offsets = (b * seq_len + rows.to(tl.int64)[:, None]) * WIDTH + tl.arange(0, CP)[None, :]
    tl.store(dx_ptr + offsets, dx.to(dtype), mask=_tile_mask(rows, seq_len, WIDTH, CP))


@triton.jit
def _chunk_tiles(num_tiles, tiles_per_program):
    """This program's chunk of (batch, time block) tiles: [start, stop)."""
    start = tl.program_id(0) * tiles_per_program
    return start, tl.minimum(start + tiles_per_program, num_tiles)


@triton.jit
def _seed_dw2_kernel(
    x_ptr,
    w1_ptr,
    draw_ptr,
    dw2_parts_ptr,
    seq_len,
    x_stride_b,
    x_stride_t,
    num_tiles,
    tiles_per_program,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CP: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (chunks, K2), one stream: conv2's weight gradient at tap K2-1-j (j the second
    program id), dW2[o, i, K2-1-j] = sum_t d y2[t, o] * y1[t - j, i], summed over a chunk of
    ``tiles_per_program`` tiles in a (C x C) float32 accumulator and stored once into this
    chunk's slice of the partials (chunks, C, C, K2) that the launcher sums. (The first
    version added every tile's products with float32 atomics: 1.7 ms of contention for the
    seed's config on the H100.) conv2's and conv1's weight gradients are separate kernels:
    one kernel branching between them needed 400 KB of shared memory in float32."""
    WIDTH: tl.constexpr = NUM_HEADS * HEAD_DIM
    dtype = x_ptr.dtype.element_ty
    j = tl.program_id(1)
    start, stop = _chunk_tiles(num_tiles, tiles_per_program)
    acc = tl.zeros((CP, CP), dtype=tl.float32)
    for tile in range(start, stop):
        b, rows = _tile_rows(tile, seq_len, BLOCK_T)
        d_y2_t = tl.trans(_load_draw(draw_ptr, b, rows, seq_len, WIDTH, CP).to(dtype))
        y1 = _conv1_rows(
            x_ptr, b * x_stride_b, x_stride_t, rows - j, seq_len, w1_ptr,
            WIDTH, HEAD_DIM, K1, CP, BLOCK_T, DOT_PRECISION,
        )  # fmt: skip
        acc += tl.dot(d_y2_t, y1.to(dtype), input_precision=DOT_PRECISION)  # [o, i]
    first = tl.arange(0, CP)[:, None]
    second = tl.arange(0, CP)[None, :]
    chunk_base = tl.program_id(0).to(tl.int64) * (WIDTH * WIDTH * K2)
    offsets = chunk_base + first * (WIDTH * K2) + second * K2 + (K2 - 1 - j)
    tl.store(dw2_parts_ptr + offsets, acc, mask=(first < WIDTH) & (second < WIDTH))


@triton.jit
def _seed_dw1_kernel(
    x_ptr,
    w2_ptr,
    draw_ptr,
    dw1_parts_ptr,
    seq_len,
    x_stride_b,
    x_stride_t,
    num_tiles,
    tiles_per_program,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CP: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (chunks, K1), one stream: conv1's weight gradient at tap K1-1-s (s the second
    program id), dW1[o, i % D, K1-1-s] = sum_t d y1[t, o] * x[t - s, i] with o and i in one
    head, over a chunk of tiles as ``_seed_dw2_kernel`` does, into partials (chunks, C, D,
    K1)."""
    WIDTH: tl.constexpr = NUM_HEADS * HEAD_DIM
    dtype = x_ptr.dtype.element_ty
    s = tl.program_id(1)
    start, stop = _chunk_tiles(num_tiles, tiles_per_program)
    acc = tl.zeros((CP, CP), dtype=tl.float32)
    for tile in range(start, stop):
        b, rows = _tile_rows(tile, seq_len, BLOCK_T)
        d_y1 = _d_y1_rows(draw_ptr, b, rows, seq_len, w2_ptr, WIDTH, K2, CP, BLOCK_T, DOT_PRECISION)
        x = _load_tile(x_ptr, b * x_stride_b, x_stride_t, rows - s, seq_len, WIDTH, CP)
        acc += tl.dot(tl.trans(d_y1.to(dtype)), x, input_precision=DOT_PRECISION)
    first = tl.arange(0, CP)[:, None]
    second = tl.arange(0, CP)[None, :]
    same_head = (first < WIDTH) & (second < WIDTH) & (first // HEAD_DIM == second // HEAD_DIM)
    chunk_base = tl.program_id(0).to(tl.int64) * (WIDTH * HEAD_DIM * K1)
    offsets = chunk_base + first * (HEAD_DIM * K1) + (second % HEAD_DIM) * K1 + (K1 - 1 - s)
    tl.store(dw1_parts_ptr + offsets, acc, mask=same_head)


# ----------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------

_NUM_STAGES = 1


def _check(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, heads, kv_heads):
    if q_pre.dim() != 3 or k_pre.dim() != 3 or q_pre.shape[:2] != k_pre.shape[:2]:
        raise ValueError("q_pre and k_pre must be (B, T, H*D) with the same B and T")
    if q_pre.shape[-1] % heads:
        raise ValueError(f"{heads} query heads do not divide the width {q_pre.shape[-1]}")
    d = q_pre.shape[-1] // heads
    e_q, e_kv = heads * d, kv_heads * d
    if k_pre.shape[-1] != e_kv:
        raise ValueError(f"k_pre must be {e_kv} wide ({kv_heads} heads of {d}), got {k_pre.shape}")
    if d & (d - 1):
        raise ValueError(f"the kernels need a power-of-two head dim, got {d}")
    if max(e_q, e_kv) > MAX_KERNEL_WIDTH:
        raise ValueError(f"the kernels take at most {MAX_KERNEL_WIDTH} channels per stream")
    k1, k2 = q_w1.shape[-1], q_w2.shape[-1]
    expected = {
        "q conv1": (q_w1, (e_q, d, k1)),
        "q conv2": (q_w2, (e_q, e_q, k2)),
        "k conv1": (k_w1, (e_kv, d, k1)),
        "k conv2": (k_w2, (e_kv, e_kv, k2)),
    }
    for name, (w, shape) in expected.items():
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} weight must be {shape}, got {tuple(w.shape)}")
    if not (1 <= k1 <= MAX_CONV_KERNEL and 1 <= k2 <= MAX_CONV_KERNEL):
        raise ValueError(f"conv kernels must be in 1..{MAX_CONV_KERNEL}, got {k1}, {k2}")


def _block_t(width: int, dtype: torch.dtype, block_t: int | None) -> int:
    """Time steps per tile: depends on the width and dtype only (no recompiles when T
    varies). fp32 operands take twice the shared memory: shorter tiles."""
    if block_t is not None:
        return block_t
    return 16 if dtype == torch.float32 else 64


@dataclasses.dataclass(frozen=True)
class _Stream:
    """One stream's launch arguments: its projection, the other stream's (for the mean),
    its weights and widths."""

    x: Tensor
    other: Tensor
    w1: Tensor
    w2: Tensor
    heads: int
    other_heads: int
    has_temp: bool

    def args(self, head_dim: int) -> tuple[list, list, dict]:
        tensors = [self.x, self.other, self.w1, self.w2]
        strides = [self.x.stride(0), self.x.stride(1), self.other.stride(0), self.other.stride(1)]
        constexprs = dict(
            NUM_HEADS=self.heads,
            OTHER_HEADS=self.other_heads,
            HEAD_DIM=head_dim,
            CP=padded_width(self.heads * head_dim),
            CP_OTHER=padded_width(self.other_heads * head_dim),
        )
        return tensors, strides, constexprs


def _common(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin, heads, kv_heads, eps, inter):
    """Both streams, the arguments they share (temp, tables, their strides, eps) and the
    shared constexprs."""
    _check(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, heads, kv_heads)
    b, t, e_q = q_pre.shape
    d = e_q // heads
    q_pre, k_pre = _unit_last_stride(q_pre), _unit_last_stride(k_pre)
    q_w1, q_w2, k_w1, k_w2 = (w.contiguous() for w in (q_w1, q_w2, k_w1, k_w2))
    cos, sin, table_strides = _tables(cos, sin, b, t, d)
    if temp is not None and temp.numel() != 1:
        raise ValueError(f"temp must be one value, got shape {tuple(temp.shape)}")
    temp_arg = temp.reshape(1) if temp is not None else q_pre  # never read without temp
    streams = (
        _Stream(q_pre, k_pre, q_w1, q_w2, heads, kv_heads, False),
        _Stream(k_pre, q_pre, k_w1, k_w2, kv_heads, heads, temp is not None),
    )
    shared = dict(
        temp=temp_arg,
        tables=[cos, sin],
        table_strides=[*table_strides, float(eps)],
        constexprs=dict(
            K1=q_w1.shape[-1],
            K2=q_w2.shape[-1],
            INTERLEAVED=bool(inter),
            DOT_PRECISION=_dot_precision(q_pre),
        ),
    )
    return streams, shared


def _dot_precision(x: Tensor) -> str:
    """Half inputs multiply in their own precision, as eager's convs do (the setting only
    acts on fp32 operands). fp32 products keep fp32 accuracy: three tf32 products on a
    GPU ("tf32x3"; IEEE fp32 dots of (C x C) weights unroll into so many FMAs that the
    compile took minutes on the H100), plain IEEE products in the interpreter."""
    if x.dtype != torch.float32:
        return "tf32"
    return "tf32x3" if x.is_cuda else "ieee"


def _weight_grad_chunks(num_tiles: int, taps: int) -> int:
    """How many chunks of tiles the weight-gradient kernel splits the sequence into: about
    two programs per SM of an H100 (132) over all taps, at least one tile per chunk. Fewer
    chunks mean fewer partial sums to add and less parallelism."""
    return max(1, min(num_tiles, 264 // taps))


def _num_warps(width: int) -> int:
    return 4 if width <= 64 else 8


def ccgqa_seed_prologue_fwd(
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
    block_t: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """q (B, Hq, T, D) and k (B, Hkv, T, D), contiguous, in ``q_pre.dtype``. ``block_t``
    overrides the tile height (tests use it to cross block borders), ``num_warps`` the
    launch (for sweeps)."""
    streams, shared = _common(
        q_pre, k_pre, q_conv1_weight, q_conv2_weight, k_conv1_weight, k_conv2_weight,
        temp, cos, sin, heads, kv_heads, eps, interleaved,
    )  # fmt: skip
    b, t, e_q = q_pre.shape
    d = e_q // heads
    q = torch.empty((b, heads, t, d), dtype=q_pre.dtype, device=q_pre.device)
    k = torch.empty((b, kv_heads, t, d), dtype=k_pre.dtype, device=k_pre.device)
    if q.numel() == 0:
        return q, k
    rows = _block_t(e_q, q_pre.dtype, block_t)
    for stream, out in zip(streams, (q, k)):
        tensors, strides, constexprs = stream.args(d)
        traceable(_seed_fwd_kernel)[(b * triton.cdiv(t, rows),)](
            *tensors,
            shared["temp"],
            *shared["tables"],
            out,
            t,
            *strides,
            *shared["table_strides"],
            **constexprs,
            **shared["constexprs"],
            HAS_TEMP=stream.has_temp,
            BLOCK_T=rows,
            num_warps=num_warps or _num_warps(stream.heads * d),
            num_stages=_NUM_STAGES,
        )
    return q, k


def ccgqa_seed_prologue_bwd(
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
    block_t: int | None = None,
    num_warps: int | None = None,
) -> list[Tensor | None]:
    """Gradients of ``ccgqa_seed_prologue_fwd`` given dq (B, Hq, T, D), dk (B, Hkv, T, D):
    [d q_pre, d k_pre, d q_conv1 w, d q_conv2 w, d k_conv1 w, d k_conv2 w, d temp], each in
    its input's dtype, None for an absent temp."""
    streams, shared = _common(
        q_pre, k_pre, q_conv1_weight, q_conv2_weight, k_conv1_weight, k_conv2_weight,
        temp, cos, sin, heads, kv_heads, eps, interleaved,
    )  # fmt: skip
    b, t, e_q = q_pre.shape
    e_kv = k_pre.shape[-1]
    d = e_q // heads
    if dq.shape != (b, heads, t, d) or dk.shape != (b, kv_heads, t, d):
        raise ValueError(f"dq {tuple(dq.shape)} / dk {tuple(dk.shape)} do not match q / k")
    device = q_pre.device
    d_q_pre = torch.empty((b, t, e_q), dtype=q_pre.dtype, device=device)
    d_k_pre = torch.empty((b, t, e_kv), dtype=k_pre.dtype, device=device)
    weights = (q_conv1_weight, q_conv2_weight, k_conv1_weight, k_conv2_weight)
    # float32 weight gradients (sums of the chunks' partials; zero when T is empty), cast
    # to the weights' dtype at the end
    d_weights = [None] * 4
    k1, k2 = shared["constexprs"]["K1"], shared["constexprs"]["K2"]
    rows = _block_t(e_q, q_pre.dtype, block_t)
    programs = b * triton.cdiv(t, rows)
    d_temp_parts = torch.zeros((max(programs, 1),), dtype=torch.float32, device=device)
    if d_q_pre.numel():
        # step 1, per stream: d raw (float32, (B, T, C)) and the temperature's partials
        draws = [torch.empty((b, t, w), dtype=torch.float32, device=device) for w in (e_q, e_kv)]
        for stream, d_out, draw in zip(streams, (dq, dk), draws):
            tensors, strides, constexprs = stream.args(d)
            traceable(_seed_draw_kernel)[(programs,)](
                d_out.contiguous(),
                *tensors,
                shared["temp"],
                *shared["tables"],
                draw,
                d_temp_parts,
                t,
                *strides,
                *shared["table_strides"],
                **constexprs,
                **shared["constexprs"],
                HAS_TEMP=stream.has_temp,
                BLOCK_T=rows,
                num_warps=num_warps or _num_warps(stream.heads * d),
                num_stages=_NUM_STAGES,
            )
        # step 2, per stream: d x, and the weight gradients as per-chunk partial sums
        num_tiles = programs
        chunks = _weight_grad_chunks(num_tiles, k1 + k2)
        per_program = triton.cdiv(num_tiles, chunks)
        for i, (stream, dx) in enumerate(zip(streams, (d_q_pre, d_k_pre))):
            _, _, constexprs = stream.args(d)
            launch = dict(
                K1=k1,
                K2=k2,
                BLOCK_T=rows,
                DOT_PRECISION=shared["constexprs"]["DOT_PRECISION"],
                num_warps=num_warps or _num_warps(stream.heads * d),
                num_stages=_NUM_STAGES,
            )
            traceable(_seed_dx_kernel)[(programs,)](
                stream.w1, stream.w2, draws[i], draws[1 - i], dx, t, **constexprs, **launch
            )
            parts = [
                torch.empty((chunks, *w.shape), dtype=torch.float32, device=device)
                for w in (stream.w1, stream.w2)
            ]
            tiles = dict(
                seq_len=t,
                x_stride_b=stream.x.stride(0),
                x_stride_t=stream.x.stride(1),
                num_tiles=num_tiles,
                tiles_per_program=per_program,
                NUM_HEADS=constexprs["NUM_HEADS"],
                HEAD_DIM=d,
                CP=constexprs["CP"],
            )
            traceable(_seed_dw2_kernel)[(chunks, k2)](
                stream.x, stream.w1, draws[i], parts[1], **tiles, **launch
            )
            traceable(_seed_dw1_kernel)[(chunks, k1)](
                stream.x, stream.w2, draws[i], parts[0], **tiles, **launch
            )
            d_weights[2 * i], d_weights[2 * i + 1] = parts[0].sum(0), parts[1].sum(0)
    else:
        d_weights = [torch.zeros(w.shape, dtype=torch.float32, device=device) for w in weights]
    grads: list[Tensor | None] = [d_q_pre, d_k_pre]
    grads += [g.to(w.dtype) for g, w in zip(d_weights, weights)]
    grads.append(
        d_temp_parts.sum().reshape(temp.shape).to(temp.dtype) if temp is not None else None
    )
    return grads
