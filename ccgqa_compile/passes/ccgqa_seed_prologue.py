"""The original project's q/k prologue -> ``torch.ops.ccgqa.ccgqa_seed_prologue``.

patterns/ccgqa.py ``CCGQAAttentionSeed.forward`` from the split of its fused qkv
projection to the rotated q, k in (B, H, T, D): per stream ``F.pad`` on the left and a
conv1 grouped per head, ``F.pad`` and a dense conv2 (no biases; ``nn.Conv1d`` modules and
``F.conv1d`` trace the same); q plus half the mean over all kv heads of k_pre, k plus half
the mean over all query heads of q_pre; ``F.normalize``; k times one scalar temperature;
then full RoPE, interleaved as the seed writes it (``x[..., ::2]``, ``x[..., 1::2]``,
``stack((-x2, x1), -1).flatten(-2)``) or rotate-half.

Near misses that must not match: a pad on the wrong side or by another amount (the exact
re-trace compares the pad literals computed from the real weights), a conv1 that is not
grouped per head or a conv2 that is not dense (``check_args`` compares the weight shapes),
a mean over another dim, another coefficient than one half, a norm scale.

A part of the ``ccgqa_prologue`` family (one fusion name for both prologues), built only
for graphs with a dense convolution (groups = 1). The training patterns share the stock
prologue's ``after_build`` (the ``convolution_backward`` bool lists, the q/k pairing).

Policy (``LEAVE_TRAINING_TO_INDUCTOR``): inference graphs fuse, training graphs are left
to Inductor and the report names each with the reason. Measured on the H100 for the
seed's own config (E512, hq8, hkv2, C4, B16 T2048 bf16, scripts/bench_seed_prologue.py,
CUDA-graph replays, 2026-11-25): the forward kernels take 0.107 ms against Inductor's
0.148 (the module's forward 0.291 ms against 0.312), but the backward kernels (d raw,
d x, two weight-gradient kernels; all recompute the conv chain) take 1.17 ms against
Inductor's 0.38, so the module trains in 1.85 ms against 1.15 with Inductor's prologue.
Fusing training graphs would break "never slower than plain Inductor". Streams wider than
the kernels take (``MAX_KERNEL_WIDTH``, 128 channels) are left to Inductor in both; other
shapes the kernels do not take (a head dim that is not a power of two, conv kernels over 4
taps) fuse and run the exact composite, as the stock prologue's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.ccgqa_seed_prologue import MAX_KERNEL_WIDTH
from ..ops.ccgqa_seed_prologue import check_args
from ._registry import HALF_OR_FLOAT, Idiom, family
from .ccgqa_prologue import _after_build, _full_rope

# Policy (see the module docstring): the backward kernels measured slower than Inductor's
# on the H100, so training matches are reported and left alone. Tests turn it off to check
# the training patterns, the op and its autograd end to end.
LEAVE_TRAINING_TO_INDUCTOR = True
POLICY_REASON = (
    "seed prologue in a training graph left to Inductor (policy): our backward kernels "
    "are slower on the H100 (seed module E512 B16 T2048 bf16: fwd+bwd 1.85 ms against "
    "1.15 with Inductor's prologue; the forward is faster and fuses in inference graphs)"
)

_CONVOLUTION = torch.ops.aten.convolution.default
# requires_grad per traced tensor: every input but the RoPE tables
_GRADS = ((True,) * 7 + (False, False),)


def _inputs(heads: int, kv_heads: int):
    def make(act, param, device):
        b, t, d, k = 2, 5, 8, 2

        def p(*shape):
            return torch.randn(*shape, dtype=param, device=device)

        e_q, e_kv = heads * d, kv_heads * d
        return (
            torch.randn(b, t, e_q, dtype=act, device=device),
            torch.randn(b, t, e_kv, dtype=act, device=device),
            p(e_q, d, k),
            p(e_q, e_q, k),
            p(e_kv, d, k),
            p(e_kv, e_kv, k),
            torch.randn((), dtype=param, device=device),
            torch.randn(t, d, dtype=act, device=device),
            torch.randn(t, d, dtype=act, device=device),
        )

    return make


def _seed_conv(x, w1, w2, heads):
    """``CCGQAAttentionSeed._conv``: (B, T, C) -> (B, T, C)."""
    y = x.transpose(1, 2)
    y = F.conv1d(F.pad(y, (w1.shape[-1] - 1, 0)), w1, groups=heads)
    y = F.conv1d(F.pad(y, (w2.shape[-1] - 1, 0)), w2)
    return y.transpose(1, 2)


def _interleaved_rope(x, cos, sin):
    """``CCGQAAttentionSeed._rope_interleaved``."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _search(rope):
    def search(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin):
        b, t = q_pre.shape[:2]
        d = q_w1.shape[1]
        heads, kv_heads = q_pre.shape[-1] // d, k_pre.shape[-1] // d
        q = _seed_conv(q_pre, q_w1, q_w2, heads).view(b, t, heads, d)
        k = _seed_conv(k_pre, k_w1, k_w2, kv_heads).view(b, t, kv_heads, d)
        q_heads = q_pre.reshape(b, t, heads, d)
        k_heads = k_pre.reshape(b, t, kv_heads, d)
        q = q + 0.5 * k_heads.mean(dim=2, keepdim=True)
        k = k + 0.5 * q_heads.mean(dim=2, keepdim=True)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1) * temp
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return rope(q, cos, sin), rope(k, cos, sin)

    return search


