"""After the patterns ran: point at subgraphs that look like a fusion but were not fused.

A cheap, conservative scan for the report ("why did my RMSNorm not fuse?"), never used
to rewrite anything.
"""

from __future__ import annotations

import torch

from .. import reporting as report

aten = torch.ops.aten

_ANCHORS = {
    "rms_norm": ((aten.rsqrt.default,), "an rsqrt is left in the graph"),
    "swiglu": ((aten.silu.default, aten.sigmoid.default), "a silu/sigmoid is left in the graph"),
    "rope": ((aten.neg.default,), "a negation feeding a cat/stack is left in the graph"),
    "gqa_attention": ((aten._softmax.default,), "a softmax is left in the graph"),
    # a causal conv left in the graph: a CCGQA prologue that did not fuse
    "ccgqa_prologue": ((aten.convolution.default,), "a convolution is left in the graph"),
}


def _feeds_rotation(node: torch.fx.Node) -> bool:
    return any(user.target in (aten.cat.default, aten.stack.default) for user in node.users)


def find_candidates(graph: torch.fx.Graph, fusion: str) -> list[torch.fx.Node]:
    """Nodes that usually belong to ``fusion``; taken before the patterns run."""
    targets, _reason = _ANCHORS[fusion]
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        if fusion == "rope" and not _feeds_rotation(node):
            continue
        found.append(node)
    return found


def report_unfused_candidates(
    graph: torch.fx.Graph, fusion: str, before: list[torch.fx.Node]
) -> None:
    """Report the candidates taken before the patterns ran that are still in the graph.

    (Nodes a replacement inserted are new nodes, so an op's own composite body, inlined on
    CPU, is never reported.)
    """
    alive = set(graph.nodes)
    _targets, reason = _ANCHORS[fusion]
    for node in before:
        if node in alive:
            report.record_unfused(fusion, node.name, f"{reason}: no {fusion} idiom matched here")
