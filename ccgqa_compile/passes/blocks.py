"""Whole CCGQA blocks: a fused q/k prologue feeding a causal GQA attention.

A block counts when one prologue op produces the q and the k of one attention site that
is causal grouped-query attention: our fused op, or SDPA kept by policy (at head dims where
its own kernels are faster). The value path (its projection and the one-token shift) is
not part of either op. Half-fused blocks get a "not fused ccgqa_block" line saying which
half is missing.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .attention import Site, layer_ancestors, layer_convolutions, sdpa_arguments
from .common import GraphContext
from .fx_util import (
    SDPA,
    arg,
    is_function,
    is_method,
    is_softmax,
    is_zero_fill,
    is_zero_pad,
    same_size,
    storage_base,
    tensor_value,
)  # fmt: skip

FUSION = "ccgqa_block"


def report(ctx: GraphContext, sites: list[Site]) -> None:
    for site in sites:
        if site.kind == "decode":  # one step over a cache: the prologue of its new tokens
            if site.prologue:
                ctx.fused(FUSION, "decode_step")
            elif _has_conv(site):
                ctx.unfused(FUSION, site.anchor, "decode attention fused, but the step's q/k "
                            "prologue did not (see the ccgqa_prologue lines)")  # fmt: skip
            elif _shifted_in_time(site):
                ctx.unfused(FUSION, site.anchor, _NO_CONV)
            continue
        if site.prologue and site.causal:
            core = "fused_attention" if site.fused else "sdpa_kept"
            if site.fused and site.core == "sdpa":
                core = "fused_attention_sdpa_core"
            ctx.fused(FUSION, f"prologue+{core}")
        elif site.prologue:
            ctx.unfused(FUSION, site.anchor, "q/k prologue fused, but its attention is not "
                        "causal grouped-query attention (see the gqa_attention lines)")  # fmt: skip
        elif site.causal and _has_conv(site):
            ctx.unfused(FUSION, site.anchor, "attention found, but its q/k prologue did not "
                        "fuse (see the ccgqa_prologue lines)")  # fmt: skip
        elif site.causal and _shifted_in_time(site):
            ctx.unfused(FUSION, site.anchor, _NO_CONV)
    anchors = {site.anchor for site in sites}
    for node in ctx.graph.nodes:  # attentions no site stands for: rejected before a site
        if node in anchors or not _convolved_attention(node):
            continue
        ctx.unfused(FUSION, node, "q/k convolutions feed this attention, which was not "
                    "recognised as causal grouped-query attention (see the gqa_attention "
                    "lines): its prologue is not tried")  # fmt: skip


def _convolved_attention(node) -> bool:
    """An SDPA call whose q and k, or a softmax whose scores, depend on 1-D convolutions
    within their layer."""
    if is_function(node, *SDPA):
        args = sdpa_arguments(node)
        return args is not None and bool(layer_convolutions([args["query"], args["key"]]))
    return is_softmax(node) and bool(layer_convolutions([node]))


_NO_CONV = (
    "q/k are computed from tokens shifted along time (zero pads, windows), but no "
    "convolution was recognised among their inputs: the q/k prologue was not tried (a "
    "convolution written in a form docs/recognition.md does not list?)"
)


def _shifted_in_time(site: Site) -> bool:
    """q's or k's inputs within the layer shift tokens as a convolution written out does:
    a zero pad, an ``unfold`` window, zeros the graph makes concatenated on, or (q's, in a
    decode step) a state held in a buffer concatenated with new columns. Plain attention
    has none (a KV cache's ``cat`` of past keys has no zeros and reaches k only)."""
    if site.q.graph is not site.anchor.graph:
        return False
    t = tensor_value(site.q).shape[2]
    for n in layer_ancestors([site.q, site.k]):
        if is_method(n, "unfold") or (is_zero_pad(n) and _pads_time(n, t)):
            return True
        if is_function(n, torch.cat) and any(is_zero_fill(p) for p in n.args[0]):
            return True
    if site.kind != "decode":
        return False
    for n in layer_ancestors([site.q]):
        if is_function(n, torch.cat):
            held = [storage_base(p).op == "placeholder" for p in n.args[0] if isinstance(p, Node)]
            if any(held) and not all(held):
                return True
    return False


def _pads_time(pad, t) -> bool:
    """A pad of an axis as long as the sequence (not a head dim padded for a kernel's
    alignment)."""
    x, widths = tensor_value(pad.args[0]), arg(pad, 1, "pad")
    if x is None or not isinstance(widths, (list, tuple)):
        return False
    return any(
        (lo != 0 or hi != 0) and same_size(x.shape[x.dim() - 1 - i], t)
        for i, (lo, hi) in enumerate(zip(widths[::2], widths[1::2]))
        if i < x.dim()
    )


def _has_conv(site: Site) -> bool:
    if site.q.graph is not site.anchor.graph:
        return False
    return bool(layer_convolutions([site.q, site.k]))

