"""Grouped-query attention of a few new tokens over a KV cache (flash-decoding), Triton.

Shapes: q (B, Hq, Tq, D) with Tq small (one token, or a few when speculating); k, v
(B, Hkv, Tk, D), the cache, Hq = G * Hkv; an optional bool mask broadcastable to
(B, Hq, Tq, Tk), True where a key is visible.  Scores are ``scale * q . k``; no causal
rule of its own: the mask says what each query sees (SDPA's semantics).

Why this shape of kernel: at decode time the work is reading the cache.  One program owns
one (batch, kv head, key range): it loads the G * Tq query rows of the group once, as the
rows of one tile, and reads each K/V block of its range once for all of them, so the
cache is read once per step whatever G is (repeating K/V for SDPA reads it 1 + 2G times).
The key axis is split over programs (flash-decoding) so a batch of one still fills the
GPU; each split writes a partial output and its base-2 log-sum-exp, and a second kernel
combines the splits.  A row whose keys are all masked gets zeros (the math backend of
SDPA does the same), never NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import traceable

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
LOG2E = 1.4426950408889634
# programs wanted in flight: about two per SM of an H100/H200 (132 SMs)
TARGET_PROGRAMS = 264
MAX_ROWS_PER_PROGRAM = 64


@triton.jit
def _decode_split_kernel(
    Q, K, V, MASK, O_PART, LSE_PART,
    scale_log2,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_mb, stride_mh, stride_mt, stride_mk,
    num_q_heads, num_kv_heads, q_len, k_len, blocks_per_split, rows_total,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    # Inductor may type a Python float argument as fp64: the loop-carried row max must
    # stay fp32
    scale_log2 = tl.cast(scale_log2, tl.float32)
    split = tl.program_id(0)
    batch_head = tl.program_id(1)
    row_block = tl.program_id(2)
    b = batch_head // num_kv_heads
    h_kv = batch_head % num_kv_heads

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (query head in group, token)
    row_ok = rows < GROUPS * q_len
    h = h_kv * GROUPS + rows // q_len
    t = rows % q_len
    dims = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    start = split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, k_len)
    # a finite floor, not -inf: a block whose keys are all masked then gives p = 0 and
    # alpha = 1 instead of exp2(-inf - -inf) = NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        k = tl.load(k_base + cols[:, None] * stride_kt + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        keep = row_ok[:, None] & col_ok[None, :]
        if HAS_MASK:
            m_ptrs = (MASK + b * stride_mb + h[:, None] * stride_mh + t[:, None] * stride_mt
                      + cols[None, :] * stride_mk)  # fmt: skip
            visible = tl.load(m_ptrs, mask=keep, other=0)
            keep = keep & (visible != 0)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + dims[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    row_index = (b * num_q_heads + h) * q_len + t
    part = split * rows_total + row_index
    tl.store(O_PART + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
    tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, OUT, num_splits, rows_total,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    dims = tl.arange(0, HEAD_DIM)
    top = tl.full([1], -1.0e30, dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        split_ok = splits < num_splits
        lse = tl.load(LSE_PART + splits * rows_total + row, mask=split_ok, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(lse, 0))
        alpha = tl.exp2(top - new_top)
        w = tl.exp2(lse - new_top)  # a split that saw no visible key weighs 0
        parts = tl.load(
            O_PART + (splits[:, None] * rows_total + row) * HEAD_DIM + dims[None, :],
            mask=split_ok[:, None], other=0.0,
        )  # fmt: skip
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(parts * w[:, None], 0)
        top = new_top
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(OUT + row * HEAD_DIM + dims, out.to(OUT.dtype.element_ty))


def _launch_shape(batch: int, num_kv_heads: int, k_len: int, block_n: int) -> tuple[int, int]:
    """(splits, key blocks per split): enough programs to fill the GPU, each over whole
    key blocks.  Plain integer arithmetic so symbolic sizes trace."""
    key_blocks = (k_len + block_n - 1) // block_n
    wanted = torch.sym_max(1, TARGET_PROGRAMS // (batch * num_kv_heads))
    splits = torch.sym_max(1, torch.sym_min(wanted, key_blocks))
    per_split = torch.sym_max(1, (key_blocks + splits - 1) // splits)
    return (key_blocks + per_split - 1) // per_split, per_split


def gqa_decode_attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """The launch: q, k, v with unit last stride; mask None or bool."""
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, k_len = k.shape[1], k.shape[2]
    groups = num_q_heads // num_kv_heads
    block_n = 64 if head_dim <= 128 else 32
    rows = groups * q_len
    block_m = max(16, min(MAX_ROWS_PER_PROGRAM, triton.next_power_of_2(rows)))
    row_blocks = (rows + block_m - 1) // block_m
    splits, per_split = _launch_shape(batch, num_kv_heads, k_len, block_n)
    rows_total = batch * num_q_heads * q_len
    o_part = torch.empty((splits, rows_total, head_dim), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((splits, rows_total), device=q.device, dtype=torch.float32)
    if mask is None:
        mask_arg, mask_strides = q, (0, 0, 0, 0)
    else:
        full = mask.expand(batch, num_q_heads, q_len, k_len)
        mask_arg, mask_strides = full, tuple(full.stride())
    traceable(_decode_split_kernel)[(splits, batch * num_kv_heads, row_blocks)](
        q, k, v, mask_arg, o_part, lse_part,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *mask_strides,
        num_q_heads, num_kv_heads, q_len, k_len, per_split, rows_total,
        GROUPS=groups, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_MASK=mask is not None, num_warps=4, num_stages=3,
    )  # fmt: skip
    o = torch.empty((batch, num_q_heads, q_len, head_dim), device=q.device, dtype=q.dtype)
    traceable(_decode_combine_kernel)[(rows_total,)](
        o_part, lse_part, o, splits, rows_total,
        HEAD_DIM=head_dim, BLOCK_S=16, num_warps=4,
    )  # fmt: skip
    return o


def gqa_decode_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """Naive PyTorch in float64: K/V repeated over each group, the mask applied, softmax.
    A row with no visible key is zeros."""
    groups = q.shape[1] // k.shape[1]
    kf = k.double().repeat_interleave(groups, dim=1)
    vf = v.double().repeat_interleave(groups, dim=1)
    s = (q.double() @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vf).to(q.dtype)
