"""Causal grouped-query flash attention (forward and backward) as Triton kernels.

Modelled on Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py)
and FlashAttention-2: the forward keeps a running max and sum per query row (online
softmax) so the T x T score matrix never exists; the backward recomputes the
probabilities block by block from the saved log-sum-exp.  Layout of this file: the
kernels, thin launch wrappers, and `gqa_attention_reference` (naive PyTorch).
Autograd lives elsewhere; the wrappers run inside `torch.library.triton_op` bodies,
so every launch goes through `torch.library.wrap_triton` to stay traceable by Inductor.

Shapes: q (B, Hq, T, D); k, v (B, Hkv, T, D) with Hq = G * Hkv.  Query head h reads
key/value head h // G.  Query i attends keys j <= i.  Scores are `scale * q . k`.

Conventions:
  * The softmax runs in base 2: scores are multiplied by `scale * log2(e)` (one FMA
    together with the max subtraction) and exponentiated with `exp2`, which is what
    the hardware computes natively.  The factor is applied to the float32 scores
    rather than baked into a bf16/fp16 copy of q, so it costs no extra rounding.
  * `lse` returned by the forward is the NATURAL-log log-sum-exp of the scaled
    scores, float32, shape (B, Hq, T): lse[i] = log(sum_j<=i exp(scale * q_i . k_j)).
    The backward takes it in that form and converts to base 2 itself.
  * Backward (FlashAttention-2 with recomputation):
        delta_i = sum_d do_id * o_id                              (preprocess kernel)
        p_ij    = exp(scale * q_i . k_j - lse_i)
        dv_j    = sum_{h in group} sum_i p_ij do_i
        ds_ij   = p_ij * (do_i . v_j - delta_i)
        dk_j    = scale * sum_{h in group} sum_i ds_ij q_i
        dq_i    = scale * sum_j ds_ij k_j
    dK/dV: one program per (batch, kv head, key block) loops over the G query heads
    of its group and over the query blocks at or below the diagonal, so the group
    reduction happens in registers: no repeated K/V and no atomics.  dQ: one program
    per (batch, query head, query block) loops over key blocks, like the forward.
  * Forward and dQ programs own one query head each.  The heads of a group are
    neighbouring programs (head is the fast grid axis), so they read the same K/V
    tiles close together in time, from L2.  Packing a group's heads into one tile was
    not done: at small D the cost is the exp2 per score, which packing doesn't cut.
  * TMA: at head dims where the H100 sweep measured it faster, the forward (D=128)
    reads K/V and the dK/dV kernel (D=64, 128) reads Q/dO through device-side descriptors
    (the copy engine; rows past T arrive as zeros).  Their scratch comes from
    `triton.set_allocator` (Inductor sets its own).  Elsewhere, and wherever the
    tensors are not 16-byte aligned, the same kernels use pointer loads.
  * float32 inputs use Triton's default dot precision (tf32 on the GPU): ~3e-4
    relative error; the interpreter computes them in IEEE float32.
  * Causal block skipping: key blocks after a query block are never visited; only
    the diagonal blocks compute the mask.  Programs with the most work (last query
    blocks, first key blocks) are launched first.
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import traceable

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)


# ---------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------


@triton.jit
def _key_rows_descriptor(base, seq_len, stride_t, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """A TMA descriptor over one head's (T, D) rows, loading (BLOCK_N, D) tiles: the copy
    engine fetches whole tiles asynchronously and fills rows past T with zeros."""
    return tl.make_tensor_descriptor(
        base, shape=[seq_len, HEAD_DIM], strides=[stride_t, 1], block_shape=[BLOCK_N, HEAD_DIM]
    )


@triton.jit
def _forward_inner(
    acc,
    row_max,
    row_sum,
    q,
    k_ptr,
    v_ptr,
    stride_kt,
    stride_vt,
    query_rows,
    key_start,
    key_end,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,
    EVEN_T: tl.constexpr,
    TMA: tl.constexpr,
):
    """Fold key blocks [key_start, key_end) into the online-softmax state.

    `row_max` is the running max of the base-2 scores and `row_sum` the running sum
    of exp2(score - row_max); `acc` is the unnormalised output.  Off the diagonal
    every key is visible to every query of the block and in bounds, so no mask is
    computed; ON_DIAGONAL blocks apply the causal mask (which also hides keys >= T
    from every real query row).  With TMA, k_ptr and v_ptr are tensor descriptors
    (`_key_rows_descriptor`); their zero-filled rows past T are hidden the same way.
    """
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    dims = tl.arange(0, HEAD_DIM)
    for block_start in range(key_start, key_end, BLOCK_N):
        block_start = tl.multiple_of(block_start, BLOCK_N)
        key_rows = block_start + tl.arange(0, BLOCK_N)
        if TMA:
            k_t = tl.trans(k_ptr.load([block_start, 0]))
        else:
            # K is read transposed (D, BLOCK_N) so the score tile is a plain q @ k_t.
            k_t_ptrs = k_ptr + key_rows[None, :] * stride_kt + dims[:, None]
            if ON_DIAGONAL and not EVEN_T:
                k_t = tl.load(k_t_ptrs, mask=key_rows[None, :] < seq_len, other=0.0)
            else:
                k_t = tl.load(k_t_ptrs)
        scores = tl.dot(q, k_t)
        if ON_DIAGONAL:
            visible = query_rows[:, None] >= key_rows[None, :]
            scores = tl.where(visible, scores * qk_scale, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            p = tl.math.exp2(scores - new_max[:, None])
        else:
            # qk_scale > 0, so max(scores) * qk_scale == max(scores * qk_scale); the
            # scaling then rides along in the FMA that subtracts the max.
            new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
            p = tl.math.exp2(scores * qk_scale - new_max[:, None])
        # Rescale what was accumulated under the old max.  Every row sees key
        # `query block start` in the first diagonal block at the latest, so new_max
        # is finite before it is ever subtracted from itself (no inf - inf).
        correction = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None]
        if TMA:
            v = v_ptr.load([block_start, 0])
        else:
            v_ptrs = v_ptr + key_rows[:, None] * stride_vt + dims[None, :]
            if ON_DIAGONAL and not EVEN_T:
                v = tl.load(v_ptrs, mask=key_rows[:, None] < seq_len, other=0.0)
            else:
                v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    num_q_heads,
    group_size,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
    TMA: tl.constexpr,
):
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    # Off-diagonal key blocks must be whole and unmasked: they end at the query
    # block's start, which is a multiple of BLOCK_N only if BLOCK_N divides BLOCK_M.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    LN2: tl.constexpr = 0.6931471805599453

    batch_head = tl.program_id(0)
    # Query blocks are on the slow grid axis, last block first: under the causal
    # mask the work grows with the block index, and starting the longest programs
    # first shortens the tail of the launch.  Neighbouring programs are heads of the
    # same block, so the heads of one group read the same K/V tiles close in time.
    query_block = tl.num_programs(1) - 1 - tl.program_id(1)
    batch = batch_head // num_q_heads
    q_head = batch_head % num_q_heads
    kv_head = q_head // group_size

    # int64 base offsets: batch * stride_b can pass 2**31 elements.
    q_ptr += batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
    k_ptr += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_ptr += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    out_ptr += batch.to(tl.int64) * stride_ob + q_head.to(tl.int64) * stride_oh
    lse_ptr += batch_head.to(tl.int64) * seq_len
    if TMA:
        k_ptr = _key_rows_descriptor(k_ptr, seq_len, stride_kt, HEAD_DIM, BLOCK_N)
        v_ptr = _key_rows_descriptor(v_ptr, seq_len, stride_vt, HEAD_DIM, BLOCK_N)

    query_start = query_block * BLOCK_M
    query_rows = query_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + query_rows[:, None] * stride_qt + dims[None, :]
    if EVEN_T:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=query_rows[:, None] < seq_len, other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys strictly before the query block: no mask (causal block skipping means
    # keys after the block are never visited at all).
    acc, row_max, row_sum = _forward_inner(
        acc,
        row_max,
        row_sum,
        q,
        k_ptr,
        v_ptr,
        stride_kt,
        stride_vt,
        query_rows,
        0,
        query_start,
        seq_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        ON_DIAGONAL=False,
        EVEN_T=EVEN_T,
        TMA=TMA,
    )
    # The diagonal block(s): keys inside the query block, causally masked.
    if EVEN_T:
        diagonal_end = query_start + BLOCK_M
    else:
        diagonal_end = tl.minimum(query_start + BLOCK_M, seq_len)
    acc, row_max, row_sum = _forward_inner(
        acc,
        row_max,
        row_sum,
        q,
        k_ptr,
        v_ptr,
        stride_kt,
        stride_vt,
        query_rows,
        query_start,
        diagonal_end,
        seq_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        ON_DIAGONAL=True,
        EVEN_T=EVEN_T,
        TMA=TMA,
    )

    acc = acc / row_sum[:, None]
    # Stored in natural log (see module docstring).
    lse = (row_max + tl.math.log2(row_sum)) * LN2
    out_ptrs = out_ptr + query_rows[:, None] * stride_ot + dims[None, :]
    if EVEN_T:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))
        tl.store(lse_ptr + query_rows, lse)
    else:
        in_bounds = query_rows < seq_len
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_bounds[:, None])
        tl.store(lse_ptr + query_rows, lse, mask=in_bounds)


# ---------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------


@triton.jit
def _backward_preprocess_kernel(
    out_ptr,
    dout_ptr,
    delta_ptr,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    num_q_heads,
    seq_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(do * o): the softmax-Jacobian term shared by dK and dQ."""
    batch_head = tl.program_id(0)
    batch = batch_head // num_q_heads
    q_head = batch_head % num_q_heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    in_bounds = rows < seq_len
    out_ptr += batch.to(tl.int64) * stride_ob + q_head.to(tl.int64) * stride_oh
    dout_ptr += batch.to(tl.int64) * stride_dob + q_head.to(tl.int64) * stride_doh
    o = tl.load(
        out_ptr + rows[:, None] * stride_ot + dims[None, :],
        mask=in_bounds[:, None],
        other=0.0,
    )
    do = tl.load(
        dout_ptr + rows[:, None] * stride_dot + dims[None, :],
        mask=in_bounds[:, None],
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + batch_head.to(tl.int64) * seq_len + rows, delta, mask=in_bounds)


