"""``torch.ops.ccgqa.ccgqa_prologue``: the CCGQA q/k prologue, fused fwd and bwd.

q_pre (B, T, Hq*D), k_pre (B, T, Hkv*D) -> q (B, Hq, T, D), k (B, Hkv, T, D), as
../shared/design/ccgqa.md steps 3 to 6 describe them, in both of its forms:

- two causal convolutions per stream, each zero-padded on the left, with optional biases.
  conv1 (kernel K1) is depthwise (weight (C, 1, K1): ZAYA's, patterns/ccgqa.py
  ``CCGQAttention``) or grouped per head ((C, D, K1): the original project's variant,
  ``CCGQAAttentionSeed``); conv2 (K2) grouped per head ((C, D, K2)) or dense across the
  stream's heads ((C, C, K2), the original project's);
- the qk-mean coupling from the pre-conv projections (``qk_mean``): "group" adds
  m_q[h] = (q_pre[h] + k_pre[h // G]) / 2 to q and the mean of m_q over group j to k;
  "all" (the original project's) adds half the mean over all kv heads of k_pre to q and
  half the mean over all query heads of q_pre to k; "none" adds nothing;
- L2 normalisation ``x / max(|x|, eps)`` (``eps_mode`` "clamp"; "add": ``x / (|x| + eps)``;
  "sqrt": ``x / sqrt(|x|^2 + eps)``) times ``norm_scale``; k times beta = exp(temp)
  (``"exp"``), temp (``"raw"``) or 1 (``"none"``), temp holding one value per kv head or one
  shared value;
- RoPE with cos/sin tables (``x*cos + rot(x)*sin`` on ``rotary_dim`` dims from
  ``rotary_start``, rotate-half or ``interleaved`` pairs; tables broadcast to
  (B, 1, T, rotary_dim), no gradient).

Two kernel families compute it (kernels/ccgqa_prologue.py for depthwise conv1, per-head
conv2 and a group mean; kernels/ccgqa_seed_prologue.py for the original project's form,
whose dense conv2 couples a whole stream); every other combination, device or dtype takes
the exact composite below. Gradients flow to q_pre, k_pre, every conv weight and bias, and
temp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from ._dispatch import composite_op, compute_dtype, use_triton

KERNEL_HEAD_DIMS = (16, 32, 64, 128)
KERNEL_MAX_CONV = 4
TEMPERATURES = ("exp", "raw", "none")
# the qk-mean coupling: per kv-head group (ZAYA's), over all heads (the original
# project's), or none
QK_MEANS = ("group", "all", "none")
# where the L2 normalisation's eps goes: max(|x|, eps), |x| + eps, sqrt(|x|^2 + eps)
EPS_MODES = ("clamp", "add", "sqrt")


def check_args(
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
    qk_mean: str,
    temperature: str,
    rotary_dim: int,
    rotary_start: int = 0,
) -> str | None:
    """None when the op computes what was asked, else why not (the op raises it)."""
    problem = projections_problem(q_pre, k_pre)
    if problem is not None:
        return problem
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} kv heads"
    e_q, e_kv = q_pre.shape[-1], k_pre.shape[-1]
    if e_q % heads or e_kv != kv_heads * (e_q // heads) or e_q == 0:
        return f"widths {e_q}, {e_kv} do not split into {heads}, {kv_heads} heads of one size"
    d = e_q // heads
    k1, k2 = q_conv1_weight.shape[-1], q_conv2_weight.shape[-1]
    if k1 < 1 or k2 < 1:
        return "conv kernels must have at least one tap"
    for name, width, w1, w2 in (
        ("q", e_q, q_conv1_weight, q_conv2_weight),
        ("k", e_kv, k_conv1_weight, k_conv2_weight),
    ):
        if tuple(w1.shape) not in ((width, 1, k1), (width, d, k1)):
            return (
                f"{name} conv1 must be depthwise ({width}, 1, {k1}) or grouped per head "
                f"({width}, {d}, {k1}), got {tuple(w1.shape)}"
            )
        if tuple(w2.shape) not in ((width, d, k2), (width, width, k2)):
            return (
                f"{name} conv2 must be grouped per head ({width}, {d}, {k2}) or dense "
                f"({width}, {width}, {k2}), got {tuple(w2.shape)}"
            )
    for name, width, bias in (
        ("q conv1", e_q, q_conv1_bias),
        ("q conv2", e_q, q_conv2_bias),
        ("k conv1", e_kv, k_conv1_bias),
        ("k conv2", e_kv, k_conv2_bias),
    ):
        if bias is not None and tuple(bias.shape) != (width,):
            return f"{name} bias must have shape ({width},), got {tuple(bias.shape)}"
    if qk_mean not in QK_MEANS:
        return f"qk_mean must be one of {QK_MEANS}, got {qk_mean!r}"
    if temperature not in TEMPERATURES:
        return f"temperature must be one of {TEMPERATURES}, got {temperature!r}"
    if (temp is None) != (temperature == "none"):
        return f"temperature {temperature!r} with temp={'None' if temp is None else 'a tensor'}"
    if temp is not None and temp.numel() not in (1, kv_heads):
        return f"temp must hold 1 or {kv_heads} values, got shape {tuple(temp.shape)}"
    if rotary_dim < 0 or rotary_dim % 2 or rotary_dim > d:
        return f"rotary_dim must be even and in [0, head_dim={d}], got {rotary_dim}"
    if (
        rotary_start < 0
        or rotary_start % 2
        or rotary_start + rotary_dim > d
        or (rotary_start and not rotary_dim)
    ):
        return f"RoPE on dims {rotary_start}..{rotary_start + rotary_dim} does not fit head_dim={d}"
    if (cos is None or sin is None) != (rotary_dim == 0):
        return "cos and sin are needed exactly when rotary_dim > 0"
    if rotary_dim:
        return tables_problem(cos, sin, *q_pre.shape[:2], rotary_dim)
    return None


def projections_problem(q_pre: Tensor, k_pre: Tensor) -> str | None:
    """The checks every prologue op makes of its two projections (B, T, H*D)."""
    if q_pre.dim() != 3 or k_pre.dim() != 3:
        return "q_pre and k_pre must be 3-D (B, T, H*D)"
    if q_pre.shape[:2] != k_pre.shape[:2]:
        return f"q_pre {tuple(q_pre.shape)} and k_pre {tuple(k_pre.shape)} differ in (B, T)"
    if q_pre.dtype != k_pre.dtype:
        return f"q_pre is {q_pre.dtype} but k_pre is {k_pre.dtype}"
    return None


def tables_problem(cos: Tensor, sin: Tensor, b: int, t: int, width: int) -> str | None:
    """RoPE tables (..., T, width) that broadcast to (B, 1, T, width): at most per batch
    and time, never per head."""
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() > 4 or table.shape[-1] != width:
            return f"{name} {tuple(table.shape)} is not a (..., T, {width}) table"
        try:
            shape = torch.broadcast_shapes(table.shape, (b, 1, t, width))
        except RuntimeError:
            return f"{name} {tuple(table.shape)} does not broadcast to (B, 1, T, {width})"
        if tuple(shape) != (b, 1, t, width):
            return f"{name} {tuple(table.shape)} differs per head or exceeds (B, 1, T, {width})"
    return None


# ----------------------------------------------------------------------------
# Exact composite (plain PyTorch, fp32 or fp64 compute) for everything the op accepts.
# ----------------------------------------------------------------------------


def _groups(weight: Tensor) -> int:
    """A conv's groups from its (C, C / groups, K) weight: depthwise, per head or dense."""
    return weight.shape[0] // weight.shape[1]


