"""After the patterns ran: point at subgraphs that look like a fusion but were not fused.

A cheap, conservative scan for the report ("why did my RMSNorm not fuse?"), never used
to rewrite anything.
"""

from __future__ import annotations

import torch

from .. import reporting as report
from ._registry import reaches

aten = torch.ops.aten

_ANCHORS = {
    "rms_norm": ((aten.rsqrt.default,), "an rsqrt is left in the graph"),
    "swiglu": ((aten.silu.default, aten.sigmoid.default), "a silu/sigmoid is left in the graph"),
    "rope": ((aten.neg.default,), "a negation feeding a cat/stack is left in the graph"),
    # Inductor's decompositions reach our pass with softmax spelled out (amax, sub, exp,
    # sum, div): ``aten._softmax`` never appears there
    "gqa_attention": (
        (aten.amax.default,),
        "a softmax over scores, weighting values with a matmul, is left in the graph",
    ),
    # a causal conv left in the graph: a CCGQA prologue that did not fuse
    "ccgqa_prologue": ((aten.convolution.default,), "a convolution is left in the graph"),
}


def _feeds_rotation(node: torch.fx.Node) -> bool:
    return any(user.target in (aten.cat.default, aten.stack.default) for user in node.users)


# what lies between a softmax's amax and the matmul that weights the values by its
# probabilities, in a decomposed graph: the softmax itself, casts and layout ops
_SOFTMAX_TO_MATMUL = {
    aten.sub.Tensor, aten.exp.default, aten.sum.dim_IntList, aten.div.Tensor,
    aten.mul.Tensor, aten.reciprocal.default, torch.ops.prims.convert_element_type.default,
    aten.expand.default, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.clone.default, aten.where.self,
}  # fmt: skip
_MATMULS = {aten.bmm.default, aten.mm.default, aten.matmul.default}


def _traced_from_sdpa(node: torch.fx.Node) -> bool:
    """A softmax Inductor decomposed out of an ``F.scaled_dot_product_attention`` call (on
    CPU, its math form): the SDPA pass already reported that call, fused or why not."""
    lines = [  # the user's source lines, without Python's ^^^ markers under them
        line for line in node.meta.get("stack_trace", "").splitlines() if line.strip().strip("^~")
    ]
    return bool(lines) and "scaled_dot_product_attention(" in lines[-1]


def _softmax_weights_a_matmul(amax: torch.fx.Node) -> bool:
    """An attention softmax: its probabilities reach a matmul (P @ V) through the
    softmax's own ops, casts and views only. Keeps cross-entropy's and other reductions'
    amax out of the report."""
    return reaches(amax, _MATMULS, _SOFTMAX_TO_MATMUL, max_hops=10)


def find_candidates(graph: torch.fx.Graph, fusion: str) -> list[torch.fx.Node]:
    """Nodes that usually belong to ``fusion``; taken before the patterns run."""
    targets, _reason = _ANCHORS[fusion]
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        if fusion == "rope" and not _feeds_rotation(node):
            continue
        if fusion == "gqa_attention" and (
            _traced_from_sdpa(node) or not _softmax_weights_a_matmul(node)
        ):
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