@triton.jit
def _backward_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    q_desc,
    do_desc,
    stride_qh,
    stride_qt,
    stride_doh,
    stride_dot,
    key_rows,
    query_start,
    blocks_per_head,
    group_size,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,
    EVEN_T: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """Accumulate dk, dv of one key block over `blocks_per_head` query blocks from
    `query_start`, for each of the `group_size` query heads sharing this K/V head.

    Heads and query blocks are flattened into one loop so the software pipeline
    runs through the whole group instead of draining at every head boundary.  The
    pointers arrive offset to the group's first query head; head g adds g * stride.
    Everything is computed transposed (key rows first) so that k and v stay in their
    natural layout and no register tile is transposed.
    """
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    LOG2E: tl.constexpr = 1.4426950408889634
    dims = tl.arange(0, HEAD_DIM)
    # Never divide by zero, even in a loop that runs zero times: the software
    # pipeliner computes the first iterations' addresses ahead of the loop, and a
    # garbage head index there was seen to fault on an H100 (triton 3.6, T=1).
    divisor = tl.maximum(blocks_per_head, 1)
    for step in range(group_size * blocks_per_head):
        head_in_group = step // divisor
        block_start = query_start + (step - head_in_group * divisor) * BLOCK_M
        query_rows = block_start + tl.arange(0, BLOCK_M)
        head_offset = head_in_group.to(tl.int64)
        q_t_ptrs = q_ptr + head_offset * stride_qh + query_rows[None, :] * stride_qt + dims[:, None]
        do_ptrs = (
            dout_ptr + head_offset * stride_doh + query_rows[:, None] * stride_dot + dims[None, :]
        )
        row_stats_offset = head_offset * seq_len + query_rows
        if TMA:
            # q_desc / do_desc: (group, T, D) descriptors, zero rows past T
            q_t = tl.trans(
                tl.reshape(q_desc.load([head_in_group, block_start, 0]), [BLOCK_M, HEAD_DIM])
            )
            in_bounds = query_rows < seq_len
            lse = tl.load(lse_ptr + row_stats_offset, mask=in_bounds, other=0.0)
        elif EVEN_T:
            q_t = tl.load(q_t_ptrs)
            lse = tl.load(lse_ptr + row_stats_offset)
        else:
            # Query rows >= T load as zero do and delta, so whatever p they get they
            # add nothing to dv (p * 0) or dk (p * (v . 0 - 0)).
            in_bounds = query_rows < seq_len
            q_t = tl.load(q_t_ptrs, mask=in_bounds[None, :], other=0.0)
            lse = tl.load(lse_ptr + row_stats_offset, mask=in_bounds, other=0.0)
        scores_t = tl.dot(k, q_t)
        p_t = tl.math.exp2(scores_t * qk_scale - (lse * LOG2E)[None, :])
        if ON_DIAGONAL:
            p_t = tl.where(query_rows[None, :] >= key_rows[:, None], p_t, 0.0)
        if TMA:
            do = tl.reshape(do_desc.load([head_in_group, block_start, 0]), [BLOCK_M, HEAD_DIM])
            delta = tl.load(delta_ptr + row_stats_offset, mask=in_bounds, other=0.0)
        elif EVEN_T:
            do = tl.load(do_ptrs)
            delta = tl.load(delta_ptr + row_stats_offset)
        else:
            do = tl.load(do_ptrs, mask=in_bounds[:, None], other=0.0)
            delta = tl.load(delta_ptr + row_stats_offset, mask=in_bounds, other=0.0)
        do = do.to(k.dtype)
        dv = tl.dot(p_t.to(k.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(k.dtype), tl.trans(q_t), dk)
    return dk, dv


@triton.jit
def _backward_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    num_kv_heads,
    group_size,
    seq_len,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
    TMA: tl.constexpr = False,
):
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    # Query blocks after the diagonal must start at multiples of BLOCK_M.
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    DIAGONAL_BLOCKS: tl.constexpr = BLOCK_N // BLOCK_M

    batch_kv_head = tl.program_id(0)
    # Key block 0 sees every query, the last one only the diagonal: the heaviest
    # programs get the lowest slow-axis index and so start first.
    key_block = tl.program_id(1)
    batch = batch_kv_head // num_kv_heads
    kv_head = batch_kv_head % num_kv_heads
    first_q_head = kv_head * group_size
    num_q_heads = num_kv_heads * group_size

    q_ptr += batch.to(tl.int64) * stride_qb + first_q_head.to(tl.int64) * stride_qh
    dout_ptr += batch.to(tl.int64) * stride_dob + first_q_head.to(tl.int64) * stride_doh
    row_stats_base = (batch.to(tl.int64) * num_q_heads + first_q_head) * seq_len
    lse_ptr += row_stats_base
    delta_ptr += row_stats_base
    if TMA:
        q_desc = tl.make_tensor_descriptor(
            q_ptr, shape=[group_size, seq_len, HEAD_DIM], strides=[stride_qh, stride_qt, 1],
            block_shape=[1, BLOCK_M, HEAD_DIM],
        )  # fmt: skip
        do_desc = tl.make_tensor_descriptor(
            dout_ptr, shape=[group_size, seq_len, HEAD_DIM], strides=[stride_doh, stride_dot, 1],
            block_shape=[1, BLOCK_M, HEAD_DIM],
        )  # fmt: skip
    else:
        q_desc = q_ptr
        do_desc = dout_ptr
    k_ptr += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_ptr += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    dk_ptr += batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
    dv_ptr += batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh

    key_start = key_block * BLOCK_N
    key_rows = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    k_ptrs = k_ptr + key_rows[:, None] * stride_kt + dims[None, :]
    v_ptrs = v_ptr + key_rows[:, None] * stride_vt + dims[None, :]
    if EVEN_T:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=key_rows[:, None] < seq_len, other=0.0)
        v = tl.load(v_ptrs, mask=key_rows[:, None] < seq_len, other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query blocks on the diagonal (query rows inside this key block): masked.
    dk, dv = _backward_dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_ptr,
        dout_ptr,
        lse_ptr,
        delta_ptr,
        q_desc,
        do_desc,
        stride_qh,
        stride_qt,
        stride_doh,
        stride_dot,
        key_rows,
        key_start,
        DIAGONAL_BLOCKS,
        group_size,
        seq_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        ON_DIAGONAL=True,
        EVEN_T=EVEN_T,
        TMA=TMA,
    )
    # Query blocks after the key block see all of its keys: no causal mask.
    below_start = key_start + BLOCK_N
    below_blocks = tl.cdiv(tl.maximum(seq_len - below_start, 0), BLOCK_M)
    if below_blocks > 0:
        dk, dv = _backward_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_ptr,
            dout_ptr,
            lse_ptr,
            delta_ptr,
            q_desc,
            do_desc,
            stride_qh,
            stride_qt,
            stride_doh,
            stride_dot,
            key_rows,
            below_start,
            below_blocks,
            group_size,
            seq_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            ON_DIAGONAL=False,
            EVEN_T=EVEN_T,
            TMA=TMA,
        )

    # The scores were scale * q . k, so d(scores)/dk carries the scale once.
    dk *= scale
    dk_ptrs = dk_ptr + key_rows[:, None] * stride_dkt + dims[None, :]
    dv_ptrs = dv_ptr + key_rows[:, None] * stride_dvt + dims[None, :]
    if EVEN_T:
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty))
    else:
        in_bounds = key_rows[:, None] < seq_len
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=in_bounds)
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _backward_dq_inner(
    dq,
    q,
    do,
    lse_log2,
    delta,
    k_ptr,
    v_ptr,
    stride_kt,
    stride_vt,
    query_rows,
    key_start,
    key_end,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """Accumulate dq of one query block over key blocks [key_start, key_end)."""
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    dims = tl.arange(0, HEAD_DIM)
    for block_start in range(key_start, key_end, BLOCK_N):
        block_start = tl.multiple_of(block_start, BLOCK_N)
        key_rows = block_start + tl.arange(0, BLOCK_N)
        k_t_ptrs = k_ptr + key_rows[None, :] * stride_kt + dims[:, None]
        v_t_ptrs = v_ptr + key_rows[None, :] * stride_vt + dims[:, None]
        if ON_DIAGONAL and not EVEN_T:
            k_t = tl.load(k_t_ptrs, mask=key_rows[None, :] < seq_len, other=0.0)
            v_t = tl.load(v_t_ptrs, mask=key_rows[None, :] < seq_len, other=0.0)
        else:
            k_t = tl.load(k_t_ptrs)
            v_t = tl.load(v_t_ptrs)
        scores = tl.dot(q, k_t)
        p = tl.math.exp2(scores * qk_scale - lse_log2[:, None])
        if ON_DIAGONAL:
            p = tl.where(query_rows[:, None] >= key_rows[None, :], p, 0.0)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq)
    return dq