def _conv_chain(x: Tensor, w1: Tensor, b1, w2: Tensor, b2, acc):
    """(B, T, C) -> conv2(pad(conv1(pad(x)))) as (B, C, T), with both padded inputs."""
    x_pad = F.pad(x.to(acc).transpose(1, 2), (w1.shape[-1] - 1, 0))
    y1 = F.conv1d(x_pad, w1.to(acc), b1.to(acc) if b1 is not None else None, groups=_groups(w1))
    y1_pad = F.pad(y1, (w2.shape[-1] - 1, 0))
    y2 = F.conv1d(y1_pad, w2.to(acc), b2.to(acc) if b2 is not None else None, groups=_groups(w2))
    return y2, x_pad, y1_pad


def _conv_chain_backward(dy2: Tensor, x_pad, y1_pad, w1, b1, w2, b2):
    """Gradients of ``_conv_chain`` w.r.t. x (B, T, C) and the weights and biases."""
    acc = dy2.dtype
    channels = dy2.shape[1]
    k1, k2 = w1.shape[-1], w2.shape[-1]
    d_y1_pad, dw2, db2 = torch.ops.aten.convolution_backward(
        dy2, y1_pad, w2.to(acc), [channels] if b2 is not None else None,
        [1], [0], [1], False, [0], _groups(w2), [True, True, b2 is not None],
    )  # fmt: skip
    d_x_pad, dw1, db1 = torch.ops.aten.convolution_backward(
        d_y1_pad[..., k2 - 1 :], x_pad, w1.to(acc), [channels] if b1 is not None else None,
        [1], [0], [1], False, [0], _groups(w1), [True, True, b1 is not None],
    )  # fmt: skip
    return d_x_pad[..., k1 - 1 :].transpose(1, 2), dw1, db1, dw2, db2


