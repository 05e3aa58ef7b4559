"""Re-associate gradient accumulations so a fused backward can be recognised.

When a tensor x feeds an RMSNorm and also something else (the residual stream, always),
AOTAutograd accumulates x's gradient in backward order as a left fold:
``(g_other + g_norm_a) + g_norm_b``, while the pattern, traced alone, has
``g_norm_a + g_norm_b``. Rewriting ``(p + q) + r`` into ``p + (q + r)`` restores the
pattern's subtree. It is only applied to same-shape, same-dtype adds that depend on a
tangent (gradient arithmetic, whose summation order autograd leaves unspecified), and only
when the first round of patterns left candidates unfused.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _same_shape_and_dtype(ref: torch.Tensor, *nodes) -> bool:
    for node in nodes:
        if not isinstance(node, torch.fx.Node):
            return False
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.shape != ref.shape or val.dtype != ref.dtype:
            return False
    return True


def is_tangent(node: torch.fx.Node) -> bool:
    """A joint graph's gradient inputs (AOTAutograd names them tangents_N)."""
    return node.op == "placeholder" and node.name.startswith("tangents")


def nodes_depending_on_tangents(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The backward part of a joint graph: every node downstream of a tangent input."""
    seen: set[torch.fx.Node] = set()
    stack = [n for n in graph.nodes if is_tangent(n)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.users)
    return seen


def peel_first_addend(graph: torch.fx.Graph) -> int:
    """``(p + q) + r`` -> ``p + (q + r)`` on gradient sums; returns how many were rewritten."""
    in_backward = nodes_depending_on_tangents(graph)
    rewritten = 0
    for node in list(graph.nodes):
        if node.target is not aten.add.Tensor or node.kwargs or node not in in_backward:
            continue
        inner, r = node.args
        if not isinstance(inner, torch.fx.Node) or inner.target is not aten.add.Tensor:
            continue
        if inner.kwargs or len(inner.users) != 1:
            continue
        p, q = inner.args
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not _same_shape_and_dtype(val, p, q, r, inner):
            continue
        with graph.inserting_before(node):
            q_plus_r = graph.call_function(aten.add.Tensor, (q, r))
        q_plus_r.meta = dict(node.meta)
        node.args = (p, q_plus_r)
        graph.erase_node(inner)
        rewritten += 1
    return rewritten


def order_scatter_sums(graph: torch.fx.Graph) -> int:
    """``add(scatter_lo, scatter_hi)`` -> ``add(scatter_hi, scatter_lo)`` on gradient sums.

    The backward of slicing a tensor in two (RoPE's rotate-half or every-other-element
    split) adds two ``slice_scatter``s of the halves' gradients, in the order autograd
    reaches them, which depends on the order the user *wrote* the slices
    (``x1 = x[..., :h]; x2 = x[..., h:]`` vs ``cat((-x[..., h:], x[..., :h]))``). Our
    patterns are traced with the higher slice start first; addition of two tensors is
    commutative bit for bit, so swapping is exact. Returns how many were swapped.
    """
    in_backward = nodes_depending_on_tangents(graph)
    swapped = 0
    for node in graph.nodes:
        if node.target is not aten.add.Tensor or node.kwargs or node not in in_backward:
            continue
        a, b = node.args
        if not all(
            isinstance(n, torch.fx.Node) and n.target is aten.slice_scatter.default for n in (a, b)
        ):
            continue
        dim_a, start_a = (list(a.args) + [0, None])[2:4]
        dim_b, start_b = (list(b.args) + [0, None])[2:4]
        if dim_a != dim_b or not isinstance(start_a, int) or not isinstance(start_b, int):
            continue
        if start_a < start_b:
            node.args = (b, a)
            swapped += 1
    return swapped