@triton.jit
def _backward_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    num_q_heads,
    group_size,
    seq_len,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    # Inductor passes Python floats to inlined kernels as fp64: keep the math fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    LOG2E: tl.constexpr = 1.4426950408889634

    batch_head = tl.program_id(0)
    query_block = tl.num_programs(1) - 1 - tl.program_id(1)  # longest first
    batch = batch_head // num_q_heads
    q_head = batch_head % num_q_heads
    kv_head = q_head // group_size

    q_ptr += batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
    dout_ptr += batch.to(tl.int64) * stride_dob + q_head.to(tl.int64) * stride_doh
    dq_ptr += batch.to(tl.int64) * stride_dqb + q_head.to(tl.int64) * stride_dqh
    k_ptr += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_ptr += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    lse_ptr += batch_head.to(tl.int64) * seq_len
    delta_ptr += batch_head.to(tl.int64) * seq_len

    query_start = query_block * BLOCK_M
    query_rows = query_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + query_rows[:, None] * stride_qt + dims[None, :]
    do_ptrs = dout_ptr + query_rows[:, None] * stride_dot + dims[None, :]
    if EVEN_T:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptr + query_rows)
        delta = tl.load(delta_ptr + query_rows)
    else:
        in_bounds = query_rows < seq_len
        q = tl.load(q_ptrs, mask=in_bounds[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=in_bounds[:, None], other=0.0)
        lse = tl.load(lse_ptr + query_rows, mask=in_bounds, other=0.0)
        delta = tl.load(delta_ptr + query_rows, mask=in_bounds, other=0.0)
    do = do.to(q.dtype)
    lse_log2 = lse * LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _backward_dq_inner(
        dq,
        q,
        do,
        lse_log2,
        delta,
        k_ptr,
        v_ptr,
        stride_kt,
        stride_vt,
        query_rows,
        0,
        query_start,
        seq_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        ON_DIAGONAL=False,
        EVEN_T=EVEN_T,
    )
    if EVEN_T:
        diagonal_end = query_start + BLOCK_M
    else:
        diagonal_end = tl.minimum(query_start + BLOCK_M, seq_len)
    dq = _backward_dq_inner(
        dq,
        q,
        do,
        lse_log2,
        delta,
        k_ptr,
        v_ptr,
        stride_kt,
        stride_vt,
        query_rows,
        query_start,
        diagonal_end,
        seq_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        ON_DIAGONAL=True,
        EVEN_T=EVEN_T,
    )

    dq *= scale
    dq_ptrs = dq_ptr + query_rows[:, None] * stride_dqt + dims[None, :]
    if EVEN_T:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=query_rows[:, None] < seq_len)