def _rotate(x: Tensor, interleaved: bool) -> Tensor:
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _tables(cos: Tensor, sin: Tensor, b: int, t: int, rotary_dim: int, acc):
    shape = (b, 1, t, rotary_dim)
    return cos.to(acc).expand(shape), sin.to(acc).expand(shape)


def _beta(temp: Tensor | None, temperature: str, kv_heads: int, acc) -> Tensor | None:
    if temperature == "none":
        return None
    t = temp.to(acc).reshape(-1).expand(kv_heads)
    return t.exp() if temperature == "exp" else t


def _raw(q_pre, k_pre, qw1, qb1, qw2, qb2, kw1, kb1, kw2, kb2, heads, kv_heads, qk_mean, acc):
    """conv output plus qk mean, as (B, T, H, D), and the conv chains' padded inputs."""
    b, t, e_q = q_pre.shape
    d, g = e_q // heads, heads // kv_heads
    yq, xq_pad, y1q_pad = _conv_chain(q_pre, qw1, qb1, qw2, qb2, acc)
    yk, xk_pad, y1k_pad = _conv_chain(k_pre, kw1, kb1, kw2, kb2, acc)
    q_raw = yq.transpose(1, 2).reshape(b, t, heads, d)
    k_raw = yk.transpose(1, 2).reshape(b, t, kv_heads, d)
    qh = q_pre.to(acc).reshape(b, t, heads, d)
    kh = k_pre.to(acc).reshape(b, t, kv_heads, d)
    if qk_mean == "group":
        m_q = (qh + kh.repeat_interleave(g, dim=2)) / 2
        q_raw = q_raw + m_q
        k_raw = k_raw + m_q.reshape(b, t, kv_heads, g, d).mean(3)
    elif qk_mean == "all":
        q_raw = q_raw + kh.mean(2, keepdim=True) / 2
        k_raw = k_raw + qh.mean(2, keepdim=True) / 2
    return q_raw, k_raw, (xq_pad, y1q_pad, xk_pad, y1k_pad)


def _inverse_norm(raw: Tensor, eps: float, eps_mode: str) -> tuple[Tensor, Tensor]:
    """(inv, k): inv = 1 / the normalisation's denominator, so unit = raw * inv, and k
    the factor of its backward, d raw = d unit * inv - raw * (raw . d unit) * k."""
    sumsq = raw.square().sum(-1, keepdim=True)
    norm = sumsq.sqrt()
    if eps_mode == "clamp":
        inv = 1 / norm.clamp_min(eps)
        return inv, inv**3 * (norm >= eps)
    if eps_mode == "add":
        inv = 1 / (norm + eps)
        return inv, torch.where(norm > 0, inv**2 / norm, torch.zeros_like(norm))
    if eps_mode == "sqrt":
        inv = torch.rsqrt(sumsq + eps)
        return inv, inv**3
    raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {eps_mode!r}")


