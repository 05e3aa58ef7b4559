"""Whole CCGQA blocks: a fused q/k prologue feeding a causal GQA attention.

A block counts when one prologue op produces the q and the k of one attention site that
is causal grouped-query attention: our fused op, or SDPA kept by policy (at head dims where
its own kernels are faster). The value path (its projection and the one-token shift) is
not part of either op. Half-fused blocks get a "not fused ccgqa_block" line saying which
half is missing.
"""

from __future__ import annotations

from .attention import Site, layer_convolutions, sdpa_arguments
from .common import GraphContext
from .fx_util import SDPA, is_function, is_softmax

FUSION = "ccgqa_block"


def report(ctx: GraphContext, sites: list[Site]) -> None:
    for site in sites:
        if site.kind == "decode":  # one step over a cache: the prologue of its new tokens
            if site.prologue:
                ctx.fused(FUSION, "decode_step")
            elif _has_conv(site):
                ctx.unfused(FUSION, site.anchor, "decode attention fused, but the step's q/k "
                            "prologue did not (see the ccgqa_prologue lines)")  # fmt: skip
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


def _has_conv(site: Site) -> bool:
    if site.q.graph is not site.anchor.graph:
        return False
    return bool(layer_convolutions([site.q, site.k]))