# ---------------------------------------------------------------------------------
# Block configurations
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape and launch settings of one kernel.

    block_m: query rows per tile; block_n: key rows per tile.  The forward and dQ
    kernels own a query block and step over key blocks (block_m % block_n == 0); the
    dK/dV kernel owns a key block and steps over query blocks (block_n % block_m == 0).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Chosen per head dim from `scripts/sweep_gqa_attention.py` on sm_90 (torch 2.11, triton
# 3.6; B=2, Hq=16, Hkv=4, T=8192, bf16): the fastest candidate of each
# kernel, among configs that don't spill registers (checked with ptxas -v for sm_90).
# Small D is softmax-bound (an exp2 per score and few FLOPs per score), large D is
# limited by registers: the (block, D) float32 accumulators (two in dK/dV) must fit.
FORWARD_CONFIGS: dict[int, BlockConfig] = {
    16: BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    32: BlockConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    64: BlockConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    128: BlockConfig(block_m=128, block_n=32, num_warps=8, num_stages=3),
}
# The forward at these head dims loads K/V through TMA tensor descriptors (the copy
# engine), with its own tiles: at D=128 1.04 ms against 1.19 ms for the best
# pointer-load config (same sweep, H100); at D=64 TMA was slower.
FORWARD_TMA_CONFIGS: dict[int, BlockConfig] = {
    128: BlockConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
}
# dK/dV reading Q and dO through TMA descriptors: at D=128 1.82 ms against 2.12 ms for
# the best pointer-load config, at D=64 1.16 ms against 1.36 ms (H100)
BACKWARD_DKDV_TMA_CONFIGS: dict[int, BlockConfig] = {
    64: BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    128: BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
}
BACKWARD_DKDV_CONFIGS: dict[int, BlockConfig] = {
    16: BlockConfig(block_m=64, block_n=128, num_warps=4, num_stages=3),
    32: BlockConfig(block_m=64, block_n=128, num_warps=4, num_stages=3),
    64: BlockConfig(block_m=32, block_n=64, num_warps=4, num_stages=3),
    128: BlockConfig(block_m=32, block_n=64, num_warps=4, num_stages=3),
}
# D=16 dQ: 64-row tiles measured faster than 128-row ones on the H200 (the same sm_90
# SMs as the H100's; D=32 already runs dQ on this tile).
BACKWARD_DQ_CONFIGS: dict[int, BlockConfig] = {
    16: BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    32: BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    64: BlockConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    128: BlockConfig(block_m=128, block_n=32, num_warps=8, num_stages=3),
}
# Short sequences: with 128-row tiles there would be too few programs to fill the
# GPU and the diagonal (masked, half wasted) block would dominate.
_SHORT_SEQUENCE = 512
_SHORT_SEQUENCE_BLOCK = 64
# The Triton interpreter (CPU tensors) runs every program in Python: tiny tiles keep
# tests fast and make small test sequences span several blocks.  The tiles are
# rectangular, as on the GPU, so the multi-block diagonal paths get exercised too.
INTERPRETER_FORWARD_CONFIG = BlockConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
INTERPRETER_DKDV_CONFIG = BlockConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)
INTERPRETER_DQ_CONFIG = BlockConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
BACKWARD_PREPROCESS_BLOCK = 128


