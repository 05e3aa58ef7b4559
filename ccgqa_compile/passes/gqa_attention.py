"""Hand-written causal GQA attention -> ``torch.ops.ccgqa.gqa_attention``.

Inductor's own attention rewrite (fuse_attention.py) does not handle the K/V repeat of
GQA, so these graphs otherwise materialise the T x T scores. Idioms: K/V repeated with
expand + reshape (HF ``repeat_kv``) or ``repeat_interleave``; scale by multiply or by
division; the causal mask as ``~tril`` or ``triu(diagonal=1)`` filled with -inf; softmax
with or without an fp32 upcast. Near misses (no mask, ``tril(1)``) fail the exact re-trace.
"""

from __future__ import annotations

import torch

from ..ops.gqa_attention import check_shapes
from ._registry import Idiom, family, graph_calls

SCALE = 0.25  # scalar_workaround placeholder (exact in fp32)
_ALL_GRAD = ((True, True, True),)


def _heads_view(heads, act, device, transposed):
    """(B, H, T, D) as a projection produces it: a transposed view of (B, T, H, D)."""
    if transposed:
        return torch.randn(2, 5, heads, 8, dtype=act, device=device).transpose(1, 2)
    return torch.randn(2, heads, 5, 8, dtype=act, device=device)


# The decomposition of matmul depends on strides (a non-contiguous q gets a clone), so
# each layout users produce is its own pattern: q, k, v straight from the projections
# (transposed views), or q, k after RoPE (contiguous) with v a view.
# A single kv head (MQA) is its own layout too: its transposed view is contiguous-compatible,
# so the decomposition drops a copy.
LAYOUTS = {
    "": (True, True, True, 2),
    "_after_rope": (False, False, True, 2),
    "_single_kv_head": (True, True, True, 1),
    "_after_rope_single_kv_head": (False, False, True, 1),
}


def _inputs_for(layout):
    tq, tk, tv, kv_heads = layout

    def make(act, _param, device):
        return (
            _heads_view(4, act, device, tq),
            _heads_view(kv_heads, act, device, tk),
            _heads_view(kv_heads, act, device, tv),
            SCALE,
        )

    return make


def _check(values) -> str | None:
    return check_shapes(values["q"], values["k"], values["v"])


def _expand_kv(x, groups):
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _interleave_kv(x, groups):
    return x.repeat_interleave(groups, dim=1)


def _make_search(repeat, scale_by_division: bool, mask_kind: str, upcast: bool):
    def search(q, k, v, scale):
        groups = q.shape[1] // k.shape[1]
        k, v = repeat(k, groups), repeat(v, groups)
        scores = torch.matmul(q, k.transpose(-2, -1))
        scores = scores / scale if scale_by_division else scores * scale
        t = q.shape[-2]
        ones = torch.ones(t, t, dtype=torch.bool, device=q.device)
        if mask_kind == "not_tril":
            scores = scores.masked_fill(~ones.tril(), float("-inf"))
        else:
            scores = scores.masked_fill(torch.triu(ones, diagonal=1), float("-inf"))
        if upcast:
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        else:
            probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v)

    return search


def _repl_mul(q, k, v, scale):
    return torch.ops.ccgqa.gqa_attention(q, k, v, scale)[0]


def _repl_div(q, k, v, scale):
    return torch.ops.ccgqa.gqa_attention(q, k, v, 1.0 / scale)[0]


@family("gqa_attention", applies=graph_calls(torch.ops.aten.amax.default))
def idioms() -> list[Idiom]:
    out = []
    # mask and softmax spellings come in the pairs seen in practice, to bound the number of
    # traced patterns: (~tril, fp32 softmax) as HF-style code, (triu(1), plain softmax)
    spellings = (("not_tril", True), ("triu1", False))
    for repeat_name, repeat in (("repeat_kv", _expand_kv), ("repeat_interleave", _interleave_kv)):
        for division in (False, True):
            for mask_kind, upcast in spellings:
                for layout_name, layout in LAYOUTS.items():
                    name = "_".join(
                        [
                            repeat_name,
                            "div" if division else "mul",
                            mask_kind,
                            "fp32_softmax" if upcast else "softmax",
                        ]
                    )
                    out.append(
                        Idiom(
                            "gqa_attention",
                            name + layout_name,
                            _make_search(repeat, division, mask_kind, upcast),
                            _repl_div if division else _repl_mul,
                            _inputs_for(layout),
                            _ALL_GRAD,
                            scalar_workaround={"scale": SCALE},
                            check=_check,
                        )
                    )
    return out
