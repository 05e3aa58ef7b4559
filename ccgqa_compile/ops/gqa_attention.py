"""``torch.ops.ccgqa.gqa_attention``: causal grouped-query attention, fused fwd and bwd.

q (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq a multiple of Hkv; query head h uses
key/value head h // (Hq / Hkv); scores are ``scale * q . k``, causally masked. Returns the
output and the natural-log logsumexp of each score row (saved for the backward, which
recomputes the probabilities instead of storing the T x T matrix). The GQA reduction of
dK/dV over a group's query heads happens in the kernel; nothing repeats K/V.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.library import triton_op

from ._dispatch import composite_op, compute_dtype, unit_last_stride, use_triton

KERNEL_HEAD_DIMS = (16, 32, 64, 128)


def _repeat_kv(t: Tensor, groups: int) -> Tensor:
    return t.repeat_interleave(groups, dim=1) if groups > 1 else t


def _scores(q: Tensor, k: Tensor, scale: float, acc: torch.dtype) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    s = (q.to(acc) @ _repeat_kv(k, groups).to(acc).transpose(-1, -2)) * scale
    t_q, t_k = q.shape[-2], k.shape[-2]
    causal = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~causal, float("-inf"))


def _gqa_attention_composite(
    q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(q.dtype, k.dtype, v.dtype)
    s = _scores(q, k, scale, acc)
    lse = torch.logsumexp(s, dim=-1)
    # softmax normalised by its own sum (as eager's), not exp(s - lse): on scores of
    # magnitude S, lse's rounding (S * eps) scales every probability of the row
    p = torch.softmax(s, dim=-1)
    o = p @ _repeat_kv(v, q.shape[1] // v.shape[1]).to(acc)
    return o.to(q.dtype), lse.to(torch.float32 if acc != torch.float64 else acc)


def _gqa_attention_bwd_composite(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc = compute_dtype(q.dtype, k.dtype, v.dtype, do.dtype)
    groups = q.shape[1] // k.shape[1]
    b, h_kv, t, d = k.shape
    p = torch.softmax(_scores(q, k, scale, acc), dim=-1)  # the forward's, not exp(s - lse)
    do_, v_r = do.to(acc), _repeat_kv(v, groups).to(acc)
    dv_r = p.transpose(-1, -2) @ do_
    dp = do_ @ v_r.transpose(-1, -2)
    # sum_j p_ij dp_ij from the materialised p and dp, as autograd's softmax backward
    # takes it (not do . o, the kernels' one-pass form): where a row's softmax saturates,
    # dp - delta cancels, and a delta summed from the same rounded dp cancels exactly
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ _repeat_kv(k, groups).to(acc)) * scale
    dk_r = (ds.transpose(-1, -2) @ q.to(acc)) * scale

    def reduce_group(x: Tensor) -> Tensor:
        return x.view(b, h_kv, groups, t, d).sum(2)

    return dq.to(q.dtype), reduce_group(dk_r).to(k.dtype), reduce_group(dv_r).to(v.dtype)


gqa_attention_composite = composite_op("gqa_attention_composite", _gqa_attention_composite)
gqa_attention_bwd_composite = composite_op(
    "gqa_attention_backward_composite", _gqa_attention_bwd_composite
)


def check_shapes(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """None when the op computes what the user's attention computes, else why not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, H, T, D)"
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    b, h_q, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} do not pair"
    if h_q % k.shape[1]:
        return f"{h_q} query heads are not a multiple of {k.shape[1]} kv heads"
    return None


def _fp32_dots_allowed(q: Tensor) -> bool:
    """The kernel's float32 dots are tf32 on the GPU (~3e-4 relative error). Eager fp32
    attention uses IEEE fp32 matmuls unless the user allowed tf32, so fp32 takes the
    kernel only then (``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.set_float32_matmul_precision("high")``); otherwise the exact composite.
    The interpreter computes fp32 dots in IEEE fp32: no restriction there."""
    return q.dtype != torch.float32 or not q.is_cuda or torch.backends.cuda.matmul.allow_tf32


def _kernel_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (
        use_triton(q, k, v)
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] in KERNEL_HEAD_DIMS
        and _fp32_dots_allowed(q)
    )


@triton_op("ccgqa::gqa_attention", mutates_args=())
def gqa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    if _kernel_ok(q, k, v):
        from ..kernels import gqa_attention as kernels

        q, k, v = (unit_last_stride(t) for t in (q, k, v))
        return kernels.gqa_attention_fwd(q, k, v, scale)
    return gqa_attention_composite(q, k, v, scale)