def _running_in_interpreter(t: Tensor) -> bool:
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _shrink_for_short_sequence(config: BlockConfig, seq_len: int) -> BlockConfig:
    if seq_len > _SHORT_SEQUENCE:
        return config
    return BlockConfig(
        block_m=min(config.block_m, _SHORT_SEQUENCE_BLOCK),
        block_n=min(config.block_n, _SHORT_SEQUENCE_BLOCK),
        num_warps=min(config.num_warps, 4),
        num_stages=config.num_stages,
    )


def forward_config(
    head_dim: int, seq_len: int, interpreter: bool = False, tma: bool = False
) -> BlockConfig:
    if interpreter:
        return INTERPRETER_FORWARD_CONFIG
    table = FORWARD_TMA_CONFIGS if tma else FORWARD_CONFIGS
    return _shrink_for_short_sequence(table[head_dim], seq_len)


def _tma_scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    # device-side tensor descriptors live in global scratch that Triton asks for
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_forward_tma(k: Tensor, v: Tensor, head_dim: int) -> bool:
    """The TMA forward where it was measured faster and the copy engine can address
    K/V: a Hopper (or newer) GPU, compiled kernels, 16-byte aligned heads and rows."""
    return head_dim in FORWARD_TMA_CONFIGS and _tma_addressable(k, v)


