"""The CCGQA q/k prologue as patterns/ccgqa.py writes it -> ``torch.ops.ccgqa.ccgqa_prologue``.

From the pre-conv projections to the rotated q, k in (B, H, T, D): two causal convs per
stream (``F.pad`` on the left + ``F.conv1d``, the depthwise one then the per-head one,
with biases), or Zyphra's spelling (q and k channels concatenated, padded once by
(K1-1)+(K2-1), both convs over all channels, split again), the qk-mean coupling or none,
``F.normalize`` or ``x / x.norm()`` times sqrt(D), k times exp(temp), temp or nothing per
kv head, then rotate-half RoPE on all or the first part of the head dims.

Near misses that must not match: a pad on the wrong side or by another amount, a conv1
grouped per head or a dense conv2, a mean over other heads, another norm scale. The exact
re-trace compares the pad amounts, groups and constants computed from the real weight
shapes; ``check`` (the op's own argument check) rejects what the op does not compute.

Policy: head dims above ``MAX_HEAD_DIM`` (64) stay with Inductor, whose prologue is faster
there; the report gives the reason.

Training graphs: the traced ``aten.convolution_backward`` keeps its ``output_mask`` bool
list in the pattern, which the loose match cannot compare with a real graph's node; the
family's ``after_build`` hook makes it ignore those lists
(``_inductor_compat.relax_list_arguments``), and the exact re-trace still compares every
literal.

Zyphra's single pad is not two separate pads: conv1 sees only padding at the first K2-1
steps and outputs its bias there, which conv2 then reads where separately padded convs
read zeros. The replacement folds that constant into conv2's bias (exact) and hands the op
the sliced weights without a conv1 bias (``_fold_concat_conv``).

Without qk-mean, q's and k's chains meet only in the RoPE tables, and the matcher can pair
a q with the wrong k: see "Pairing q with k" below.

Idioms covered (``_SEPARATE_CONVS``, ``_CONCATENATED_CONVS``): with qk-mean or
without; exp, raw or no temperature with ``F.normalize`` or ``x / x.norm()`` (the op's
eps = 0 computes exactly that); full or partial rotate-half RoPE; biases on both convs
(``nn.Conv1d`` modules and ``F.conv1d`` trace the same); any head layout; q and k convs
separate or concatenated (Zyphra). Not covered: the original project's variant (per-head
conv1, dense conv2, a mean over all heads: another computation, which the op's check
rejects by weight shape). Each idiom costs about 0.5 s of tracing once per process (CPU,
2 cores), so the two conv spellings are separate parts of the family, each built only
for graphs that may hold it: 42 separate-conv idioms (about 30 s), 40 concatenated
(2026-11-24).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from .._inductor_compat import (
    matched_so_far,
    multi_output_pairing_supported,
    pair_multi_outputs,
    relax_list_arguments,
)
from ..ops.ccgqa_prologue import check_args
from ._registry import (
    HALF_OR_FLOAT,
    Idiom,
    backward_nodes_of,
    family,
    graph_calls,
    matched_value,
    reaches,
)

_log = logging.getLogger(__name__)

# Policy. Above this head dim Inductor's own prologue (cuDNN convolutions) is faster than
# our kernels in training: backward on the H100 at d = 128 (hq8 hkv2, B16 T2048 bf16) 3.51
# ms against our 4.19, while at d = 64 ours is 0.91 against 1.72, at d = 32 0.58 against
# 2.01, at d = 16 0.19 against 2.96 (scripts/sweep_prologue_bwd.py --inductor, 2026-11-24,
# docs/benchmarks/h100-2026-11-24/single-kernel-bwd/). So d = 128 prologues are left to
# Inductor, reported with this reason.
MAX_HEAD_DIM = 64

_NAMES = (
    "q_pre", "k_pre", "q_w1", "q_b1", "q_w2", "q_b2", "k_w1", "k_b1", "k_w2", "k_b2",
    "temp", "cos", "sin",
)  # fmt: skip
# requires_grad per traced tensor, [concatenated convs][with temp]: every input but the
# RoPE tables
_GRADS = {
    concat: {with_temp: ((True,) * (n + with_temp) + (False, False),) for with_temp in (0, 1)}
    for concat, n in ((False, 10), (True, 6))
}


def _inputs(rotary_dim: int, heads: int, kv_heads: int, with_temp: bool, concat: bool):
    def make(act, param, device):
        b, t, d, k1, k2 = 2, 5, 8, 2, 2

        def p(*shape):
            return torch.randn(*shape, dtype=param, device=device)

        def convs(width):
            return p(width, 1, k1), p(width), p(width, d, k2), p(width)

        e_q, e_kv = heads * d, kv_heads * d
        weights = convs(e_q + e_kv) if concat else (*convs(e_q), *convs(e_kv))
        return (
            torch.randn(b, t, e_q, dtype=act, device=device),
            torch.randn(b, t, e_kv, dtype=act, device=device),
            *weights,
            *((p(kv_heads),) if with_temp else ()),
            torch.randn(t, rotary_dim, dtype=act, device=device),
            torch.randn(t, rotary_dim, dtype=act, device=device),
        )

    return make


def _heads(q_pre, k_pre, conv2_weight):
    d = conv2_weight.shape[1]
    return q_pre.shape[-1] // d, k_pre.shape[-1] // d, d


def _conv(x, w1, b1, w2, b2, heads):
    y = x.transpose(1, 2)
    y = F.conv1d(F.pad(y, (w1.shape[-1] - 1, 0)), w1, b1, groups=w1.shape[0])
    y = F.conv1d(F.pad(y, (w2.shape[-1] - 1, 0)), w2, b2, groups=heads)
    return y.transpose(1, 2)


def _concat_conv(q_pre, k_pre, w1, b1, w2, b2, heads, kv_heads):
    """Zyphra's spelling: q and k channels concatenated, one left pad of (K1-1)+(K2-1),
    both convs unpadded, split again."""
    y = torch.cat((q_pre, k_pre), dim=-1).transpose(1, 2)
    y = F.pad(y, (w1.shape[-1] - 1 + w2.shape[-1] - 1, 0))
    y = F.conv1d(y, w1, b1, groups=w1.shape[0])
    y = F.conv1d(y, w2, b2, groups=heads + kv_heads)
    return y.transpose(1, 2).split((q_pre.shape[-1], k_pre.shape[-1]), dim=-1)


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _after_conv(q_pre, k_pre, q, k, temp, heads, kv_heads, d, qk_mean, temperature, norm):
    """patterns/ccgqa.py ``CCGQAttention.forward`` from the conv outputs (B, T, C) to the
    transpose before RoPE."""
    b, t = q_pre.shape[:2]
    q, k = q.view(b, t, heads, d), k.view(b, t, kv_heads, d)
    if qk_mean:
        g = heads // kv_heads
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
        # "raw" multiplies by whatever tensor temp is bound to, exp(t) included: the raw
        # idioms cover an exp temperature too, its exp left to Inductor
        beta = temp.exp() if temperature == "exp" else temp
        k = k * beta.view(1, 1, kv_heads, 1)
    return q.transpose(1, 2), k.transpose(1, 2)


def _full_rope(x, cos, sin):
    return (x * cos) + (_rotate_half(x) * sin)


def _partial_rope(x, cos, sin):
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat(((x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass), dim=-1)


def _search(qk_mean: bool, temperature: str, norm: str, rope, concat: bool):
    spelling = (qk_mean, temperature, norm)

    def search(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, cos, sin):
        heads, kv_heads, d = _heads(q_pre, k_pre, q_w2)
        q = _conv(q_pre, q_w1, q_b1, q_w2, q_b2, heads)
        k = _conv(k_pre, k_w1, k_b1, k_w2, k_b2, kv_heads)
        q, k = _after_conv(q_pre, k_pre, q, k, temp, heads, kv_heads, d, *spelling)
        return rope(q, cos, sin), rope(k, cos, sin)

    def search_concat(q_pre, k_pre, w1, b1, w2, b2, temp, cos, sin):
        heads, kv_heads, d = _heads(q_pre, k_pre, w2)
        q, k = _concat_conv(q_pre, k_pre, w1, b1, w2, b2, heads, kv_heads)
        q, k = _after_conv(q_pre, k_pre, q, k, temp, heads, kv_heads, d, *spelling)
        return rope(q, cos, sin), rope(k, cos, sin)

    def search_no_temp(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, cos, sin):
        return search(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, None, cos, sin)

    def search_concat_no_temp(q_pre, k_pre, w1, b1, w2, b2, cos, sin):
        return search_concat(q_pre, k_pre, w1, b1, w2, b2, None, cos, sin)

    if concat:
        return search_concat_no_temp if temperature == "none" else search_concat
    return search_no_temp if temperature == "none" else search


def _fold_concat_conv(q_pre, w1, b1, w2, b2):
    """The concatenated convs as the op's separately padded q and k convs.

    Slicing the weights at the q/k boundary is exact (conv1 is depthwise, conv2's groups
    are whole heads, q's first). The single pad is not quite two pads: conv1 sees only
    padding at the first K2-1 steps and outputs its bias there, which conv2 then reads
    where separate padding would give it zeros. So conv1's bias reaches conv2 at every
    step, a constant input: conv2 maps it to a per-channel constant, folded into conv2's
    bias (computed in float32 at least), and the op runs with no conv1 bias. Exact, and
    differentiable in every weight and bias."""
    e_q, d = q_pre.shape[-1], w2.shape[1]
    groups = w2.shape[0] // d
    acc = torch.promote_types(w2.dtype, torch.float32)
    taps = w2.to(acc).sum(-1).view(groups, d, d)
    b2 = b2.to(acc) + (taps * b1.to(acc).view(groups, 1, d)).sum(-1).view(-1)
    return (w1[:e_q], None, w2[:e_q], b2[:e_q]), (w1[e_q:], None, w2[e_q:], b2[e_q:])


def _symmetric(qk_mean: bool, temperature: str) -> bool:
    """Without qk-mean and temperature, q's chain and k's are the same function of their
    own inputs: the matcher may bind q's pattern to k's chain and k's to q's."""
    return not qk_mean and temperature == "none"


def _replace(qk_mean: bool, temperature: str, norm: str, concat: bool):
    eps = 1e-12 if norm == "normalize" else 0.0  # F.normalize's default eps; x / |x|
    symmetric = _symmetric(qk_mean, temperature)

    def replace(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, cos, sin):
        heads, kv_heads, d = _heads(q_pre, k_pre, q_w2)
        if symmetric and heads < kv_heads:
            # bound the other way round: the op wants the stream with more heads as q
            k, q = replace(
                k_pre, q_pre, k_w1, k_b1, k_w2, k_b2, q_w1, q_b1, q_w2, q_b2, temp, cos, sin
            )
            return q, k
        q, k = torch.ops.ccgqa.ccgqa_prologue(
            q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, temp, cos, sin,
            heads, kv_heads, qk_mean, temperature, math.sqrt(d), eps, cos.shape[-1], False,
        )  # fmt: skip
        return q, k

    def replace_concat(q_pre, k_pre, w1, b1, w2, b2, temp, cos, sin):
        q_convs, k_convs = _fold_concat_conv(q_pre, w1, b1, w2, b2)
        return replace(q_pre, k_pre, *q_convs, *k_convs, temp, cos, sin)

    def replace_no_temp(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, cos, sin):
        return replace(q_pre, k_pre, q_w1, q_b1, q_w2, q_b2, k_w1, k_b1, k_w2, k_b2, None, cos, sin)

    def replace_concat_no_temp(q_pre, k_pre, w1, b1, w2, b2, cos, sin):
        return replace_concat(q_pre, k_pre, w1, b1, w2, b2, None, cos, sin)

    if concat:
        return replace_concat_no_temp if temperature == "none" else replace_concat
    return replace_no_temp if temperature == "none" else replace


def _meta(shape, like):
    return torch.empty(shape, dtype=like.dtype, device="meta")


def _checker(qk_mean: bool, temperature: str):
    symmetric = _symmetric(qk_mean, temperature)

    def check(values) -> str | None:
        problem = _same_binding_as_first_match(values)
        if problem is not None:
            return problem
        q_pre, k_pre = values["q_pre"], values["k_pre"]
        if q_pre.dtype not in HALF_OR_FLOAT:
            return f"q_pre is {q_pre.dtype}"
        concat = "w2" in values
        w2 = values["w2"] if concat else values["q_w2"]
        d = w2.shape[1]
        if q_pre.shape[-1] % d or k_pre.shape[-1] % d:
            return "q_pre and k_pre do not split into heads of conv2's head dim"
        heads, kv_heads = q_pre.shape[-1] // d, k_pre.shape[-1] // d
        if concat:
            e_q, e_kv = q_pre.shape[-1], k_pre.shape[-1]
            w1, b1, b2 = values["w1"], values["b1"], values["b2"]
            width = e_q + e_kv
            if w1.shape[0] != width or w2.shape[0] != width or b1.shape != (width,):
                return f"the concatenated convs are not {width} channels wide"
            # the op sees the sliced weights and conv2's folded bias (_fold_concat_conv)
            convs = []
            for e in (e_q, e_kv):
                convs += [_meta((e, *w1.shape[1:]), w1), None, _meta((e, *w2.shape[1:]), w2)]
                convs.append(_meta((e,), b2))
        else:
            convs = [values[name] for name in _NAMES[2:10]]
        if symmetric and heads < kv_heads:  # the replacement swaps the streams
            q_pre, k_pre, heads, kv_heads = k_pre, q_pre, kv_heads, heads
            convs = convs[4:] + convs[:4]
        temp = values.get("temp")  # absent in the no-temperature idioms
        # exp or raw: the mode does not change what check_args checks
        temperature_mode = "none" if temp is None else "raw"
        cos, sin = values["cos"], values["sin"]
        problem = check_args(
            q_pre, k_pre, *convs, temp, cos, sin, heads, kv_heads, temperature_mode,
            cos.shape[-1],
        )  # fmt: skip
        if problem is not None:
            return problem
        if cos.dtype != q_pre.dtype or sin.dtype != q_pre.dtype:
            return "cos/sin are not in q's dtype (the idiom would compute in another dtype)"
        if d > MAX_HEAD_DIM:
            return f"head dim {d} > {MAX_HEAD_DIM}: Inductor's own prologue is faster (policy)"
        return None

    return check


# ---- Pairing q with k ---------------------------------------------------------------
# A multi-output pattern matches its first output (q) at an anchor node, then takes the
# first node reachable from what is already matched that matches the next output (k),
# and never goes back to try another. With qk-mean, q's and k's chains meet in the mean,
# so the first k found is the block's own. Without it they meet only in the RoPE tables,
# and the first candidate may be q's own chain (with no temperature both chains look
# alike; the match then fails at the gradients, or passes with q's chain twice), or, where
# one table serves several blocks, another block's k, whose replacement would take an
# input computed from its own output (a cycle). So each candidate for a later output is
# skipped when an earlier output already took it, or when the outputs found so far feed
# the forward inputs bound so far (``_feeds_its_inputs``), in the loose match and in the
# exact re-trace alike (``_inductor_compat.pair_multi_outputs``, which replaces Inductor's
# anchor search). Should the two still bind different inputs, the idiom's check rejects
# the match (``_FIRST_MATCH``): the re-trace would vouch for one subgraph while the other
# is replaced. On a torch whose anchor search is not the one replaced there, the idioms
# without qk-mean are not registered at all (``idioms``): a missed fusion, never q's chain
# bound twice.

_FIRST_MATCH: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ccgqa_prologue_first_match", default=None
)


def _same_binding_as_first_match(values: dict[str, Any]) -> str | None:
    first = _FIRST_MATCH.get()
    if first is not None and any(values.get(name) is not val for name, val in first.items()):
        return "the exact re-trace bound other inputs than the first match (another k)"
    return None


def _feeds_its_inputs(ctx, outputs) -> bool:
    """Whether an output matched so far feeds a forward input bound so far. The tangents
    are left out: in a training graph attention's backward computes them from q and k."""
    found, bound = matched_so_far(ctx, outputs)
    backward = backward_nodes_of(found[0].graph)
    inputs = {node for node in bound if node not in backward}
    # forward nodes only: no forward input is computed from a backward node
    seen: set[torch.fx.Node] = set()
    stack = [node for node in found if node not in backward]
    while stack:
        for user in stack.pop().users:
            if user in inputs:
                return True
            if user not in seen and user not in backward:
                seen.add(user)
                stack.append(user)
    return False


def _check_against_first_match(match, inner) -> bool:
    """Run the entry's check (the exact re-trace, then the idiom's ``check``) with the loose
    match's bindings at hand for ``_same_binding_as_first_match``."""
    first = {name: matched_value(arg) for name, arg in match.kwargs.items()}
    token = _FIRST_MATCH.set(first)
    try:
        return inner(match)
    finally:
        _FIRST_MATCH.reset(token)


def _after_build(pattern_pass) -> None:
    relax_list_arguments(pattern_pass, torch.ops.aten.convolution_backward.default)
    # without the pairing the no-qk-mean idioms are not registered (see idioms())
    pair_multi_outputs(
        pattern_pass,
        accept=lambda ctx, outputs: not _feeds_its_inputs(ctx, outputs),
        wrap_check=_check_against_first_match,
    )


# (heads, kv heads) the patterns are traced with: a single kv head traces differently
# (its repeat_interleave and the mean's backward collapse), and so does one query head per
# kv head (G = 1: the repeat and the mean are no-ops): each gets its own patterns
_HEAD_LAYOUTS = (("", 4, 2), ("_single_kv_head", 3, 1), ("_ungrouped", 2, 2))

# (name prefix, qk mean, concatenated convs, head layouts, (temperature, norm) spellings).
# A "raw" idiom also covers its spelling with exp(temp), the exp left to Inductor (see
# _after_conv): exp is traced only in the grouped layout, where it saves the production
# models a kernel launch. Without the mean, G = 1 traces as the grouped layout does, and
# one kv head differs only in the backward (where its rope's layout copy lands).
_ANY_TEMPERATURE = (
    ("raw", "normalize"), ("none", "normalize"), ("raw", "norm_div"), ("none", "norm_div"),
)  # fmt: skip
_SEPARATE_CONVS = (
    ("conv_mean", True, False, _HEAD_LAYOUTS[:1], (("exp", "normalize"), *_ANY_TEMPERATURE)),
    ("conv_mean", True, False, _HEAD_LAYOUTS[1:], _ANY_TEMPERATURE),
    ("conv", False, False, _HEAD_LAYOUTS[:2], _ANY_TEMPERATURE),
)
_CONCATENATED_CONVS = (
    ("concat_conv_mean", True, True, _HEAD_LAYOUTS, _ANY_TEMPERATURE),
    ("concat_conv", False, True, _HEAD_LAYOUTS[:2], _ANY_TEMPERATURE),
)


@functools.cache
def _warn_without_pairing() -> None:
    """Once per process, not once per family part."""
    _log.warning(
        "ccgqa_prologue: this torch's multi-output pattern matching is not the one "
        "ccgqa_compile was checked against (2.11 to 2.13); prologues without qk-mean "
        "will not fuse"
    )


def _idioms_of(variants) -> list[Idiom]:
    out = []
    pairing = multi_output_pairing_supported()
    if not pairing:
        _warn_without_pairing()
    for prefix, qk_mean, concat, layouts, spellings in variants:
        if not qk_mean and not pairing:
            continue  # q could be paired with the wrong k: see "Pairing q with k"
        for suffix, heads, kv_heads in layouts:
            for temperature, norm in spellings:
                with_temp = temperature != "none"
                norm_name = "norm" if norm == "normalize" else "norm_div"
                for rope_name, rope, rotary_dim in (
                    ("full", _full_rope, 8),
                    ("partial", _partial_rope, 4),
                ):
                    name = f"{norm_name}_{temperature}_temperature_{rope_name}_rope{suffix}"
                    out.append(
                        Idiom(
                            "ccgqa_prologue",
                            f"{prefix}_{name}",
                            _search(qk_mean, temperature, norm, rope, concat),
                            _replace(qk_mean, temperature, norm, concat),
                            _inputs(rotary_dim, heads, kv_heads, with_temp, concat),
                            _GRADS[concat][with_temp],
                            check=_checker(qk_mean, temperature),
                        )
                    )
    return out


_CONVOLUTION = torch.ops.aten.convolution.default
# between Zyphra's cat of q and k and the conv that reads it: the transpose to (B, C, T)
# and the one pad, as a decomposed graph spells them
_CAT_TO_CONV = {
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.clone.default,
    torch.ops.aten.constant_pad_nd.default, torch.ops.aten.view.default,
}  # fmt: skip


def _convolves_a_concatenation(graph: torch.fx.Graph) -> bool:
    """A ``cat`` that reaches a convolution through layout ops and a pad: where Zyphra's
    spelling may be (its 40 idioms are traced only for such graphs)."""
    return any(
        node.op == "call_function"
        and node.target is torch.ops.aten.cat.default
        and reaches(node, {_CONVOLUTION}, _CAT_TO_CONV, max_hops=4)
        for node in graph.nodes
    )


@family("ccgqa_prologue", after_build=_after_build, applies=graph_calls(_CONVOLUTION))
def idioms() -> list[Idiom]:
    """Separately padded q and k convs."""
    return _idioms_of(_SEPARATE_CONVS)


@family(
    "ccgqa_prologue",
    after_build=_after_build,
    part="concat",
    applies=_convolves_a_concatenation,
)
def concat_idioms() -> list[Idiom]:
    """Zyphra's concatenated convs."""
    return _idioms_of(_CONCATENATED_CONVS)
