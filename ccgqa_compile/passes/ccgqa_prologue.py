"""The CCGQA q/k prologue as patterns/ccgqa.py writes it -> ``torch.ops.ccgqa.ccgqa_prologue``.

From the pre-conv projections to the rotated q, k in (B, H, T, D): two causal convs per
stream (``F.pad`` on the left + ``F.conv1d``, the depthwise one then the per-head one,
with biases), the qk-mean coupling, ``F.normalize`` times sqrt(D), k times exp(temp) or
temp per kv head, then rotate-half RoPE on all or the first part of the head dims.

Near misses that must not match: a pad on the wrong side or by another amount, a conv1
grouped per head or a dense conv2, a mean over other heads, another norm scale. The exact
re-trace compares the pad amounts, groups and constants computed from the real weight
shapes; ``check`` (the op's own argument check) rejects what the op does not compute.

Training graphs: Inductor's ``fx_to_pattern`` turns the traced
``aten.convolution_backward`` into a pattern whose int-list arguments (bias_sizes, stride,
padding, dilation, output_padding) become single ``Ignored()`` leaves (``list`` is an
ignored type), but ``output_mask=[True, True, True]`` stays a list (bools are not ``int``
by ``type()``). A pattern node with a nested list is compared with ``pytree_flatten``,
which expands the matched node's int lists into tuples, so the structure check failed
("args_structure") on every real graph. ``relax_list_arguments`` runs on the built pass
(the family's ``after_build`` hook) and ignores those lists in the loose match; the exact
re-trace still compares every literal.

Idioms covered: qk-mean on; exp, raw or no temperature with ``F.normalize``, or exp with
``x / x.norm()`` (the op's eps = 0 computes exactly that); full or partial rotate-half
RoPE; biases on both convs (``nn.Conv1d`` modules and ``F.conv1d`` trace the same); any
head layout. Not yet: no qk-mean, other temperature/norm pairings, the Zyphra concatenated
conv, the original project's variant (the corpus entries say which fuse).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops.ccgqa_prologue import check_args
from ._registry import HALF_OR_FLOAT, Idiom, family

_NAMES = (
    "q_pre", "k_pre", "q_w1", "q_b1", "q_w2", "q_b2", "k_w1", "k_b1", "k_w2", "k_b2",
    "temp", "cos", "sin",
)  # fmt: skip
# q_pre, k_pre, conv weights/biases and temp require grad; the tables do not
_GRADS = ((True,) * 11 + (False, False),)
_GRADS_NO_TEMP = ((True,) * 10 + (False, False),)


def relax_list_arguments(pattern_pass) -> None:
    """Make the loose match of every registered ``convolution_backward`` ignore its list
    arguments, as ``fx_to_pattern`` already does for their int lists (see the docstring).
    Idempotent; the exact re-trace at match time still compares all of them."""
    from torch._inductor.pattern_matcher import (
        CallFunction,
        Ignored,
        MultiOutputPattern,
        PatternExpr,
    )

    seen: set[int] = set()

    def walk(pattern) -> None:
        if id(pattern) in seen or not isinstance(pattern, PatternExpr):
            return
        seen.add(id(pattern))
        if isinstance(pattern, MultiOutputPattern):
            for output in pattern.outputs:
                walk(output)
            return
        if not isinstance(pattern, CallFunction):
            return
        if torch.ops.aten.convolution_backward.default in pattern.fns:
            pattern.args = tuple(
                Ignored() if isinstance(a, (list, tuple)) else a for a in pattern.args
            )
            pattern.flatten = pattern.simple_flatten
            pattern.flat_args_kwargs = pattern.flatten(pattern.args, pattern.kwargs)
        for arg in (*pattern.args, *pattern.kwargs.values()):
            walk(arg)

    for entries in pattern_pass.patterns.values():
        for entry in entries:
            walk(entry.pattern)


def _inputs(rotary_dim: int, heads: int, kv_heads: int, with_temp: bool):
    def make(act, param, device):
        b, t, d, k1, k2 = 2, 5, 8, 2, 2

        def p(*shape):
            return torch.randn(*shape, dtype=param, device=device)

        return (
            torch.randn(b, t, heads * d, dtype=act, device=device),
            torch.randn(b, t, kv_heads * d, dtype=act, device=device),
            p(heads * d, 1, k1),
            p(heads * d),
            p(heads * d, d, k2),
            p(heads * d),
            p(kv_heads * d, 1, k1),
            p(kv_heads * d),
            p(kv_heads * d, d, k2),
            p(kv_heads * d),
            *((p(kv_heads),) if with_temp else ()),
            torch.randn(t, rotary_dim, dtype=act, device=device),
            torch.randn(t, rotary_dim, dtype=act, device=device),
        )

    return make


def _sizes(q_pre, q_w2, k_w2):
    d = q_w2.shape[1]
    heads, kv_heads = q_w2.shape[0] // d, k_w2.shape[0] // d
    return q_pre.shape[0], q_pre.shape[1], heads, kv_heads, d


def _conv(x, w1, b1, w2, b2, heads):
    y = x.transpose(1, 2)
    y = F.conv1d(F.pad(y, (w1.shape[-1] - 1, 0)), w1, b1, groups=w1.shape[0])
    y = F.conv1d(F.pad(y, (w2.shape[-1] - 1, 0)), w2, b2, groups=heads)
    return y.transpose(1, 2)


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _normalized(
    q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, temperature, norm
):  # fmt: skip
    """patterns/ccgqa.py ``CCGQAttention.forward`` up to the transpose before RoPE."""
    b, t, heads, kv_heads, d = _sizes(q_pre, q_w2, k_w2)
    g = heads // kv_heads
    q = _conv(q_pre, q_w1, q_b1, q_w2, q_b2, heads).view(b, t, heads, d)
    k = _conv(k_pre, k_w1, k_b1, k_w2, k_b2, kv_heads).view(b, t, kv_heads, d)
    qh = q_pre.view(b, t, heads, d)
    kh = k_pre.view(b, t, kv_heads, d).repeat_interleave(g, dim=2)
    m_q = (qh + kh) / 2
    m_k = m_q.view(b, t, kv_heads, g, d).mean(3)
    q, k = q + m_q, k + m_k
    if norm == "normalize":
        q = F.normalize(q, dim=-1) * math.sqrt(d)
        k = F.normalize(k, dim=-1) * math.sqrt(d)
    else:  # "norm_div": no eps clamp, the op's eps = 0 computes the same
        q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(d)
        k = k / k.norm(dim=-1, keepdim=True) * math.sqrt(d)
    if temperature != "none":
        beta = temp.exp() if temperature == "exp" else temp
        k = k * beta.view(1, 1, kv_heads, 1)
    return q.transpose(1, 2), k.transpose(1, 2)


def _full_rope(x, cos, sin):
    return (x * cos) + (_rotate_half(x) * sin)


def _partial_rope(x, cos, sin):
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat(((x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass), dim=-1)


def _search(temperature: str, norm: str, rope):
    def search(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, cos, sin):
        q, k = _normalized(
            q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, temperature,
            norm,
        )  # fmt: skip
        return rope(q, cos, sin), rope(k, cos, sin)

    def search_no_temp(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, cos, sin):
        return search(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, None, cos, sin)

    return search_no_temp if temperature == "none" else search


def _replace(temperature: str, norm: str):
    eps = 1e-12 if norm == "normalize" else 0.0  # F.normalize's default eps; x / |x|

    def replace(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, cos, sin):
        _b, _t, heads, kv_heads, d = _sizes(q_pre, q_w2, k_w2)
        q, k = torch.ops.ccgqa.ccgqa_prologue(
            q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, cos, sin,
            heads, kv_heads, True, temperature, math.sqrt(d), eps, cos.shape[-1], False,
        )  # fmt: skip
        return q, k

    def replace_no_temp(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, cos, sin):
        return replace(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, None, cos, sin)

    return replace_no_temp if temperature == "none" else replace


def _check(values) -> str | None:
    q_pre = values["q_pre"]
    if q_pre.dtype not in HALF_OR_FLOAT:
        return f"q_pre is {q_pre.dtype}"
    w2 = values["q_w2"]
    d = w2.shape[1]
    if w2.shape[0] % d or values["k_w2"].shape[0] % d:
        return "conv2 weights do not split into heads of the head dim"
    heads, kv_heads = w2.shape[0] // d, values["k_w2"].shape[0] // d
    tensors = [values.get(name) for name in _NAMES]  # no "temp" in the no-temperature idioms
    # exp or raw: the mode does not change what check_args checks
    temperature = "none" if values.get("temp") is None else "exp"
    rotary_dim = values["cos"].shape[-1]
    problem = check_args(*tensors, heads, kv_heads, temperature, rotary_dim)
    if problem is not None:
        return problem
    if values["cos"].dtype != q_pre.dtype or values["sin"].dtype != q_pre.dtype:
        return "cos/sin are not in q's dtype (the idiom would compute in another dtype)"
    return None


# (heads, kv heads) the patterns are traced with: a single kv head traces differently
# (its repeat_interleave and the mean's backward collapse), and so does one query head per
# kv head (G = 1: the repeat and the mean are no-ops): each gets its own patterns
_HEAD_LAYOUTS = (("", 4, 2), ("_single_kv_head", 3, 1), ("_ungrouped", 2, 2))


# (temperature, norm) spellings: patterns/ccgqa.py's options
_SPELLINGS = (
    ("exp", "normalize"),
    ("raw", "normalize"),
    ("none", "normalize"),
    ("exp", "norm_div"),
)


@family("ccgqa_prologue", after_build=relax_list_arguments)
def idioms() -> list[Idiom]:
    out = []
    for suffix, heads, kv_heads in _HEAD_LAYOUTS:
        for temperature, norm in _SPELLINGS:
            with_temp = temperature != "none"
            norm_name = "norm" if norm == "normalize" else "norm_div"
            for rope_name, rope, rotary_dim in (
                ("full", _full_rope, 8),
                ("partial", _partial_rope, 4),
            ):
                out.append(
                    Idiom(
                        "ccgqa_prologue",
                        f"conv_mean_{norm_name}_{temperature}_temperature_{rope_name}_rope{suffix}",
                        _search(temperature, norm, rope),
                        _replace(temperature, norm),
                        _inputs(rotary_dim, heads, kv_heads, with_temp),
                        _GRADS if with_temp else _GRADS_NO_TEMP,
                        check=_check,
                    )
                )
    return out