def use_dkdv_tma(q: Tensor, do: Tensor, head_dim: int) -> bool:
    """The dK/dV kernel reading Q and dO through TMA, where measured faster."""
    return head_dim in BACKWARD_DKDV_TMA_CONFIGS and _tma_addressable(q, do)


def _tma_addressable(*tensors: Tensor) -> bool:
    if _running_in_interpreter(tensors[0]):
        return False
    if (
        not hasattr(tl, "make_tensor_descriptor")
        or torch.cuda.get_device_capability(tensors[0].device)[0] < 9
    ):
        return False
    # (storage offsets, not data_ptr: under Inductor's tracing these are fake tensors;
    # allocations themselves start 16-byte aligned)
    for t in tensors:
        offsets = (t.storage_offset(), *t.stride()[:3])
        if any(offset * t.element_size() % 16 for offset in offsets):
            return False
    return True


def backward_dkdv_config(
    head_dim: int, seq_len: int, interpreter: bool = False, tma: bool = False
) -> BlockConfig:
    if interpreter:
        return INTERPRETER_DKDV_CONFIG
    table = BACKWARD_DKDV_TMA_CONFIGS if tma else BACKWARD_DKDV_CONFIGS
    return _shrink_for_short_sequence(table[head_dim], seq_len)


def backward_dq_config(head_dim: int, seq_len: int, interpreter: bool = False) -> BlockConfig:
    if interpreter:
        return INTERPRETER_DQ_CONFIG
    return _shrink_for_short_sequence(BACKWARD_DQ_CONFIGS[head_dim], seq_len)


