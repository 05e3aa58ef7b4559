"""The CCGQA q/k prologue as one Triton kernel per direction, plus a naive reference.

From the pre-conv projections ``q_pre`` (B, T, Hq*D) and ``k_pre`` (B, T, Hkv*D) to the
rotated ``q`` (B, Hq, T, D) and ``k`` (B, Hkv, T, D) that attention consumes
(../../../shared/design/ccgqa.md, steps 3 to 6), per head and time step::

    y1  = conv1(pad(x))        depthwise, kernel K1, causal (left) zero padding
    y2  = conv2(pad(y1))       grouped, one group per head (a D x D map per tap), kernel K2
    raw = y2 + m               m_q[h] = (q_pre[h] + k_pre[h // G]) / 2, m_k[j] = mean_g m_q
    u   = raw / max(|raw|, eps)    (or raw / (|raw| + eps), raw / sqrt(|raw|^2 + eps))
    out = u * norm_scale * beta            beta = exp(temp[j]) or temp[j] for k, 1 for q
    out = out * cos + rot(out) * sin       on the first ``rotary_dim`` dims (rotate-half or
                                           interleaved pairs); the other dims pass through

Both convolutions are causally padded with zeros *separately*: y1 at negative times is 0,
not conv1's bias.

Launch layout. Forward: one program per (batch, block of BLOCK_T time steps, kv head j);
it handles the G query heads of group j and then kv head j, so the qk-mean sum over the
group stays in registers. The conv halo ((K1 - 1) + (K2 - 1) earlier rows) is read as
shifted tile loads that hit L1/L2; conv2 is one ``tl.dot`` (BLOCK_T x D x D) per tap.

Backward, in two steps, nothing of the forward stored:
  1. ``_ccgqa_prologue_draw_kernel`` (laid out as the forward, with its own tile height)
     recomputes the conv chain and the norm of each head once per tile and stores
     ``draw`` = d loss / d raw (float32, B x T x H*D; raw = conv2 output + qk mean), plus
     the temperature's partial sums;
  2. ``_ccgqa_prologue_conv_bwd_kernel`` (one launch per stream, one program per head and
     CHUNK time blocks) takes the convs' backward from ``draw``: d y1 at the K1 rows each
     output row needs (K1 * K2 small dots, no forward recompute), d x plus the qk-mean
     share, and the weight/bias gradients as one float32 partial row per program, summed
     by torch afterwards (deterministic, no atomics). For wide heads (D = 128) conv2's
     D x D weight gradient is a third launch per stream, a matmul-like loop over time
     with that accumulator alone in registers, in a fixed number of partial rows.
Why two kernels and not one (all H100, E2048 B16 T2048 bf16):
  * the first design gathered ``draw`` at the (K1 - 1) + (K2 - 1) shifted rows inside one
    kernel, recomputing the whole forward chain for each shift: 2.9 ms against the
    forward's 0.1 ms;
  * a single kernel with overlapping tiles (each computes d raw on BLOCK_T rows and owns
    the first BLOCK_T - HALO, shifting d raw and d y1 in registers with ``tl.gather``)
    was exact but took 0.97 ms against these two kernels' 0.69 (0.58 tuned). Its
    ablation: the weight gradients cost 0.40 ms there. One program must hold the G + 1
    heads of a group (the qk mean couples their d raw), so it cannot also keep one head's
    D x D x K2 weight-gradient accumulator in registers across time blocks; step 2's
    programs hold one head each and can (the experiment: commit 9fd77cf, its figures in
    the results files, docs/benchmarks/).

Kernel limits: D a power of two >= 16 (``tl.dot``), K1, K2 in 1..4, rotate-half RoPE with
``rotary_dim`` a power of two (interleaved: any even ``rotary_dim``), tables that differ
at most per batch and time. Everything else is for the composite in ops/ccgqa_prologue.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import traceable

__all__ = ["ccgqa_prologue_bwd", "ccgqa_prologue_fwd", "ccgqa_prologue_reference"]

TEMPERATURE_MODES = {"none": 0, "exp": 1, "raw": 2}
EPS_MODES = {"clamp": 0, "add": 1, "sqrt": 2}
MAX_CONV_KERNEL = 4


# ----------------------------------------------------------------------------
# Naive reference (the spec the kernels are tested against; differentiable).
# ----------------------------------------------------------------------------


def _causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """(B, C, T) -> (B, C, T): left-pad by kernel - 1 with zeros, then conv1d."""
    return F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight, bias, groups=groups)


def _rotate_reference(x: Tensor, interleaved: bool) -> Tensor:
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _normalize_reference(x: Tensor, eps: float, eps_mode: str) -> Tensor:
    if eps_mode == "clamp":
        return F.normalize(x, dim=-1, eps=eps)
    if eps_mode == "add":
        return x / (x.norm(dim=-1, keepdim=True) + eps)
    return x / (x.square().sum(-1, keepdim=True) + eps).sqrt()


def ccgqa_prologue_reference(
    q_pre: Tensor,
    k_pre: Tensor,
    q_conv1_weight: Tensor,
    q_conv1_bias: Tensor | None,
    q_conv2_weight: Tensor,
    q_conv2_bias: Tensor | None,
    k_conv1_weight: Tensor,
    k_conv1_bias: Tensor | None,
    k_conv2_weight: Tensor,
    k_conv2_bias: Tensor | None,
    temp: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    heads: int,
    kv_heads: int,
    qk_mean: bool = True,
    temperature: str = "exp",
    norm_scale: float | None = None,
    eps: float = 1e-12,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    eps_mode: str = "clamp",
    rotary_start: int = 0,
) -> tuple[Tensor, Tensor]:
    """Naive PyTorch prologue, written the way patterns/ccgqa.py writes it.

    Computes in at least fp32 (fp64 stays fp64) and returns ``q_pre.dtype``.
    ``norm_scale`` defaults to sqrt(D) and ``rotary_dim`` to the table width (0 without
    tables); ``temp`` has Hkv values or one shared value.
    """
    acc = torch.promote_types(q_pre.dtype, torch.float32)
    b, t, _ = q_pre.shape
    d = q_pre.shape[-1] // heads
    g = heads // kv_heads
    norm_scale = d**0.5 if norm_scale is None else norm_scale
    if rotary_dim is None:
        rotary_dim = cos.shape[-1] if cos is not None else 0

    def conv(x, w1, b1, w2, b2, n_heads):
        w1, w2 = w1.to(acc), w2.to(acc)
        b1 = b1.to(acc) if b1 is not None else None
        b2 = b2.to(acc) if b2 is not None else None
        y = x.to(acc).transpose(1, 2)
        y = _causal_conv(y, w1, b1, groups=y.shape[1])
        y = _causal_conv(y, w2, b2, groups=n_heads)
        return y.transpose(1, 2).reshape(b, t, n_heads, d)

    q = conv(q_pre, q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias, heads)
    k = conv(k_pre, k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias, kv_heads)
    if qk_mean:
        qh = q_pre.to(acc).reshape(b, t, heads, d)
        kh = k_pre.to(acc).reshape(b, t, kv_heads, d).repeat_interleave(g, dim=2)
        m_q = (qh + kh) / 2
        m_k = m_q.reshape(b, t, kv_heads, g, d).mean(3)
        q, k = q + m_q, k + m_k
    q = _normalize_reference(q, eps, eps_mode) * norm_scale
    k = _normalize_reference(k, eps, eps_mode) * norm_scale
    if temperature != "none":
        beta = temp.to(acc).exp() if temperature == "exp" else temp.to(acc)
        k = k * beta.reshape(-1).expand(kv_heads).reshape(1, 1, kv_heads, 1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
    if rotary_dim:
        # tables broadcast to (B, 1, T, R)
        cos_t = cos.to(acc).reshape(-1, 1, t, rotary_dim)
        sin_t = sin.to(acc).reshape(-1, 1, t, rotary_dim)

        def rope(x):
            end = rotary_start + rotary_dim
            x_before, x_rot, x_after = x[..., :rotary_start], x[..., rotary_start:end], x[..., end:]
            x_rot = x_rot * cos_t + _rotate_reference(x_rot, interleaved) * sin_t
            return torch.cat((x_before, x_rot, x_after), dim=-1)

        q, k = rope(q), rope(k)
    return q.to(q_pre.dtype), k.to(k_pre.dtype)


# ----------------------------------------------------------------------------
# Tile helpers. A tile is (BLOCK_T rows = time steps, HEAD_DIM columns = one head).
# ----------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, row0, stride_t, rows, seq_len, chan0, HEAD_DIM: tl.constexpr):
    """x[b, rows, chan0:chan0 + D] as fp32; rows outside [0, seq_len) read as 0."""
    cols = tl.arange(0, HEAD_DIM)
    inside = (rows >= 0) & (rows < seq_len)
    offsets = row0 + rows.to(tl.int64)[:, None] * stride_t + (chan0 + cols)[None, :]
    return tl.load(ptr + offsets, mask=inside[:, None], other=0.0).to(tl.float32)


@triton.jit
def _conv1(
    x_ptr,
    row0,
    stride_t,
    rows,
    seq_len,
    chan0,
    w1_ptr,
    b1_ptr,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    HAS_B1: tl.constexpr,
):
    """Depthwise causal conv1 at ``rows``; 0 at rows < 0, which is conv2's zero padding
    (not conv1's bias)."""
    cols = tl.arange(0, HEAD_DIM)
    y1 = tl.zeros((BLOCK_T, HEAD_DIM), dtype=tl.float32)
    for s1 in tl.static_range(K1):
        x = _load_rows(x_ptr, row0, stride_t, rows - s1, seq_len, chan0, HEAD_DIM)
        w1 = tl.load(w1_ptr + (chan0 + cols) * K1 + (K1 - 1 - s1)).to(tl.float32)
        y1 += x * w1[None, :]
    if HAS_B1:
        y1 += tl.load(b1_ptr + chan0 + cols).to(tl.float32)[None, :]
    return tl.where((rows >= 0)[:, None], y1, 0.0)


@triton.jit
def _conv2_tap(
    w2_ptr,
    chan0,
    SHIFT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K2: tl.constexpr,
    IN_BY_OUT: tl.constexpr,
):
    """The D x D matrix of conv2's tap K2-1-SHIFT for one head: [in c, out o] when
    IN_BY_OUT (for y1 @ W), else [out o, in c] (for the transposed product). The weight
    comes laid out (C, K2, D) (``_tap_major``), so a tap's rows are contiguous: read in
    conv's own (C, D, K2) layout, every element was its own memory sector. In the
    weight's own dtype: conv2's products take their operands in it (``_product``)."""
    i = tl.arange(0, HEAD_DIM)
    tap = K2 - 1 - SHIFT
    w = tl.load(w2_ptr + (chan0 + i)[:, None] * (HEAD_DIM * K2) + tap * HEAD_DIM + i[None, :])
    if IN_BY_OUT:
        return tl.trans(w)
    return w


@triton.jit
def _product(a, b, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b with both operands rounded to ``dtype`` (conv2's weight dtype), fp32 sums.

    For a half-precision model that is what eager's conv does (its conv1 output and conv2's
    output gradient are half tensors), at the tensor cores' half rate with half the shared
    memory; it measured faster than fp32 (tf32) operands at every head dim (backward and
    forward; scripts/sweep_prologue_bwd.py --old, figures in docs/benchmarks/).
    DOT_PRECISION then only acts on fp32 weights: IEEE for fp32 models, tf32 where fp32
    weights meet half activations."""
    return tl.dot(a.to(dtype), b.to(dtype), input_precision=DOT_PRECISION)


@triton.jit
def _conv_chain(
    x_ptr,
    row0,
    stride_t,
    rows,
    seq_len,
    chan0,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """conv2(pad(conv1(pad(x)))) of one head at ``rows``: a (BLOCK_T, D) fp32 tile."""
    y2 = tl.zeros((BLOCK_T, HEAD_DIM), dtype=tl.float32)
    for s2 in tl.static_range(K2):
        y1 = _conv1(
            x_ptr, row0, stride_t, rows - s2, seq_len, chan0, w1_ptr, b1_ptr,
            BLOCK_T, HEAD_DIM, K1, HAS_B1,
        )  # fmt: skip
        w2 = _conv2_tap(w2_ptr, chan0, s2, HEAD_DIM, K2, True)
        y2 += _product(y1, w2, w2_ptr.dtype.element_ty, DOT_PRECISION)
    if HAS_B2:
        y2 += tl.load(b2_ptr + chan0 + tl.arange(0, HEAD_DIM)).to(tl.float32)[None, :]
    return y2


@triton.jit
def _raw(
    IS_K: tl.constexpr,
    head,
    kv_head,
    rows,
    seq_len,
    q_pre_ptr,
    q_row0,
    q_stride_t,
    k_pre_ptr,
    k_row0,
    k_stride_t,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    QK_MEAN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """conv output + qk mean of query head ``head`` (IS_K false) or kv head ``kv_head``."""
    if IS_K:
        raw = _conv_chain(
            k_pre_ptr, k_row0, k_stride_t, rows, seq_len, kv_head * HEAD_DIM,
            w1_ptr, b1_ptr, w2_ptr, b2_ptr,
            BLOCK_T, HEAD_DIM, K1, K2, HAS_B1, HAS_B2, DOT_PRECISION,
        )  # fmt: skip
    else:
        raw = _conv_chain(
            q_pre_ptr, q_row0, q_stride_t, rows, seq_len, head * HEAD_DIM,
            w1_ptr, b1_ptr, w2_ptr, b2_ptr,
            BLOCK_T, HEAD_DIM, K1, K2, HAS_B1, HAS_B2, DOT_PRECISION,
        )  # fmt: skip
    if QK_MEAN:
        k_pre = _load_rows(
            k_pre_ptr, k_row0, k_stride_t, rows, seq_len, kv_head * HEAD_DIM, HEAD_DIM
        )
        if IS_K:
            # m_k = mean over the group of (q_pre[h] + k_pre[j]) / 2
            q_sum = tl.zeros((BLOCK_T, HEAD_DIM), dtype=tl.float32)
            for g in range(GROUP):
                q_sum += _load_rows(
                    q_pre_ptr, q_row0, q_stride_t, rows, seq_len,
                    (kv_head * GROUP + g) * HEAD_DIM, HEAD_DIM,
                )  # fmt: skip
            raw += (q_sum * (1.0 / GROUP) + k_pre) * 0.5
        else:
            q_pre = _load_rows(
                q_pre_ptr, q_row0, q_stride_t, rows, seq_len, head * HEAD_DIM, HEAD_DIM
            )
            raw += (q_pre + k_pre) * 0.5
    return raw


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
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    ROTARY_START: tl.constexpr,
):
    """cos/sin as (BLOCK_T, D) tiles: the tables on the ROTARY_DIM columns from
    ROTARY_START, elsewhere cos = 1 and sin = 0 (passthrough)."""
    cols = tl.arange(0, HEAD_DIM)
    rotated = (cols >= ROTARY_START) & (cols < ROTARY_START + ROTARY_DIM)
    mask = ((rows >= 0) & (rows < seq_len))[:, None] & rotated[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    at = tl.where(rotated, cols - ROTARY_START, 0)[None, :]
    cos = tl.load(cos_ptr + cos_row0 + rows64 * cos_stride_t + at, mask=mask, other=1.0)
    sin = tl.load(sin_ptr + sin_row0 + rows64 * sin_stride_t + at, mask=mask, other=0.0)
    return cos.to(tl.float32), sin.to(tl.float32)


@triton.jit
def _rotate(
    x,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """rot(x) in registers: x*cos + rot(x)*sin is RoPE. Rotate-half acts on every chunk of
    ROTARY_DIM columns (only the first has sin != 0), so ROTARY_DIM must divide D."""
    if INTERLEAVED:
        even, odd = tl.split(tl.reshape(x, (BLOCK_T, HEAD_DIM // 2, 2)))
        return tl.reshape(tl.join(-odd, even), (BLOCK_T, HEAD_DIM))
    else:
        chunks = tl.reshape(x, (BLOCK_T, HEAD_DIM // ROTARY_DIM, 2, ROTARY_DIM // 2))
        first, second = tl.split(tl.permute(chunks, (0, 1, 3, 2)))
        rotated = tl.permute(tl.join(-second, first), (0, 1, 3, 2))
        return tl.reshape(rotated, (BLOCK_T, HEAD_DIM))


@triton.jit
def _inverse_norm(raw, eps, EPS_MODE: tl.constexpr):
    """Per row: (1 / the normalisation's denominator, |raw|); EPS_MODE 0: max(|raw|, eps),
    1: |raw| + eps, 2: sqrt(|raw|^2 + eps)."""
    sumsq = tl.sum(raw * raw, axis=1)
    norm = tl.sqrt(sumsq)
    if EPS_MODE == 0:
        inv = 1.0 / tl.maximum(norm, eps)
    elif EPS_MODE == 1:
        inv = 1.0 / (norm + eps)
    else:
        inv = 1.0 / tl.sqrt(sumsq + eps)
    return inv, norm


@triton.jit
def _store_rows(ptr, row0, stride_t, rows, seq_len, tile, HEAD_DIM: tl.constexpr):
    """Store a (BLOCK_T, D) tile at rows ``rows < seq_len`` (unit column stride)."""
    cols = tl.arange(0, HEAD_DIM)
    offsets = row0 + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    tl.store(ptr + offsets, tile.to(ptr.dtype.element_ty), mask=(rows < seq_len)[:, None])


# ----------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------


@triton.jit
def _ccgqa_prologue_fwd_kernel(
    q_pre_ptr,
    k_pre_ptr,
    q_w1_ptr,
    q_b1_ptr,
    q_w2_ptr,
    q_b2_ptr,
    k_w1_ptr,
    k_b1_ptr,
    k_w2_ptr,
    k_b2_ptr,
    temp_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    seq_len,
    q_stride_b,
    q_stride_t,
    k_stride_b,
    k_stride_t,
    cos_stride_b,
    cos_stride_t,
    sin_stride_b,
    sin_stride_t,
    temp_stride,
    norm_scale,
    eps,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    HAS_Q_B1: tl.constexpr,
    HAS_Q_B2: tl.constexpr,
    HAS_K_B1: tl.constexpr,
    HAS_K_B2: tl.constexpr,
    QK_MEAN: tl.constexpr,
    TEMPERATURE: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    ROTARY_START: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EPS_MODE: tl.constexpr,
):
    """Grid: (batch * time blocks, kv heads). Query heads of the group first, then k."""
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    norm_scale = tl.cast(norm_scale, tl.float32)
    eps = tl.cast(eps, tl.float32)
    num_kv_heads = tl.num_programs(1)
    num_t_blocks = tl.cdiv(seq_len, BLOCK_T)
    pid_bt = tl.program_id(0)
    j = tl.program_id(1)
    b = (pid_bt // num_t_blocks).to(tl.int64)
    rows = (pid_bt % num_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    q_row0 = b * q_stride_b
    k_row0 = b * k_stride_b
    if ROTARY_DIM > 0:
        cos, sin = _load_tables(
            cos_ptr, sin_ptr, b * cos_stride_b, cos_stride_t, b * sin_stride_b, sin_stride_t,
            rows, seq_len, HEAD_DIM, ROTARY_DIM, ROTARY_START,
        )  # fmt: skip

    for g in range(GROUP):
        h = j * GROUP + g
        raw = _raw(
            False, h, j, rows, seq_len, q_pre_ptr, q_row0, q_stride_t, k_pre_ptr, k_row0,
            k_stride_t, q_w1_ptr, q_b1_ptr, q_w2_ptr, q_b2_ptr, GROUP, BLOCK_T, HEAD_DIM,
            K1, K2, HAS_Q_B1, HAS_Q_B2, QK_MEAN, DOT_PRECISION,
        )  # fmt: skip
        inv, _norm = _inverse_norm(raw, eps, EPS_MODE)
        out = raw * (norm_scale * inv)[:, None]
        if ROTARY_DIM > 0:
            out = out * cos + _rotate(out, BLOCK_T, HEAD_DIM, ROTARY_DIM, INTERLEAVED) * sin
        q_head0 = (b * (num_kv_heads * GROUP) + h) * seq_len * HEAD_DIM
        _store_rows(q_ptr, q_head0, HEAD_DIM, rows, seq_len, out, HEAD_DIM)

    raw = _raw(
        True, 0, j, rows, seq_len, q_pre_ptr, q_row0, q_stride_t, k_pre_ptr, k_row0,
        k_stride_t, k_w1_ptr, k_b1_ptr, k_w2_ptr, k_b2_ptr, GROUP, BLOCK_T, HEAD_DIM,
        K1, K2, HAS_K_B1, HAS_K_B2, QK_MEAN, DOT_PRECISION,
    )  # fmt: skip
    scale = norm_scale
    if TEMPERATURE == 1:
        scale = scale * tl.exp(tl.load(temp_ptr + j * temp_stride).to(tl.float32))
    elif TEMPERATURE == 2:
        scale = scale * tl.load(temp_ptr + j * temp_stride).to(tl.float32)
    inv, _norm = _inverse_norm(raw, eps, EPS_MODE)
    out = raw * (scale * inv)[:, None]
    if ROTARY_DIM > 0:
        out = out * cos + _rotate(out, BLOCK_T, HEAD_DIM, ROTARY_DIM, INTERLEAVED) * sin
    k_head0 = (b * num_kv_heads + j) * seq_len * HEAD_DIM
    _store_rows(k_ptr, k_head0, HEAD_DIM, rows, seq_len, out, HEAD_DIM)


# ----------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------


@triton.jit
def _grad_raw(
    raw,
    dy_ptr,
    dy_row0,
    dy_stride_t,
    rows,
    seq_len,
    cos_ptr,
    sin_ptr,
    cos_row0,
    cos_stride_t,
    sin_row0,
    sin_stride_t,
    out_scale,
    eps,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    ROTARY_START: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    EPS_MODE: tl.constexpr,
):
    """For out = rope(raw / max(|raw|, eps) * out_scale) (or the other EPS_MODEs): d loss / d raw given d out, and
    sum(d(out before rope) * unit) (the temperature's gradient, up to norm_scale).
    Rows past seq_len give exactly 0 (even if raw there is 0 and eps is 0)."""
    cols = tl.arange(0, HEAD_DIM)
    valid = (rows < seq_len)[:, None]
    offsets = dy_row0 + rows.to(tl.int64)[:, None] * dy_stride_t + cols[None, :]
    grad = tl.load(dy_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    if ROTARY_DIM > 0:
        cos, sin = _load_tables(
            cos_ptr, sin_ptr, cos_row0, cos_stride_t, sin_row0, sin_stride_t,
            rows, seq_len, HEAD_DIM, ROTARY_DIM, ROTARY_START,
        )  # fmt: skip
        # VJP of x*cos + rot(x)*sin: rot^T = -rot
        grad = grad * cos - _rotate(grad * sin, BLOCK_T, HEAD_DIM, ROTARY_DIM, INTERLEAVED)
    inv, norm = _inverse_norm(raw, eps, EPS_MODE)
    unit = raw * inv[:, None]
    d_unit = grad * out_scale
    # d raw = (d unit - unit * radial) * inv, radial = (unit . d unit) * den' * den / |raw|
    # (den the denominator, den' its derivative in |raw|): unit . d unit for max(|raw|, eps)
    # above eps (below it den is the constant eps: no radial term) and for sqrt(|raw|^2 +
    # eps); times (|raw| + eps) / |raw| for |raw| + eps
    radial = tl.sum(unit * d_unit, axis=1)
    if EPS_MODE == 0:
        radial = tl.where(norm >= eps, radial, 0.0)
    elif EPS_MODE == 1:
        radial = tl.where(norm > 0, radial * (1.0 + eps / tl.where(norm > 0, norm, 1.0)), 0.0)
    d_raw = tl.where(valid, (d_unit - unit * radial[:, None]) * inv[:, None], 0.0)
    grad_dot_unit = tl.sum(tl.sum(tl.where(valid, grad * unit, 0.0), axis=1), axis=0)
    return d_raw, grad_dot_unit


@triton.jit
def _ccgqa_prologue_draw_kernel(
    dq_ptr,
    dk_ptr,
    q_pre_ptr,
    k_pre_ptr,
    q_w1_ptr,
    q_b1_ptr,
    q_w2_ptr,
    q_b2_ptr,
    k_w1_ptr,
    k_b1_ptr,
    k_w2_ptr,
    k_b2_ptr,
    temp_ptr,
    cos_ptr,
    sin_ptr,
    draw_q_ptr,
    draw_k_ptr,
    d_beta_part_ptr,
    seq_len,
    q_stride_b,
    q_stride_t,
    k_stride_b,
    k_stride_t,
    dq_stride_b,
    dq_stride_h,
    dq_stride_t,
    dk_stride_b,
    dk_stride_h,
    dk_stride_t,
    cos_stride_b,
    cos_stride_t,
    sin_stride_b,
    sin_stride_t,
    temp_stride,
    norm_scale,
    eps,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    HAS_Q_B1: tl.constexpr,
    HAS_Q_B2: tl.constexpr,
    HAS_K_B1: tl.constexpr,
    HAS_K_B2: tl.constexpr,
    QK_MEAN: tl.constexpr,
    TEMPERATURE: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    ROTARY_START: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EPS_MODE: tl.constexpr,
):
    """Backward step 1. Grid: (batch * time blocks, kv heads), as the forward's (with the
    backward's tile height). Recomputes raw (conv chain + qk mean) of the group's query
    heads and of kv head j at this block's rows, once, and stores d loss / d raw in
    float32 ((B, T, H*D), like q_pre / k_pre).
    The temperature's gradient: one partial per program, summed by torch."""
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    norm_scale = tl.cast(norm_scale, tl.float32)
    eps = tl.cast(eps, tl.float32)
    num_kv_heads = tl.num_programs(1)
    num_t_blocks = tl.cdiv(seq_len, BLOCK_T)
    pid_bt = tl.program_id(0)
    j = tl.program_id(1)
    b = (pid_bt // num_t_blocks).to(tl.int64)
    rows = (pid_bt % num_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    q_row0 = b * q_stride_b
    k_row0 = b * k_stride_b
    cos_row0 = b * cos_stride_b
    sin_row0 = b * sin_stride_b
    q_channels = num_kv_heads * GROUP * HEAD_DIM
    k_channels = num_kv_heads * HEAD_DIM

    for g in range(GROUP):
        h = j * GROUP + g
        raw = _raw(
            False, h, j, rows, seq_len, q_pre_ptr, q_row0, q_stride_t, k_pre_ptr, k_row0,
            k_stride_t, q_w1_ptr, q_b1_ptr, q_w2_ptr, q_b2_ptr, GROUP, BLOCK_T, HEAD_DIM,
            K1, K2, HAS_Q_B1, HAS_Q_B2, QK_MEAN, DOT_PRECISION,
        )  # fmt: skip
        d_raw, _unused = _grad_raw(
            raw, dq_ptr, b * dq_stride_b + h * dq_stride_h, dq_stride_t, rows, seq_len,
            cos_ptr, sin_ptr, cos_row0, cos_stride_t, sin_row0, sin_stride_t, norm_scale, eps,
            BLOCK_T, HEAD_DIM, ROTARY_DIM, ROTARY_START, INTERLEAVED, EPS_MODE,
        )  # fmt: skip
        row0 = b * seq_len * q_channels + h * HEAD_DIM
        _store_rows(draw_q_ptr, row0, q_channels, rows, seq_len, d_raw, HEAD_DIM)

    k_scale = norm_scale
    if TEMPERATURE == 1:
        k_scale = k_scale * tl.exp(tl.load(temp_ptr + j * temp_stride).to(tl.float32))
    elif TEMPERATURE == 2:
        k_scale = k_scale * tl.load(temp_ptr + j * temp_stride).to(tl.float32)
    raw = _raw(
        True, 0, j, rows, seq_len, q_pre_ptr, q_row0, q_stride_t, k_pre_ptr, k_row0,
        k_stride_t, k_w1_ptr, k_b1_ptr, k_w2_ptr, k_b2_ptr, GROUP, BLOCK_T, HEAD_DIM,
        K1, K2, HAS_K_B1, HAS_K_B2, QK_MEAN, DOT_PRECISION,
    )  # fmt: skip
    d_raw, grad_dot_unit = _grad_raw(
        raw, dk_ptr, b * dk_stride_b + j * dk_stride_h, dk_stride_t, rows, seq_len,
        cos_ptr, sin_ptr, cos_row0, cos_stride_t, sin_row0, sin_stride_t, k_scale, eps,
        BLOCK_T, HEAD_DIM, ROTARY_DIM, ROTARY_START, INTERLEAVED, EPS_MODE,
    )  # fmt: skip
    row0 = b * seq_len * k_channels + j * HEAD_DIM
    _store_rows(draw_k_ptr, row0, k_channels, rows, seq_len, d_raw, HEAD_DIM)
    if TEMPERATURE != 0:
        # d out / d beta = unit * norm_scale (before RoPE)
        tl.store(
            d_beta_part_ptr + pid_bt.to(tl.int64) * num_kv_heads + j, grad_dot_unit * norm_scale
        )


@triton.jit
def _ccgqa_prologue_conv_bwd_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    draw_ptr,
    other_draw_ptr,
    dx_ptr,
    dw1_part_ptr,
    db1_part_ptr,
    dw2_part_ptr,
    db2_part_ptr,
    seq_len,
    x_stride_b,
    x_stride_t,
    IS_K: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    QK_MEAN: tl.constexpr,
    MAX_TAPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr,
    CONV2_WEIGHT_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward step 2, for one stream (q or k). Grid: (batch * chunks of CHUNK time
    blocks, heads of the stream). From d raw (= d conv2 output) of step 1:

        d y1[t]  = sum_s2 d raw[t + s2] @ W2(tap s2)          (conv2's input gradient)
        d x[t]   = sum_s1 w1(tap s1) * d y1[t + s1] + qk-mean share of d raw
        d W2     = sum_t d raw[t]^T (x) y1[t - s2]   (y1 recomputed: a depthwise conv)
        d w1     = sum_t d y1[t] * x[t - s1]; d b1 = sum d y1; d b2 = sum d raw

    d y1 is needed at rows t .. t + K1 - 1, so it is computed K1 times from d raw (at most
    K1 * K2 small dots per tile) rather than stored. Weight and bias gradients: one float32
    partial row per program, summed by torch (deterministic, no atomics); with CHUNK time
    blocks per program those rows stay few."""
    num_heads = tl.num_programs(1)
    channels = num_heads * HEAD_DIM
    rows_per_program = CHUNK * BLOCK_T
    num_chunks = tl.cdiv(seq_len, rows_per_program)
    pid = tl.program_id(0)
    head = tl.program_id(1)
    b = (pid // num_chunks).to(tl.int64)
    row_start = (pid % num_chunks) * rows_per_program
    chan0 = head * HEAD_DIM
    x_row0 = b * x_stride_b
    g_row0 = b * seq_len * channels  # d raw is a contiguous (B, T, channels) buffer
    if IS_K:
        other_channels = channels * GROUP
    else:
        other_channels = channels // GROUP
    other_row0 = b * seq_len * other_channels
    cols = tl.arange(0, HEAD_DIM)
    taps = tl.arange(0, MAX_TAPS)
    d_w1 = tl.zeros((MAX_TAPS, HEAD_DIM), dtype=tl.float32)
    d_b1 = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    d_b2 = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    for c in range(CHUNK):
        rows = row_start + c * BLOCK_T + tl.arange(0, BLOCK_T)
        d_x = tl.zeros((BLOCK_T, HEAD_DIM), dtype=tl.float32)
        for s1 in tl.static_range(K1):
            d_y1 = tl.zeros((BLOCK_T, HEAD_DIM), dtype=tl.float32)
            for s2 in tl.static_range(K2):
                g = _load_rows(
                    draw_ptr, g_row0, channels, rows + (s1 + s2), seq_len, chan0, HEAD_DIM
                )
                w2 = _conv2_tap(w2_ptr, chan0, s2, HEAD_DIM, K2, False)
                d_y1 += _product(g, w2, w2_ptr.dtype.element_ty, DOT_PRECISION)
            w1 = tl.load(w1_ptr + (chan0 + cols) * K1 + (K1 - 1 - s1)).to(tl.float32)
            d_x += d_y1 * w1[None, :]
            if s1 == 0:
                # d y1 at this tile's own rows (0 past seq_len: d raw is 0 there)
                for s in tl.static_range(K1):
                    x = _load_rows(x_ptr, x_row0, x_stride_t, rows - s, seq_len, chan0, HEAD_DIM)
                    d_tap = tl.sum(d_y1 * x, axis=0)
                    d_w1 += tl.where(taps[:, None] == K1 - 1 - s, d_tap[None, :], 0.0)
                d_b1 += tl.sum(d_y1, axis=0)
        g = _load_rows(draw_ptr, g_row0, channels, rows, seq_len, chan0, HEAD_DIM)
        d_b2 += tl.sum(g, axis=0)
        if QK_MEAN:
            # m_q[h] = (q_pre[h] + k_pre[j]) / 2 and m_k[j] = mean_g m_q[jG + g], so
            # d m_q[h] = d raw_q[h] + d raw_k[j] / G reaches q_pre[h] and k_pre[j] halved
            if IS_K:
                q_sum = tl.zeros((BLOCK_T, HEAD_DIM), dtype=tl.float32)
                for gq in range(GROUP):
                    q_sum += _load_rows(
                        other_draw_ptr, other_row0, other_channels, rows, seq_len,
                        (head * GROUP + gq) * HEAD_DIM, HEAD_DIM,
                    )  # fmt: skip
                d_x += (q_sum + g) * 0.5
            else:
                d_k = _load_rows(
                    other_draw_ptr, other_row0, other_channels, rows, seq_len,
                    (head // GROUP) * HEAD_DIM, HEAD_DIM,
                )  # fmt: skip
                d_x += (g + d_k * (1.0 / GROUP)) * 0.5
        _store_rows(dx_ptr, g_row0 + chan0, channels, rows, seq_len, d_x, HEAD_DIM)

    pid64 = pid.to(tl.int64)
    w1_offsets = pid64 * channels * K1 + (chan0 + cols)[None, :] * K1 + taps[:, None]
    tl.store(dw1_part_ptr + w1_offsets, d_w1, mask=(taps < K1)[:, None])
    if HAS_B1:
        tl.store(db1_part_ptr + pid64 * channels + chan0 + cols, d_b1)
    if HAS_B2:
        tl.store(db2_part_ptr + pid64 * channels + chan0 + cols, d_b2)
    if CONV2_WEIGHT_GRAD:
        # one D x D accumulator at a time (K2 of them would not fit in registers at D = 128)
        w2_part_ptr = dw2_part_ptr + pid64 * channels * HEAD_DIM * K2
        for s2 in tl.static_range(K2):
            d_w2 = tl.zeros((HEAD_DIM, HEAD_DIM), dtype=tl.float32)
            for c in range(CHUNK):
                rows = row_start + c * BLOCK_T + tl.arange(0, BLOCK_T)
                d_w2 += _conv2_tap_grad(
                    x_ptr, w1_ptr, b1_ptr, w2_ptr, draw_ptr, x_row0, x_stride_t, g_row0,
                    channels, rows, seq_len, chan0, s2, BLOCK_T, HEAD_DIM, K1, HAS_B1,
                    DOT_PRECISION,
                )  # fmt: skip
            _store_tap_grad(w2_part_ptr, chan0, s2, d_w2, HEAD_DIM, K2)


@triton.jit
def _conv2_tap_grad(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    draw_ptr,
    x_row0,
    x_stride_t,
    g_row0,
    channels,
    rows,
    seq_len,
    chan0,
    SHIFT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    HAS_B1: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One time block's share of one head's conv2 weight gradient at tap K2-1-SHIFT:
    dW[o, c] = sum over ``rows`` of d raw[t, o] * y1[t - SHIFT, c], y1 recomputed (a
    depthwise conv)."""
    g = _load_rows(draw_ptr, g_row0, channels, rows, seq_len, chan0, HEAD_DIM)
    y1 = _conv1(
        x_ptr, x_row0, x_stride_t, rows - SHIFT, seq_len, chan0, w1_ptr, b1_ptr,
        BLOCK_T, HEAD_DIM, K1, HAS_B1,
    )  # fmt: skip
    return _product(tl.trans(g), y1, w2_ptr.dtype.element_ty, DOT_PRECISION)


@triton.jit
def _store_tap_grad(
    part_ptr, chan0, SHIFT: tl.constexpr, d_w2, HEAD_DIM: tl.constexpr, K2: tl.constexpr
):
    """One head's D x D tap gradient into a partial row laid out (C, K2, D)."""
    cols = tl.arange(0, HEAD_DIM)
    offsets = (chan0 + cols)[:, None] * (HEAD_DIM * K2) + (K2 - 1 - SHIFT) * HEAD_DIM
    tl.store(part_ptr + offsets + cols[None, :], d_w2)


@triton.jit
def _ccgqa_prologue_conv2_wgrad_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    draw_ptr,
    dw2_part_ptr,
    seq_len,
    batch,
    x_stride_b,
    x_stride_t,
    HEAD_DIM: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    HAS_B1: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """conv2's weight gradient of one stream as its own launch, for wide heads. Grid:
    (heads, splits); split p sums the time blocks p, p + splits, ... over every batch
    (CHUNK blocks at a time) into its own partial row. At D >= 64 the conv backward's
    programs, holding d x and d y1 tiles, could not also keep this D x D accumulator
    without spilling; here it is the only large tile, as in a matmul's K loop."""
    head = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    channels = tl.num_programs(0) * HEAD_DIM
    chan0 = head * HEAD_DIM
    rows_per_step = CHUNK * BLOCK_T
    steps_per_batch = tl.cdiv(seq_len, rows_per_step)
    part_ptr = dw2_part_ptr + split.to(tl.int64) * channels * HEAD_DIM * K2
    for s2 in tl.static_range(K2):
        d_w2 = tl.zeros((HEAD_DIM, HEAD_DIM), dtype=tl.float32)
        for step in range(split, batch * steps_per_batch, splits):
            b = (step // steps_per_batch).to(tl.int64)
            row_start = (step % steps_per_batch) * rows_per_step
            for c in range(CHUNK):
                rows = row_start + c * BLOCK_T + tl.arange(0, BLOCK_T)
                d_w2 += _conv2_tap_grad(
                    x_ptr, w1_ptr, b1_ptr, w2_ptr, draw_ptr, b * x_stride_b, x_stride_t,
                    b * seq_len * channels, channels, rows, seq_len, chan0, s2, BLOCK_T,
                    HEAD_DIM, K1, HAS_B1, DOT_PRECISION,
                )  # fmt: skip
        _store_tap_grad(part_ptr, chan0, s2, d_w2, HEAD_DIM, K2)


# ----------------------------------------------------------------------------
# Launch wrappers.
# ----------------------------------------------------------------------------

# No software pipelining: the loops over group heads and time blocks would otherwise keep
# num_stages copies of every conv2 weight tap and tile in shared memory; at d=128, or at
# d=32 in fp32, the H100's 227 KiB then ran out (OutOfResources). The tiles
# are reused from L1/L2 either way.
_NUM_STAGES = 1


# The backward's launch per head dim: (tile rows, time blocks per conv-backward program,
# warps). Taller tiles and CHUNK time blocks per program mean fewer partial
# weight-gradient rows (B * T / (CHUNK * BLOCK_T) of them) while the grid keeps enough
# programs; a sweep (scripts/sweep_prologue_bwd.py) found CHUNK 4 faster than the
# forward's tiles at every head dim (figures in docs/benchmarks/). The interpreter takes
# CHUNK 1: its programs run one after another anyway. At D = 128 conv2's weight gradient
# has its own launch (``_ccgqa_prologue_conv2_wgrad_kernel``) and 64-row tiles measured
# fastest; at D = 64 the two layouts measured alike (H200 sweep, docs/benchmarks).
def _bwd_launch(head_dim, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(tile rows, time blocks per program, warps, conv2 weight-gradient splits: 0 keeps
    it in the conv backward). Comparisons, not a table lookup: under ``dynamic=True`` D
    may be a SymInt. fp32 (IEEE products) keeps the forward's tiles and 4 time blocks:
    the sweep was bf16, and the taller tiles' fp32 tests did not finish on the H100
    within the suite's time."""
    splits = 0 if head_dim <= 64 else WGRAD_SPLITS
    if dtype == torch.float32:
        return _block_t(head_dim, None), 4, 4 if head_dim <= 64 else 8, splits
    if head_dim <= 16:
        return 256, 2, 4, splits
    if head_dim <= 32:
        return 128, 2, 4, splits
    if head_dim <= 64:
        return 128, 2, 8, splits
    return 64, 2, 8, splits


# Partial rows of conv2's weight gradient when it has its own launch (wide heads): with
# up to 8 heads per stream, 32 rows give a few hundred programs.
WGRAD_SPLITS = 32


def _block_t(head_dim: int, block_t: int | None) -> int:
    """Time steps per tile: depends on D only (never on T: no recompiles when T varies)."""
    if block_t is not None:
        return block_t
    return 64 if head_dim <= 64 else 32


def _check(
    q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, heads, kv_heads, rotary_dim, interleaved, rotary_start=0
):
    if q_pre.dim() != 3 or k_pre.dim() != 3 or q_pre.shape[:2] != k_pre.shape[:2]:
        raise ValueError("q_pre and k_pre must be (B, T, H*D) with the same B and T")
    if heads % kv_heads or q_pre.shape[-1] % heads:
        raise ValueError(f"{heads} query heads do not fit {kv_heads} kv heads / the width")
    d = q_pre.shape[-1] // heads
    if d < 16 or d & (d - 1):
        raise ValueError(f"the kernels need a power-of-two head dim >= 16, got {d}")
    k1, k2 = q_w1.shape[-1], q_w2.shape[-1]
    expected = {
        "q conv1": (q_w1, (heads * d, 1, k1)),
        "q conv2": (q_w2, (heads * d, d, k2)),
        "k conv1": (k_w1, (kv_heads * d, 1, k1)),
        "k conv2": (k_w2, (kv_heads * d, d, k2)),
    }
    for name, (w, shape) in expected.items():
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} weight must be {shape}, got {tuple(w.shape)}")
    if not (1 <= k1 <= MAX_CONV_KERNEL and 1 <= k2 <= MAX_CONV_KERNEL):
        raise ValueError(f"conv kernels must be in 1..{MAX_CONV_KERNEL}, got {k1}, {k2}")
    if rotary_dim < 0 or rotary_dim % 2 or rotary_dim > d:
        raise ValueError(f"rotary_dim must be even and in [0, {d}], got {rotary_dim}")
    if rotary_dim and not interleaved and rotary_dim & (rotary_dim - 1):
        raise ValueError(f"rotate-half RoPE needs a power-of-two rotary_dim, got {rotary_dim}")
    # rotate-half turns every ROTARY_DIM-wide chunk of the head (``_rotate``): the rotated
    # dims must be one of those chunks
    if (
        rotary_start < 0
        or rotary_start + rotary_dim > d
        or rotary_start % (2 if interleaved else max(rotary_dim, 1))
    ):
        raise ValueError(
            f"RoPE on dims {rotary_start}..{rotary_start + rotary_dim} does not fit the kernels"
        )


def _tap_major(conv2_weight: Tensor) -> Tensor:
    """conv2's (C, D, K2) weight as (C, K2, D): the layout ``_conv2_tap`` reads."""
    return conv2_weight.transpose(1, 2).contiguous()


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(cos: Tensor | None, sin: Tensor | None, b: int, t: int, rotary_dim: int):
    """cos/sin as (B, 1, T, R) views (stride 0 where broadcast) and their (b, t) strides."""
    if not rotary_dim:
        return None, None, (0, 0, 0, 0)
    shape = (b, 1, t, rotary_dim)
    cos, sin = _unit_last_stride(cos.expand(shape)), _unit_last_stride(sin.expand(shape))
    return cos, sin, (cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2))


def _common(
    q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, cos, sin,
    heads, kv_heads, qk_mean, temperature, norm_scale, eps, rotary_dim, interleaved, eps_mode,
    rotary_start,
):  # fmt: skip
    """Arguments shared by both kernels: tensors, runtime scalars, constexprs."""
    _check(
        q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, heads, kv_heads, rotary_dim, interleaved, rotary_start
    )
    if temperature not in TEMPERATURE_MODES or (temp is None) != (temperature == "none"):
        raise ValueError(f"temperature {temperature!r} does not fit temp")
    if eps_mode not in EPS_MODES:
        raise ValueError(f"eps_mode must be one of {list(EPS_MODES)}, got {eps_mode!r}")
    b, t, e_q = q_pre.shape
    d = e_q // heads
    q_pre, k_pre = _unit_last_stride(q_pre), _unit_last_stride(k_pre)
    weights = [w.contiguous() if w is not None else None for w in (q_w1, q_b1)]
    weights += [_tap_major(q_w2), q_b2.contiguous() if q_b2 is not None else None]
    weights += [w.contiguous() if w is not None else None for w in (k_w1, k_b1)]
    weights += [_tap_major(k_w2), k_b2.contiguous() if k_b2 is not None else None]
    cos, sin, table_strides = _tables(cos, sin, b, t, rotary_dim)
    temp_stride = 0
    if temp is not None:
        temp = temp.reshape(-1)
        temp_stride = temp.stride(0) if temp.numel() > 1 else 0
    dummy = q_pre  # stands in for absent tensors; never read

    def ptr(x):
        return x if x is not None else dummy

    tensors = [q_pre, k_pre, *(ptr(w) for w in weights), ptr(temp), ptr(cos), ptr(sin)]
    scalars = dict(
        strides=[q_pre.stride(0), q_pre.stride(1), k_pre.stride(0), k_pre.stride(1)],
        tail=[*table_strides, temp_stride, float(norm_scale), float(eps)],
    )
    constexprs = dict(
        GROUP=heads // kv_heads,
        HEAD_DIM=d,
        K1=q_w1.shape[-1],
        K2=q_w2.shape[-1],
        HAS_Q_B1=q_b1 is not None,
        HAS_Q_B2=q_b2 is not None,
        HAS_K_B1=k_b1 is not None,
        HAS_K_B2=k_b2 is not None,
        QK_MEAN=bool(qk_mean),
        TEMPERATURE=TEMPERATURE_MODES[temperature],
        ROTARY_DIM=rotary_dim,
        ROTARY_START=rotary_start,
        INTERLEAVED=bool(interleaved),
        EPS_MODE=EPS_MODES[eps_mode],
        # conv2's products take the weight's dtype (``_product``): fp32 models multiply in
        # IEEE fp32; this precision matters only where fp32 weights meet half inputs (tf32)
        DOT_PRECISION="ieee" if q_pre.dtype == torch.float32 else "tf32",
    )
    return tensors, scalars, constexprs


def ccgqa_prologue_fwd(
    q_pre: Tensor,
    k_pre: Tensor,
    q_conv1_weight: Tensor,
    q_conv1_bias: Tensor | None,
    q_conv2_weight: Tensor,
    q_conv2_bias: Tensor | None,
    k_conv1_weight: Tensor,
    k_conv1_bias: Tensor | None,
    k_conv2_weight: Tensor,
    k_conv2_bias: Tensor | None,
    temp: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    heads: int,
    kv_heads: int,
    qk_mean: bool,
    temperature: str,
    norm_scale: float,
    eps: float,
    rotary_dim: int,
    interleaved: bool,
    block_t: int | None = None,
    num_warps: int | None = None,
    eps_mode: str = "clamp",
    rotary_start: int = 0,
) -> tuple[Tensor, Tensor]:
    """q (B, Hq, T, D) and k (B, Hkv, T, D), contiguous, in ``q_pre.dtype``; computed in
    fp32. ``block_t`` overrides the tile height (tests use it to cross block borders)."""
    tensors, scalars, constexprs = _common(
        q_pre, k_pre, q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias,
        k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias, temp, cos, sin,
        heads, kv_heads, qk_mean, temperature, norm_scale, eps, rotary_dim, interleaved,
        eps_mode, rotary_start,
    )  # fmt: skip
    b, t, e_q = q_pre.shape
    d = e_q // heads
    q = torch.empty((b, heads, t, d), dtype=q_pre.dtype, device=q_pre.device)
    k = torch.empty((b, kv_heads, t, d), dtype=k_pre.dtype, device=k_pre.device)
    if q.numel() == 0:
        return q, k
    rows = _block_t(d, block_t)
    grid = (b * triton.cdiv(t, rows), kv_heads)
    traceable(_ccgqa_prologue_fwd_kernel)[grid](
        *tensors,
        q,
        k,
        t,
        *scalars["strides"],
        *scalars["tail"],
        **constexprs,
        BLOCK_T=rows,
        num_warps=num_warps or (4 if d <= 64 else 8),
        num_stages=_NUM_STAGES,
    )
    return q, k


def ccgqa_prologue_bwd(
    dq: Tensor,
    dk: Tensor,
    q_pre: Tensor,
    k_pre: Tensor,
    q_conv1_weight: Tensor,
    q_conv1_bias: Tensor | None,
    q_conv2_weight: Tensor,
    q_conv2_bias: Tensor | None,
    k_conv1_weight: Tensor,
    k_conv1_bias: Tensor | None,
    k_conv2_weight: Tensor,
    k_conv2_bias: Tensor | None,
    temp: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    heads: int,
    kv_heads: int,
    qk_mean: bool,
    temperature: str,
    norm_scale: float,
    eps: float,
    rotary_dim: int,
    interleaved: bool,
    block_t: int | None = None,
    chunk: int | None = None,
    num_warps: int | None = None,
    wgrad_splits: int | None = None,
    eps_mode: str = "clamp",
    rotary_start: int = 0,
) -> list[Tensor | None]:
    """Gradients of ``ccgqa_prologue_fwd`` given dq (B, Hq, T, D) and dk (B, Hkv, T, D):
    [d q_pre, d k_pre, d q_conv1 w, b, d q_conv2 w, b, d k_conv1 w, b, d k_conv2 w, b,
    d temp], each in its input's dtype, None for an absent bias or temp. ``block_t``,
    ``chunk``, ``num_warps`` and ``wgrad_splits`` (0: conv2's weight gradient inside the
    conv backward; n: its own launch of n partial rows per stream) override the tuned
    launch (``_bwd_launch``)."""
    tensors, scalars, constexprs = _common(
        q_pre, k_pre, q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias,
        k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias, temp, cos, sin,
        heads, kv_heads, qk_mean, temperature, norm_scale, eps, rotary_dim, interleaved,
        eps_mode, rotary_start,
    )  # fmt: skip
    b, t, e_q = q_pre.shape
    e_kv = k_pre.shape[-1]
    d = e_q // heads
    k1, k2 = q_conv1_weight.shape[-1], q_conv2_weight.shape[-1]
    if dq.shape != (b, heads, t, d) or dk.shape != (b, kv_heads, t, d):
        raise ValueError(f"dq {tuple(dq.shape)} / dk {tuple(dk.shape)} do not match q / k")
    dq, dk = _unit_last_stride(dq), _unit_last_stride(dk)
    device = q_pre.device
    d_q_pre = torch.empty((b, t, e_q), dtype=q_pre.dtype, device=device)
    d_k_pre = torch.empty((b, t, e_kv), dtype=k_pre.dtype, device=device)

    tuned_rows, tuned_chunk, tuned_warps, tuned_splits = _bwd_launch(d, q_pre.dtype)
    rows = block_t or tuned_rows
    if chunk is None:
        chunk = tuned_chunk if device.type == "cuda" else 1
    if wgrad_splits is None:
        wgrad_splits = tuned_splits if device.type == "cuda" else min(tuned_splits, 2)
    # step 1: d raw of every head (float32, (B, T, H*D)) and the temperature's partials
    draw_q = torch.empty((b, t, e_q), dtype=torch.float32, device=device)
    draw_k = torch.empty((b, t, e_kv), dtype=torch.float32, device=device)
    t_blocks = b * triton.cdiv(t, rows)
    d_beta_parts = torch.empty((t_blocks, kv_heads), dtype=torch.float32, device=device)
    # step 2: the conv chain's backward per stream, weight gradients as partial rows
    programs = b * triton.cdiv(t, rows * chunk)

    def partial(*shape, rows=programs):
        # every program writes its whole row (for its head's channels)
        return torch.empty((rows, *shape), dtype=torch.float32, device=device)

    # conv2's weight gradient: (C, K2, D) rows, of the conv backward's programs or of its
    # own launch's splits
    w2_rows = wgrad_splits or programs
    parts = [
        partial(e_q, k1),
        partial(e_q) if q_conv1_bias is not None else None,
        partial(e_q, k2, d, rows=w2_rows),
        partial(e_q) if q_conv2_bias is not None else None,
        partial(e_kv, k1),
        partial(e_kv) if k_conv1_bias is not None else None,
        partial(e_kv, k2, d, rows=w2_rows),
        partial(e_kv) if k_conv2_bias is not None else None,
    ]
    if d_q_pre.numel():
        launch = dict(num_warps=num_warps or tuned_warps, num_stages=_NUM_STAGES)
        traceable(_ccgqa_prologue_draw_kernel)[(t_blocks, kv_heads)](
            dq,
            dk,
            *tensors,
            draw_q,
            draw_k,
            d_beta_parts,
            t,
            *scalars["strides"],
            dq.stride(0),
            dq.stride(1),
            dq.stride(2),
            dk.stride(0),
            dk.stride(1),
            dk.stride(2),
            *scalars["tail"],
            **constexprs,
            BLOCK_T=rows,
            **launch,
        )
        q_pre, k_pre = tensors[0], tensors[1]
        streams = (
            (False, q_pre, tensors[2:5], draw_q, draw_k, d_q_pre, parts[:4], heads),
            (True, k_pre, tensors[6:9], draw_k, draw_q, d_k_pre, parts[4:], kv_heads),
        )
        for is_k, x, (w1, b1, w2), draw, other, dx, (dw1, db1, dw2, db2), n_heads in streams:
            has_b1 = constexprs["HAS_K_B1" if is_k else "HAS_Q_B1"]
            has_b2 = constexprs["HAS_K_B2" if is_k else "HAS_Q_B2"]
            traceable(_ccgqa_prologue_conv_bwd_kernel)[(programs, n_heads)](
                x,
                w1,
                b1,
                w2,
                draw,
                other,
                dx,
                dw1,
                db1 if db1 is not None else dw1,  # dw1: never touched
                dw2,
                db2 if db2 is not None else dw1,
                t,
                x.stride(0),
                x.stride(1),
                IS_K=is_k,
                GROUP=constexprs["GROUP"],
                HEAD_DIM=d,
                K1=k1,
                K2=k2,
                HAS_B1=has_b1,
                HAS_B2=has_b2,
                QK_MEAN=constexprs["QK_MEAN"],
                MAX_TAPS=MAX_CONV_KERNEL,
                BLOCK_T=rows,
                CHUNK=chunk,
                CONV2_WEIGHT_GRAD=not wgrad_splits,
                DOT_PRECISION=constexprs["DOT_PRECISION"],
                **launch,
            )
            if wgrad_splits:
                traceable(_ccgqa_prologue_conv2_wgrad_kernel)[(n_heads, wgrad_splits)](
                    x, w1, b1, w2, draw, dw2, t, b, x.stride(0), x.stride(1),
                    HEAD_DIM=d, K1=k1, K2=k2, HAS_B1=has_b1, BLOCK_T=rows, CHUNK=chunk,
                    DOT_PRECISION=constexprs["DOT_PRECISION"], **launch,
                )  # fmt: skip
    weights = (
        q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias,
        k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias,
    )  # fmt: skip
    grads: list[Tensor | None] = [d_q_pre, d_k_pre]
    for part, weight in zip(parts[:8], weights):
        if weight is None:
            grads.append(None)
            continue
        total = part.sum(0)
        if total.dim() == 3:  # conv2's rows are (C, K2, D), its weight (C, D, K2)
            total = total.transpose(1, 2)
        grads.append(total.reshape(weight.shape).to(weight.dtype))
    if temp is None:
        grads.append(None)
    else:
        d_beta = d_beta_parts.sum(0)
        t32 = temp.detach().float().reshape(-1).expand(kv_heads)
        d_temp = d_beta * t32.exp() if temperature == "exp" else d_beta
        if temp.numel() == 1:
            d_temp = d_temp.sum()
        grads.append(d_temp.reshape(temp.shape).to(temp.dtype))
    return grads