@triton_op("ccgqa::gqa_attention_backward", mutates_args=())
def gqa_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _kernel_ok(q, k, v) and use_triton(do) and do.dtype == q.dtype:
        from ..kernels import gqa_attention as kernels

        do, q, k, v, o = (unit_last_stride(t) for t in (do, q, k, v, o))
        return kernels.gqa_attention_bwd(do, q, k, v, o, lse, scale)
    return gqa_attention_bwd_composite(do, q, k, v, o, lse, scale)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_o: Tensor, _grad_lse: Tensor | None):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ccgqa.gqa_attention_backward(grad_o, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


gqa_attention.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# A mask known only at run time (a padding mask built from the user's attention_mask):
# the fused path runs when it is exactly causal, else the exact masked composite.
# ----------------------------------------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on its gradient contiguous."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def contiguous_grad(x: Tensor) -> Tensor:
    """``x``, with the gradient reaching it made contiguous. Put after an SDPA call we emit:
    cuDNN's SDPA backward, given a gradient laid out unlike earlier calls of the same shapes,
    has returned wrong dq/dk/dv (torch 2.11, H200: a cached execution plan reused), so the
    SDPA cores we emit always receive one layout."""
    return _ContiguousGrad.apply(x)


def causal_mask_problem(mask: Tensor, t_q: int, t_k: int) -> str | None:
    """None when ``mask`` (bool: True attends; float: added to the scores) is causal
    for every batch and head, else what differs."""
    if t_q != t_k or mask.dim() < 2 or mask.shape[-2:] != (t_q, t_k):
        return f"mask {tuple(mask.shape)} is not a ({t_q}, {t_k}) mask"
    keep = torch.ones(t_q, t_k, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        blocked = mask[~keep.expand_as(mask)]
        if blocked.numel() and not bool((blocked <= -1e30).all()):
            return "masked entries are not -inf (or the dtype's lowest value)"
        if not bool((mask[keep.expand_as(mask)] == 0).all()):
            return "the mask adds a bias to allowed scores"
    if not torch.equal(allowed, keep.expand_as(allowed)):
        return "the mask is not causal"
    return None


def causal_over_prefix(mask: Tensor, t_q: int, t_k: int) -> bool:
    """Whether ``mask`` lets query i see exactly keys 0..i: causal over the first ``t_q``
    keys, every later one blocked (a prefill at position 0 over a static cache longer than
    the prompt, as gpt-fast writes it)."""
    if t_k < t_q or mask.dim() < 2 or tuple(mask.shape[-2:]) != (t_q, t_k):
        return False
    # one comparison against the causal pattern over all t_k keys and one host sync: the
    # check runs on every call of the op
    keep = _causal_rows(t_q, t_k, str(mask.device))
    if mask.dtype == torch.bool:
        return not bool((mask != keep).any())
    return bool(torch.where(keep, mask == 0, mask <= -1e30).all())


@functools.lru_cache(maxsize=16)
def _causal_rows(t_q: int, t_k: int, device: str) -> Tensor:
    """True where query i may see key j (j <= i), over t_k >= t_q keys."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril()


def _prefix(x: Tensor, t: int) -> Tensor:
    return x if x.shape[-2] == t else x[:, :, :t].contiguous()


def _sdpa_with_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """What the user wrote: SDPA with the mask (query heads grouped over k/v's heads)."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@torch.library.custom_op(
    "ccgqa::gqa_attention_masked", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,)
)
def gqa_attention_masked(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """SDPA with a bool or additive ``mask`` known only at run time (HF's padding mask; a
    prefill's rows of a causal table over a longer static cache): our causal op, over the
    first T keys, when the mask is causal there and blocks every later key (checked on
    the device: one host sync), else the SDPA call the user wrote. Second output: the
    causal op's logsumexp (zeros on the SDPA path, which the backward recomputes)."""
    t = q.shape[-2]
    if causal_over_prefix(mask, t, k.shape[-2]):
        o, lse = torch.ops.ccgqa.gqa_attention(q, _prefix(k, t), _prefix(v, t), scale)
        return o.contiguous(), lse.contiguous()
    out = _sdpa_with_mask(q, k, v, mask, scale)
    return out.contiguous(), q.new_zeros(q.shape[:-1], dtype=torch.float32)


@gqa_attention_masked.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _masked_setup(ctx, inputs, output) -> None:
    q, k, v, mask, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, mask, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


@torch.library.custom_op(
    "ccgqa::gqa_attention_masked_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,)
)
def gqa_attention_masked_backward(
    grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, o: Tensor, lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of ``gqa_attention_masked``, deciding again on the mask (an opaque op:
    the decision reads the mask's values)."""
    t, t_k = q.shape[-2], k.shape[-2]
    if causal_over_prefix(mask, t, t_k):
        dq, dk, dv = torch.ops.ccgqa.gqa_attention_backward(
            grad_o, q, _prefix(k, t), _prefix(v, t), o, lse, scale
        )
        pad = (0, 0, 0, t_k - t)  # the keys after the prefix get no gradient
        grads = (dq, torch.nn.functional.pad(dk, pad), torch.nn.functional.pad(dv, pad))
    else:
        grads = _sdpa_with_mask_backward(grad_o, q, k, v, mask, scale)
    return tuple(g.contiguous() for g in grads)


def _sdpa_with_mask_backward(
    grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """SDPA's gradients with the mask, written out in fp32 (fp64 for fp64; an op's implementation runs
    below autograd, so the forward cannot be differentiated again here). A row with every
    key masked has zero probabilities, as SDPA's forward gives it."""
    hq, hkv = q.shape[1], k.shape[1]
    groups = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, gf = q.to(acc), grad_o.to(acc)
    kf = k.to(acc).repeat_interleave(groups, dim=1)
    vf = v.to(acc).repeat_interleave(groups, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.to(acc)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    dv = p.transpose(-1, -2) @ gf
    dp = gf @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    b, t_k, d = k.shape[0], k.shape[2], k.shape[3]
    dk = dk.view(b, hkv, groups, t_k, d).sum(2)
    dv = dv.view(b, hkv, groups, t_k, v.shape[3]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@gqa_attention_masked_backward.register_fake
def _(grad_o, q, k, v, mask, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _masked_backward(ctx, grad_o: Tensor, _grad_lse: Tensor | None):
    q, k, v, mask, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ccgqa.gqa_attention_masked_backward(
        grad_o, q, k, v, mask, o, lse, ctx.scale
    )
    return dq, dk, dv, None, None


gqa_attention_masked.register_autograd(_masked_backward, setup_context=_masked_setup)