# ---------------------------------------------------------------------------------
# Launch wrappers
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shapes:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    group_size: int
    seq_len: int
    head_dim: int


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float) -> _Shapes:
    """Validate shapes/dtypes; raise ValueError for anything the kernels don't do."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    batch, num_q_heads, seq_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    kv_batch, num_kv_heads, kv_seq_len, kv_head_dim = k.shape
    if (kv_batch, kv_seq_len, kv_head_dim) != (batch, seq_len, head_dim):
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in B, T and D")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"Hq={num_q_heads} is not a multiple of Hkv={num_kv_heads}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype of {SUPPORTED_DTYPES}; got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    if not scale > 0:
        # The forward folds the scale into max(scores) * scale, valid for scale > 0.
        raise ValueError(f"scale must be positive, got {scale}")
    return _Shapes(
        batch=batch,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        group_size=num_q_heads // num_kv_heads,
        seq_len=seq_len,
        head_dim=head_dim,
    )


def _unit_last_stride(t: Tensor) -> Tensor:
    # The kernels address the head dim as contiguous (vectorised loads); any other
    # stride is allowed on B, H and T.
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    shapes: _Shapes,
    config: BlockConfig,
    tma: bool = False,
) -> tuple[Tensor, Tensor]:
    out = torch.empty(
        (shapes.batch, shapes.num_q_heads, shapes.seq_len, shapes.head_dim),
        dtype=q.dtype,
        device=q.device,
    )
    lse = torch.empty(
        (shapes.batch, shapes.num_q_heads, shapes.seq_len), dtype=torch.float32, device=q.device
    )
    grid = (shapes.batch * shapes.num_q_heads, triton.cdiv(shapes.seq_len, config.block_m))
    if tma:
        # (Inductor sets its own allocator before each launch of a compiled graph)
        triton.set_allocator(_tma_scratch)
    traceable(_forward_kernel)[grid](
        q,
        k,
        v,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        shapes.num_q_heads,
        shapes.group_size,
        shapes.seq_len,
        scale * LOG2E,
        HEAD_DIM=shapes.head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        EVEN_T=shapes.seq_len % config.block_m == 0,
        TMA=tma,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out, lse


def _launch_backward_preprocess(do: Tensor, o: Tensor, shapes: _Shapes) -> Tensor:
    delta = torch.empty(
        (shapes.batch, shapes.num_q_heads, shapes.seq_len), dtype=torch.float32, device=o.device
    )
    block = 16 if _running_in_interpreter(o) else BACKWARD_PREPROCESS_BLOCK
    grid = (shapes.batch * shapes.num_q_heads, triton.cdiv(shapes.seq_len, block))
    traceable(_backward_preprocess_kernel)[grid](
        o,
        do,
        delta,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        shapes.num_q_heads,
        shapes.seq_len,
        HEAD_DIM=shapes.head_dim,
        BLOCK_M=block,
        num_warps=4,
    )
    return delta


def _launch_backward_dkdv(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    delta: Tensor,
    scale: float,
    shapes: _Shapes,
    config: BlockConfig,
    tma: bool = False,
) -> tuple[Tensor, Tensor]:
    dk = torch.empty(
        (shapes.batch, shapes.num_kv_heads, shapes.seq_len, shapes.head_dim),
        dtype=k.dtype,
        device=k.device,
    )
    dv = torch.empty_like(dk, dtype=v.dtype)
    grid = (shapes.batch * shapes.num_kv_heads, triton.cdiv(shapes.seq_len, config.block_n))
    if tma:
        triton.set_allocator(_tma_scratch)
    traceable(_backward_dkdv_kernel)[grid](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        dv.stride(0),
        dv.stride(1),
        dv.stride(2),
        shapes.num_kv_heads,
        shapes.group_size,
        shapes.seq_len,
        scale * LOG2E,
        scale,
        HEAD_DIM=shapes.head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        EVEN_T=shapes.seq_len % config.block_n == 0,
        TMA=tma,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return dk, dv


def _launch_backward_dq(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    delta: Tensor,
    scale: float,
    shapes: _Shapes,
    config: BlockConfig,
) -> Tensor:
    dq = torch.empty(
        (shapes.batch, shapes.num_q_heads, shapes.seq_len, shapes.head_dim),
        dtype=q.dtype,
        device=q.device,
    )
    grid = (shapes.batch * shapes.num_q_heads, triton.cdiv(shapes.seq_len, config.block_m))
    traceable(_backward_dq_kernel)[grid](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        shapes.num_q_heads,
        shapes.group_size,
        shapes.seq_len,
        scale * LOG2E,
        scale,
        HEAD_DIM=shapes.head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        EVEN_T=shapes.seq_len % config.block_m == 0,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return dq


def gqa_attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal GQA attention forward.

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D); any strides on B, H, T.
    Returns o (B, Hq, T, D) contiguous in q.dtype and lse (B, Hq, T) float32, the
    natural-log log-sum-exp of the scaled, causally masked scores (what
    `gqa_attention_bwd` expects).  Raises ValueError for unsupported inputs (head
    dim not in SUPPORTED_HEAD_DIMS, mixed dtypes, Hq not a multiple of Hkv).
    """
    shapes = _check_inputs(q, k, v, scale)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    if q.numel() == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
            q.shape[:3], dtype=torch.float32
        )
    tma = use_forward_tma(k, v, shapes.head_dim)
    config = forward_config(shapes.head_dim, shapes.seq_len, _running_in_interpreter(q), tma)
    return _launch_forward(q, k, v, scale, shapes, config, tma)


