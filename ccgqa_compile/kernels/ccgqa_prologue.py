"""The CCGQA q/k prologue as one Triton kernel per direction, plus a naive reference.

From the pre-conv projections ``q_pre`` (B, T, Hq*D) and ``k_pre`` (B, T, Hkv*D) to the
rotated ``q`` (B, Hq, T, D) and ``k`` (B, Hkv, T, D) that attention consumes
(../../../shared/design/ccgqa.md, steps 3 to 6), per head and time step::

    y1  = conv1(pad(x))        depthwise, kernel K1, causal (left) zero padding
    y2  = conv2(pad(y1))       grouped, one group per head (a D x D map per tap), kernel K2
    raw = y2 + m               m_q[h] = (q_pre[h] + k_pre[h // G]) / 2, m_k[j] = mean_g m_q
    u   = raw / max(|raw|, eps)
    out = u * norm_scale * beta            beta = exp(temp[j]) or temp[j] for k, 1 for q
    out = out * cos + rot(out) * sin       on the first ``rotary_dim`` dims (rotate-half or
                                           interleaved pairs); the other dims pass through

Both convolutions are causally padded with zeros *separately*: y1 at negative times is 0,
not conv1's bias.

Launch layout. Forward: one program per (batch, block of BLOCK_T time steps, kv head j);
it handles the G query heads of group j and then kv head j, so the qk-mean sum over the
group stays in registers. The conv halo ((K1 - 1) + (K2 - 1) earlier rows) is read as
shifted tile loads that hit L1/L2; conv2 is one ``tl.dot`` (BLOCK_T x D x D) per tap.

Backward: the output gradient at time t reaches q_pre/k_pre at t - s for s in
0..(K1 - 1) + (K2 - 1), so a program owning rows [t0, t0 + BLOCK_T) gathers the gradient
w.r.t. the conv output (``draw``) at the shifted rows t0 + s, recomputing the forward
(conv chain, norm) there instead of storing anything. Weight gradients are reductions
over B*T: a persistent grid of P programs per kv head walks the (batch, time block) items
and accumulates into its own row of a float32 partial buffer (no atomics, deterministic);
torch sums the P rows afterwards.

Kernel limits: D a power of two >= 16 (``tl.dot``), K1, K2 in 1..4, rotate-half RoPE with
``rotary_dim`` a power of two (interleaved: any even ``rotary_dim``), tables that differ
at most per batch and time. Everything else is for the composite in ops/ccgqa_prologue.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ccgqa_prologue_reference"]

TEMPERATURE_MODES = {"none": 0, "exp": 1, "raw": 2}
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
    q = F.normalize(q, dim=-1, eps=eps) * norm_scale
    k = F.normalize(k, dim=-1, eps=eps) * norm_scale
    if temperature != "none":
        beta = temp.to(acc).exp() if temperature == "exp" else temp.to(acc)
        k = k * beta.reshape(-1).expand(kv_heads).reshape(1, 1, kv_heads, 1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
    if rotary_dim:
        # tables broadcast to (B, 1, T, R)
        cos_t = cos.to(acc).reshape(-1, 1, t, rotary_dim)
        sin_t = sin.to(acc).reshape(-1, 1, t, rotary_dim)

        def rope(x):
            x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
            x_rot = x_rot * cos_t + _rotate_reference(x_rot, interleaved) * sin_t
            return torch.cat((x_rot, x_pass), dim=-1)

        q, k = rope(q), rope(k)
    return q.to(q_pre.dtype), k.to(k_pre.dtype)
