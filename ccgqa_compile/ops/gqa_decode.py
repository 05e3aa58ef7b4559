"""``torch.ops.ccgqa.gqa_decode_attention``: a few new query tokens attending a KV cache.

q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D), Hq a multiple of Hkv (query head h reads kv head
h // (Hq / Hkv)); ``mask`` None, bool (True: visible) or additive, broadcastable to
(B, Hq, Tq, Tk). The function is SDPA's with that mask and no causal rule of its own:
``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)``,
which is what a decode step written with SDPA computes (HF passes no mask for one token,
gpt-fast a bool row of its causal table at the token's position).

On CUDA with a bool mask or none, the split-KV Triton kernel (kernels/gqa_decode.py)
reads the cache once per step for all query heads of a group. Anything else (CPU, fp64,
an additive mask, a head dim without a kernel) runs that SDPA call itself. Rows whose keys
are all masked are zeros on both paths. Differentiable (the composite backward), though a
decode step is normally run without grad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from ._dispatch import composite_op, unit_last_stride, use_triton
from .gqa_attention import _fp32_dots_allowed, _sdpa_with_mask_backward

KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)


def _sdpa_decode(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """What the user wrote: SDPA over the cache (K/V heads shared by each query group).
    A row with every key masked is zeros (SDPA's math backend gives that; others NaN)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # enable_gqa is not on every SDPA backend; repeating is exact
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None and mask.dtype == torch.bool:
        seen = mask.expand(*q.shape[:-1], k.shape[-2]).any(-1, keepdim=True)
        out = out.masked_fill(~seen, 0.0)
    return out.contiguous()


gqa_decode_attention_composite = composite_op("gqa_decode_attention_composite", _sdpa_decode)


def _kernel_ok(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    from .. import config

    return (
        use_triton(q, k, v)
        # a longer chunk (a graph compiled for any query length) runs SDPA's kernels
        and q.shape[-2] <= config.DECODE_MAX_QUERY_LEN
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] in KERNEL_HEAD_DIMS
        and k.shape[-1] == q.shape[-1] == v.shape[-1]
        and (mask is None or mask.dtype == torch.bool)
        and _fp32_dots_allowed(q)
    )


@triton_op("ccgqa::gqa_decode_attention", mutates_args=())
def gqa_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    if _kernel_ok(q, k, v, mask):
        from ..kernels import gqa_decode as kernels

        q, k, v = (unit_last_stride(t) for t in (q, k, v))
        return kernels.gqa_decode_attention_fwd(q, k, v, mask, scale)
    return gqa_decode_attention_composite(q, k, v, mask, scale)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, scale = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale = scale


def _backward(ctx, grad_o: Tensor):
    q, k, v, mask = ctx.saved_tensors
    if mask is None:
        mask = torch.ones((), dtype=torch.bool, device=q.device)
    dq, dk, dv = _sdpa_with_mask_backward(grad_o, q, k, v, mask, ctx.scale)
    return dq, dk, dv, None, None


gqa_decode_attention.register_autograd(_backward, setup_context=_setup_context)