def _replace(interleaved: bool):
    def replace(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin):
        d = q_w1.shape[1]
        heads, kv_heads = q_pre.shape[-1] // d, k_pre.shape[-1] // d
        # F.normalize's default eps
        return torch.ops.ccgqa.ccgqa_seed_prologue(
            q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin,
            heads, kv_heads, 1e-12, interleaved,
        )  # fmt: skip

    return replace


def _check(values) -> str | None:
    q_pre, k_pre, q_w1 = values["q_pre"], values["k_pre"], values["q_w1"]
    if q_pre.dtype not in HALF_OR_FLOAT:
        return f"q_pre is {q_pre.dtype}"
    d = q_w1.shape[1]
    if d == 0 or q_pre.shape[-1] % d or k_pre.shape[-1] % d:
        return "q_pre and k_pre do not split into heads of conv1's head dim"
    heads, kv_heads = q_pre.shape[-1] // d, k_pre.shape[-1] // d
    names = ("q_w1", "q_w2", "k_w1", "k_w2", "temp", "cos", "sin")
    problem = check_args(q_pre, k_pre, *(values[n] for n in names), heads, kv_heads)
    if problem is not None:
        return problem
    cos, sin, temp = values["cos"], values["sin"], values["temp"]
    if cos.dtype != q_pre.dtype or sin.dtype != q_pre.dtype:
        return "cos/sin are not in q's dtype (the idiom would compute in another dtype)"
    if temp.dim() != 0:
        return "the temperature is not a scalar"
    if max(q_pre.shape[-1], k_pre.shape[-1]) > MAX_KERNEL_WIDTH:
        return (
            f"streams {q_pre.shape[-1]} + {k_pre.shape[-1]} channels wide: the kernels take "
            f"at most {MAX_KERNEL_WIDTH}; Inductor's code is faster than the composite (policy)"
        )
    return None


def _training_policy(values) -> str | None:
    return POLICY_REASON if LEAVE_TRAINING_TO_INDUCTOR else None


def _dense_convolution(graph: torch.fx.Graph) -> bool:
    """A convolution with groups = 1: where the seed's conv2 may be."""
    return any(
        node.op == "call_function" and node.target is _CONVOLUTION and node.args[8] == 1
        for node in graph.nodes
    )


@family("ccgqa_prologue", after_build=_after_build, part="seed", applies=_dense_convolution)
def seed_idioms() -> list[Idiom]:
    """The original project's prologue, with its interleaved RoPE or rotate-half."""
    out = []
    for suffix, heads, kv_heads in (("", 4, 2), ("_single_kv_head", 3, 1)):
        for rope_name, rope, interleaved in (
            ("interleaved", _interleaved_rope, True),
            ("rotate_half", _full_rope, False),
        ):
            # the gradient reaching q and k is contiguous when attention's backward
            # made it (SDPA, our op), laid out as q and k when elementwise code did
            for contiguous, layout in ((True, ""), (False, "_grads_as_outputs")):
                out.append(
                    Idiom(
                        "ccgqa_prologue",
                        f"seed_{rope_name}_rope{suffix}{layout}",
                        _search(rope),
                        _replace(interleaved),
                        _inputs(heads, kv_heads),
                        _GRADS,
                        check=_check,
                        training_check=_training_policy,
                        contiguous_tangents=contiguous,
                    )
                )
    return out
