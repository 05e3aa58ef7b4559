"""After the patterns ran: name each whole CCGQA block that now runs on our fused ops.

A CCGQA block is fused when one q/k prologue op (both causal convs, qk-mean, L2 norm,
temperature, RoPE) produces both the q and the k of one attention op, through nothing but
views and layout copies. Between the down-projections and the up-projection the block
then runs two fused ops; the value path (its projection and the one-token shift) stays
Inductor's code, which the fused ops never see, so a block with another shift still
computes what its author wrote.

The ops appear in three forms: as the op itself, as its exact composite (CPU, other
dtypes), or, on the GPU, as the launches of its Triton kernels (a ``triton_op`` body is
traced into the graph); all three are recognised. Half-fused blocks are reported too, as
"not fused ccgqa_block" lines saying which half is missing. Read-only.
"""

from __future__ import annotations

import operator

import torch

from .. import reporting as report
from .._inductor_compat import triton_kernel_of

aten = torch.ops.aten

# the seed prologue launches this kernel once per stream (see _paired_prologue)
_SEED_FWD_KERNEL = "ccgqa_compile.kernels.ccgqa_seed_prologue._seed_fwd_kernel"
_PROLOGUE = (
    {
        "ccgqa::ccgqa_prologue",
        "ccgqa::ccgqa_prologue_composite",
        "ccgqa::ccgqa_seed_prologue",
        "ccgqa::ccgqa_seed_prologue_composite",
    },
    {"ccgqa_compile.kernels.ccgqa_prologue._ccgqa_prologue_fwd_kernel", _SEED_FWD_KERNEL},
)
_ATTENTION = (
    {"ccgqa::gqa_attention", "ccgqa::gqa_attention_composite"},
    {"ccgqa_compile.kernels.gqa_attention._forward_kernel"},
)
# ops that only reshape, re-layout or alias a tensor between the prologue and attention
_PASSTHROUGH = {
    operator.getitem,
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.clone.default,
    aten.alias.default,
    aten.permute.default,
    aten.transpose.int,
    aten.expand.default,
}
# how far back to follow such ops from an attention input
_MAX_HOPS = 8


def _is(node: torch.fx.Node, kind: tuple[set[str], set[str]]) -> bool:
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.name() in kind[0]
    return triton_kernel_of(node) in kind[1]


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Every node among ``node``'s arguments, nested ones included (a kernel launch
    passes its tensors in a dict)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _source_prologue(node: torch.fx.Node) -> torch.fx.Node | None:
    """The prologue node ``node`` is an output of, through pass-through ops only."""
    for _ in range(_MAX_HOPS):
        if _is(node, _PROLOGUE):
            return node
        if node.op != "call_function" or node.target not in _PASSTHROUGH:
            return None
        source = node.args[0]
        if not isinstance(source, torch.fx.Node):
            return None
        node = source
    return None


def _paired_prologue(attention: torch.fx.Node) -> frozenset[torch.fx.Node] | None:
    """The prologue that produces two inputs (q and k) of ``attention``: one node, or the
    seed prologue's two launches (one per stream: q from one, k from the other)."""
    reached: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for tensor in _tensor_inputs(attention):
        prologue = _source_prologue(tensor)
        if prologue is not None:
            reached.setdefault(prologue, set()).add(tensor)
    for prologue, inputs in reached.items():
        if len(inputs) >= 2:
            return frozenset((prologue,))
    seed_launches = [p for p in reached if triton_kernel_of(p) == _SEED_FWD_KERNEL]
    return frozenset(seed_launches) if len(seed_launches) == 2 else None


def report_fused_blocks(graph: torch.fx.Graph) -> int:
    """Record a ``ccgqa_block`` fusion for every prologue -> attention pair and a
    "not fused ccgqa_block" line for every half-fused block; returns the pairs found."""
    prologues = [n for n in graph.nodes if _is(n, _PROLOGUE)]
    attentions = [n for n in graph.nodes if _is(n, _ATTENTION)]
    has_conv = any(n.target is aten.convolution.default for n in graph.nodes)
    pairs: set[frozenset[torch.fx.Node]] = set()
    for attention in attentions:
        prologue = _paired_prologue(attention)
        if prologue is not None:
            pairs.add(prologue)
        elif has_conv:
            report.record_unfused(
                "ccgqa_block",
                attention.name,
                "attention fused, but its q/k prologue did not (see the ccgqa_prologue lines)",
            )
    for _ in pairs:
        report.record_fusion("ccgqa_block", "prologue+attention")
    paired = {node for pair in pairs for node in pair}
    for prologue in prologues:
        if prologue not in paired:
            report.record_unfused(
                "ccgqa_block",
                prologue.name,
                "q/k prologue fused, but its attention did not (see the gqa_attention lines)",
            )
    return len(pairs)