def _normalize(raw: Tensor, eps: float, eps_mode: str = "clamp") -> Tensor:
    return raw * _inverse_norm(raw, eps, eps_mode)[0]


def _ccgqa_prologue_composite(
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
    qk_mean: str,
    temperature: str,
    norm_scale: float,
    eps: float,
    rotary_dim: int,
    interleaved: bool,
    eps_mode: str = "clamp",
    rotary_start: int = 0,
) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(q_pre.dtype, k_pre.dtype, q_conv2_weight.dtype, k_conv2_weight.dtype)
    b, t, _ = q_pre.shape
    q_raw, k_raw, _ = _raw(
        q_pre, k_pre, q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias,
        k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias,
        heads, kv_heads, qk_mean, acc,
    )  # fmt: skip
    q = _normalize(q_raw, eps, eps_mode) * norm_scale
    k = _normalize(k_raw, eps, eps_mode) * norm_scale
    beta = _beta(temp, temperature, kv_heads, acc)
    if beta is not None:
        k = k * beta.view(1, 1, kv_heads, 1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if rotary_dim:
        c, s = _tables(cos, sin, b, t, rotary_dim, acc)
        lo, hi = rotary_start, rotary_start + rotary_dim

        def rope(x):
            x_rot = x[..., lo:hi] * c + _rotate(x[..., lo:hi], interleaved) * s
            return torch.cat((x[..., :lo], x_rot, x[..., hi:]), dim=-1)

        q, k = rope(q), rope(k)
    return q.contiguous().to(q_pre.dtype), k.contiguous().to(k_pre.dtype)


def _ccgqa_prologue_bwd_composite(
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
    qk_mean: str,
    temperature: str,
    norm_scale: float,
    eps: float,
    rotary_dim: int,
    interleaved: bool,
    eps_mode: str = "clamp",
    rotary_start: int = 0,
) -> list[Tensor]:
    acc = compute_dtype(
        q_pre.dtype, k_pre.dtype, q_conv2_weight.dtype, k_conv2_weight.dtype, dq.dtype, dk.dtype
    )
    b, t, e_q = q_pre.shape
    d, g = e_q // heads, heads // kv_heads
    q_raw, k_raw, (xq_pad, y1q_pad, xk_pad, y1k_pad) = _raw(
        q_pre, k_pre, q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias,
        k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias,
        heads, kv_heads, qk_mean, acc,
    )  # fmt: skip

    def rope_bwd(dy: Tensor) -> Tensor:  # (B, H, T, D) -> (B, T, H, D)
        dy = dy.to(acc)
        if rotary_dim:
            c, s = _tables(cos, sin, b, t, rotary_dim, acc)
            lo, hi = rotary_start, rotary_start + rotary_dim
            # rot^T = -rot: a quarter turn back
            d_rot = dy[..., lo:hi] * c - _rotate(dy[..., lo:hi] * s, interleaved)
            dy = torch.cat((dy[..., :lo], d_rot, dy[..., hi:]), dim=-1)
        return dy.transpose(1, 2)

    def normalize_bwd(d_unit: Tensor, raw: Tensor) -> Tensor:
        inv, k = _inverse_norm(raw, eps, eps_mode)
        return d_unit * inv - raw * ((raw * d_unit).sum(-1, keepdim=True) * k)

    gq, gk = rope_bwd(dq), rope_bwd(dk)
    d_q_raw = normalize_bwd(gq * norm_scale, q_raw)
    beta = _beta(temp, temperature, kv_heads, acc)
    if beta is not None:
        k_unit = _normalize(k_raw, eps, eps_mode)
        d_beta = (gk * k_unit).sum((0, 1, 3)) * norm_scale
        d_temp = d_beta * beta if temperature == "exp" else d_beta
        d_temp = d_temp.sum().reshape(temp.shape) if temp.numel() == 1 else d_temp
        d_temp = d_temp.reshape(temp.shape).to(temp.dtype)
        gk = gk * beta.view(1, 1, kv_heads, 1)
    else:
        d_temp = q_pre.new_empty((0,))
    d_k_raw = normalize_bwd(gk * norm_scale, k_raw)

    dxq, dqw1, dqb1, dqw2, dqb2 = _conv_chain_backward(
        d_q_raw.reshape(b, t, e_q).transpose(1, 2), xq_pad, y1q_pad,
        q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias,
    )  # fmt: skip
    dxk, dkw1, dkb1, dkw2, dkb2 = _conv_chain_backward(
        d_k_raw.reshape(b, t, kv_heads * d).transpose(1, 2), xk_pad, y1k_pad,
        k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias,
    )  # fmt: skip
    if qk_mean == "group":
        # m_q[h] = (q_pre[h] + k_pre[h//G]) / 2, m_k[j] = mean of m_q over group j
        d_m_q = d_q_raw + d_k_raw.repeat_interleave(g, dim=2) / g
        dxq = dxq + (d_m_q / 2).reshape(b, t, e_q)
        dxk = dxk + (d_m_q.reshape(b, t, kv_heads, g, d).sum(3) / 2).reshape(b, t, -1)
    elif qk_mean == "all":
        # q_raw[h] += mean_j k_pre[j] / 2 and k_raw[j] += mean_h q_pre[h] / 2
        dxq = dxq + (d_k_raw.sum(2, keepdim=True) / (2 * heads)).expand(-1, -1, heads, -1).reshape(b, t, e_q)
        dxk = dxk + (d_q_raw.sum(2, keepdim=True) / (2 * kv_heads)).expand(-1, -1, kv_heads, -1).reshape(b, t, -1)

    def cast(grad: Tensor | None, like: Tensor | None) -> Tensor:
        return grad.to(like.dtype) if like is not None else q_pre.new_empty((0,))

    return [
        dxq.contiguous().to(q_pre.dtype),
        dxk.contiguous().to(k_pre.dtype),
        cast(dqw1, q_conv1_weight),
        cast(dqb1, q_conv1_bias),
        cast(dqw2, q_conv2_weight),
        cast(dqb2, q_conv2_bias),
        cast(dkw1, k_conv1_weight),
        cast(dkb1, k_conv1_bias),
        cast(dkw2, k_conv2_weight),
        cast(dkb2, k_conv2_bias),
        d_temp,
    ]


ccgqa_prologue_composite = composite_op("ccgqa_prologue_composite", _ccgqa_prologue_composite)
ccgqa_prologue_bwd_composite = composite_op(
    "ccgqa_prologue_backward_composite", _ccgqa_prologue_bwd_composite
)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _structural(heads, kv_heads, rotary_dim) -> tuple[int, int, int]:
    """Head counts and the RoPE width shape the computation (kernel constexprs): under
    ``dynamic=True`` Dynamo may pass them as SymInts, so specialise on them here (a guard,
    as for any int that decides control flow). Comparing such a SymBool with a Python bool
    in ``check_args`` raised inside sympy (H100, torch 2.11)."""
    return int(heads), int(kv_heads), int(rotary_dim)


def _form(tensors, heads: int, kv_heads: int, qk_mean: str) -> str | None:
    """Which kernel family computes this form: "stock" (depthwise conv1, per-head conv2, a
    group mean or none), "seed" (per-head conv1, dense conv2, the mean over all heads),
    None for the other combinations (the composite). Both streams have the same form."""
    d = tensors[0].shape[-1] // heads
    forms = set()
    for (w1, w2), width in zip(((tensors[2], tensors[4]), (tensors[6], tensors[8])),
                               (heads * d, kv_heads * d)):  # fmt: skip
        if w1.shape[1] == 1 and w2.shape[1] == d and qk_mean != "all":
            forms.add("stock")
        elif w1.shape[1] == d and w2.shape[1] == width and qk_mean == "all":
            forms.add("seed")
        else:
            forms.add(None)
    return forms.pop() if len(forms) == 1 else None


def _stock_kernel_ok(
    tensors, q_pre: Tensor, heads: int, k1: int, k2: int, rotary_dim: int, inter, start=0
) -> bool:
    d = q_pre.shape[-1] // heads
    return (
        use_triton(*tensors)
        and d in KERNEL_HEAD_DIMS
        and k1 <= KERNEL_MAX_CONV
        and k2 <= KERNEL_MAX_CONV
        and (rotary_dim == 0 or inter or (_is_power_of_two(rotary_dim) and start % rotary_dim == 0))
    )


def _seed_kernel_ok(tensors, heads, k1, k2, options, checked=()) -> bool:
    """The original project's form as its kernels take it: no biases, one raw temperature
    value or none, no norm scale, the clamped norm, full-width RoPE; ``tensors`` the op's
    13, ``checked`` further tensors the kernels read (the backward's dq, dk)."""
    temp, temperature, norm_scale, eps_mode, rotary_dim, rotary_start = options
    q_pre, k_pre = tensors[0], tensors[1]
    d = q_pre.shape[-1] // heads
    if any(tensors[i] is not None for i in (3, 5, 7, 9)):
        return False
    if temperature == "exp" or (temp is not None and temp.numel() != 1):
        return False
    if norm_scale != 1.0 or eps_mode != "clamp" or rotary_dim != d or rotary_start:
        return False
    from ..kernels.ccgqa_seed_prologue import MAX_CONV_KERNEL, MAX_KERNEL_WIDTH

    return (
        use_triton(*checked, *tensors)
        and _is_power_of_two(d)
        and max(q_pre.shape[-1], k_pre.shape[-1]) <= MAX_KERNEL_WIDTH
        and max(k1, k2) <= MAX_CONV_KERNEL
    )


def _seed_arguments(tensors) -> tuple:
    """The seed kernels' tensors: q_pre, k_pre, the four weights, temp (0-d), cos, sin.
    q_pre and k_pre as contiguous tensors: in a traced ``triton_op`` the row strides the
    kernels get are read from the fake tensors, and the seed's q_pre and k_pre are column
    slices of one fused qkv output; a copy of the two projections makes the strides true
    whatever layout Inductor hands the op."""
    q_pre, k_pre, qw1, _, qw2, _, kw1, _, kw2, _, temp, cos, sin = tensors
    temp = temp.reshape(()) if temp is not None else None
    return (q_pre.contiguous(), k_pre.contiguous(), qw1, qw2, kw1, kw2, temp, cos, sin)


def _kernels_for(tensors, heads, kv_heads, qk_mean, options, interleaved, checked=()):
    """"stock", "seed" or None (the composite) for these arguments."""
    k1, k2 = tensors[2].shape[-1], tensors[4].shape[-1]
    form = _form(tensors, heads, kv_heads, qk_mean)
    rotary_dim, rotary_start = options[4], options[5]
    if form == "stock" and _stock_kernel_ok(
        (*checked, *tensors), tensors[0], heads, k1, k2, rotary_dim, interleaved, rotary_start
    ):
        return "stock"
    if form == "seed" and _seed_kernel_ok(tensors, heads, k1, k2, options, checked):
        return "seed"
    return None


@triton_op("ccgqa::ccgqa_prologue", mutates_args=())
def ccgqa_prologue(
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
    qk_mean: str,
    temperature: str,
    norm_scale: float,
    eps: float,
    rotary_dim: int,
    interleaved: bool,
    eps_mode: str = "clamp",
    rotary_start: int = 0,
) -> tuple[Tensor, Tensor]:
    tensors = (
        q_pre, k_pre, q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias,
        k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias, temp, cos, sin,
    )  # fmt: skip
    heads, kv_heads, rotary_dim = _structural(heads, kv_heads, rotary_dim)
    problem = check_args(*tensors, heads, kv_heads, qk_mean, temperature, rotary_dim, rotary_start)
    if problem is None and eps_mode not in EPS_MODES:
        problem = f"eps_mode must be one of {EPS_MODES}, got {eps_mode!r}"
    if problem is not None:
        raise ValueError(f"ccgqa_prologue: {problem}")
    options = (temp, temperature, norm_scale, eps_mode, rotary_dim, rotary_start)
    kernels_for = _kernels_for(tensors, heads, kv_heads, qk_mean, options, interleaved)
    if kernels_for == "stock":
        from ..kernels import ccgqa_prologue as kernels

        scalars = (heads, kv_heads, qk_mean == "group", temperature, norm_scale, eps)
        return kernels.ccgqa_prologue_fwd(
            *tensors, *scalars, rotary_dim, interleaved, eps_mode=eps_mode,
            rotary_start=rotary_start,
        )  # fmt: skip
    if kernels_for == "seed":
        from ..kernels import ccgqa_seed_prologue as seed_kernels

        return seed_kernels.ccgqa_seed_prologue_fwd(
            *_seed_arguments(tensors), heads, kv_heads, eps, interleaved
        )
    scalars = (heads, kv_heads, qk_mean, temperature, norm_scale, eps, rotary_dim, interleaved)
    return ccgqa_prologue_composite(*tensors, *scalars, eps_mode, rotary_start)


@triton_op("ccgqa::ccgqa_prologue_backward", mutates_args=())
def ccgqa_prologue_backward(
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
    qk_mean: str,
    temperature: str,
    norm_scale: float,
    eps: float,
    rotary_dim: int,
    interleaved: bool,
    eps_mode: str = "clamp",
    rotary_start: int = 0,
) -> list[Tensor]:
    """(d q_pre, d k_pre, d q_conv1 w, b, d q_conv2 w, b, d k_conv1 w, b, d k_conv2 w, b,
    d temp); an absent bias or temp gets an empty tensor."""
    tensors = (
        q_pre, k_pre, q_conv1_weight, q_conv1_bias, q_conv2_weight, q_conv2_bias,
        k_conv1_weight, k_conv1_bias, k_conv2_weight, k_conv2_bias, temp, cos, sin,
    )  # fmt: skip
    heads, kv_heads, rotary_dim = _structural(heads, kv_heads, rotary_dim)
    options = (temp, temperature, norm_scale, eps_mode, rotary_dim, rotary_start)
    kernels_for = _kernels_for(tensors, heads, kv_heads, qk_mean, options, interleaved, (dq, dk))
    def present(grads):  # an absent bias or temp: an empty tensor of its own
        return [g if g is not None else q_pre.new_empty((0,)) for g in grads]

    if kernels_for == "stock":
        from ..kernels import ccgqa_prologue as kernels

        scalars = (heads, kv_heads, qk_mean == "group", temperature, norm_scale, eps)
        grads = kernels.ccgqa_prologue_bwd(
            dq, dk, *tensors, *scalars, rotary_dim, interleaved, eps_mode=eps_mode,
            rotary_start=rotary_start,
        )  # fmt: skip
        return present(grads)
    if kernels_for == "seed":
        from ..kernels import ccgqa_seed_prologue as seed_kernels

        d_q_pre, d_k_pre, dqw1, dqw2, dkw1, dkw2, d_temp = seed_kernels.ccgqa_seed_prologue_bwd(
            dq, dk, *_seed_arguments(tensors), heads, kv_heads, eps, interleaved
        )
        if d_temp is not None:
            d_temp = d_temp.reshape(temp.shape)
        return present([d_q_pre, d_k_pre, dqw1, None, dqw2, None, dkw1, None, dkw2, None, d_temp])
    scalars = (heads, kv_heads, qk_mean, temperature, norm_scale, eps, rotary_dim, interleaved)
    return ccgqa_prologue_bwd_composite(dq, dk, *tensors, *scalars, eps_mode, rotary_start)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:13])
    ctx.scalars = inputs[13:]


def _backward(ctx, grad_q: Tensor, grad_k: Tensor):
    tensors = ctx.saved_tensors
    grads = torch.ops.ccgqa.ccgqa_prologue_backward(grad_q, grad_k, *tensors, *ctx.scalars)
    # inputs 2..10: weights, biases, temp; an absent one (None) gets no gradient
    out = [grads[0], grads[1]]
    for grad, tensor in zip(grads[2:], tensors[2:11]):
        out.append(grad if tensor is not None else None)
    return (*out, None, None, *(None,) * len(ctx.scalars))


ccgqa_prologue.register_autograd(_backward, setup_context=_setup_context)