def gqa_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal GQA attention backward from the forward's o and (natural-log) lse.

    Returns dq (B, Hq, T, D) in q.dtype and dk, dv (B, Hkv, T, D) in k/v's dtype,
    all contiguous.
    """
    shapes = _check_inputs(q, k, v, scale)
    expected_out_shape = (shapes.batch, shapes.num_q_heads, shapes.seq_len, shapes.head_dim)
    if tuple(do.shape) != expected_out_shape or tuple(o.shape) != expected_out_shape:
        raise ValueError(
            f"do {tuple(do.shape)} and o {tuple(o.shape)} must have shape {expected_out_shape}"
        )
    if tuple(lse.shape) != expected_out_shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {expected_out_shape[:3]}")
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    do, o = _unit_last_stride(do), _unit_last_stride(o)
    if q.numel() == 0:
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
        )
    # The kernels index lse/delta as dense (B, Hq, T).
    lse = lse.contiguous()
    interpreter = _running_in_interpreter(q)
    delta = _launch_backward_preprocess(do, o, shapes)
    dkdv_tma = use_dkdv_tma(q, do, shapes.head_dim)
    dk, dv = _launch_backward_dkdv(
        do,
        q,
        k,
        v,
        lse,
        delta,
        scale,
        shapes,
        backward_dkdv_config(shapes.head_dim, shapes.seq_len, interpreter, dkdv_tma),
        dkdv_tma,
    )
    dq = _launch_backward_dq(
        do,
        q,
        k,
        v,
        lse,
        delta,
        scale,
        shapes,
        backward_dq_config(shapes.head_dim, shapes.seq_len, interpreter),
    )
    return dq, dk, dv


def gqa_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Naive causal GQA attention: K/V repeated over the group, masked softmax in
    (at least) float32.  Differentiable; returns q.dtype.  O(T^2) memory."""
    group_size = q.shape[1] // k.shape[1]
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(group_size, dim=1).to(compute_dtype)
    v = v.repeat_interleave(group_size, dim=1).to(compute_dtype)
    scores = torch.matmul(q.to(compute_dtype), k.transpose(-2, -1)) * scale
    seq_len = q.shape[-2]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)
