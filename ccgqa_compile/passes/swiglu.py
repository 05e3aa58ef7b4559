"""SwiGLU, recognised by what it computes: silu(gate) * up.

Anchors: every ``silu`` and ``sigmoid``. The gate is the anchor's input (through casts);
the region grows forward through elementwise ops whose other inputs do not depend on the
gate, and each node of the gate's shape in it is a candidate output, the widest first. The
up projection is the region's other input of the gate's shape. When gate and up are the two
halves of one tensor (``chunk(2, -1)``, ``split``, slices), the packed op reads that tensor
once. The candidate must agree with the region in float64 on random inputs at three scales.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from .common import GraphContext, forward_closure, is_elementwise
from .fx_util import (
    is_basic_index,
    is_cast,
    is_function,
    is_method,
    same_shape,
    strip_casts,
    tensor_value,
    value,
)
from .region import Region, Rejected, emit_first, verify

FUSION = "swiglu"


def anchors(graph: torch.fx.Graph) -> list[tuple[Node, Node]]:
    found = []
    for node in graph.nodes:
        if is_function(node, F.silu, torch.sigmoid, F.sigmoid) or is_method(node, "sigmoid"):
            gate = strip_casts(node.args[0])
            if isinstance(gate, Node) and tensor_value(gate) is not None:
                found.append((node, gate))
        elif is_function(node, torch.exp) or is_method(node, "exp"):
            # a sigmoid written out: 1 / (1 + exp(-a))
            gate = _negated(node.args[0])
            if gate is not None and tensor_value(gate) is not None:
                found.append((node, strip_casts(gate)))
    return found


def _negated(node) -> Node | None:
    """a for -a (neg, or a times -1)."""
    if not isinstance(node, Node):
        return None
    if is_function(node, operator.neg, torch.neg) or is_method(node, "neg"):
        return node.args[0] if isinstance(node.args[0], Node) else None
    if is_function(node, operator.mul, torch.mul) or is_method(node, "mul"):
        a, b = node.args[0], node.args[1]
        if isinstance(a, Node) and b == -1:
            return a
        if isinstance(b, Node) and a == -1:
            return b
    return None


def _allowed(node: Node) -> bool:
    return is_elementwise(node) or is_cast(node)


def _separate(gate, up, out_dtypes):
    return (torch.ops.ccgqa.swiglu(gate, up),)


def _packed(gate_up, out_dtypes):
    return (torch.ops.ccgqa.swiglu_packed(gate_up),)


def _halves_of(gate: Node, up: Node) -> Node | None:
    """The tensor whose last-dim halves are gate (first) and up (second), if one is."""
    from .evaluate import is_getitem

    def split_part(n):
        # chunk/split -> getitem(i)
        if is_getitem(n) and isinstance(n.args[0], Node) and isinstance(n.args[1], int):
            parent = n.args[0]
            if is_method(parent, "chunk", "split") or is_function(parent, torch.chunk, torch.split):
                return parent.args[0], n.args[1]
        if is_basic_index(n):
            return n.args[0], None
        return None

    g, u = split_part(gate), split_part(up)
    if g is None or u is None or g[0] is not u[0] or not isinstance(g[0], Node):
        return None
    base = g[0]
    bv, gv = tensor_value(base), tensor_value(gate)
    if bv is None or gv is None or not same_shape((bv.shape[-1],), (2 * gv.shape[-1],)):
        return None
    if tuple(bv.shape[:-1]) != tuple(gv.shape[:-1]):
        return None
    return base


def _try(ctx: GraphContext, gate: Node, sink: Node) -> tuple[str, Region, object, list] | str:
    try:
        region = Region.between([gate], [sink])
    except Rejected as why:
        return str(why)
    if region.escapes():
        return f"{region.escapes()[0].name} is also read outside"
    gshape = tuple(value(gate).shape)
    ups = [n for n in region.float_leaves() if n is not gate]
    ups = [n for n in ups if same_shape(tuple(value(n).shape), gshape)]
    if len(ups) != 1:
        return "no single up tensor of the gate's shape multiplies the activation"
    up = ups[0]
    trials = [{"seed": 1}, {"seed": 2, "scale": {gate: 30.0}}, {"seed": 3, "scale": {gate: 1e-3}}]
    reason = verify(region, _separate, [gate, up], ctx.sizes, trials)
    if reason is not None:
        return reason
    base = _halves_of(gate, up)
    if base is not None:
        try:
            packed = Region.between([base], [sink])
            if not packed.escapes() and not [n for n in packed.float_leaves() if n is not base]:
                if verify(packed, _packed, [base], ctx.sizes, trials[:2]) is None:
                    return "packed", packed, _packed, [base]
        except Rejected:
            pass
    return "separate", region, _separate, [gate, up]


def run(ctx: GraphContext) -> None:
    for anchor, gate in anchors(ctx.graph):
        if not ctx.alive(anchor) or not ctx.alive(gate):
            continue
        gv = tensor_value(gate)
        if not gv.dtype.is_floating_point:
            continue
        sinks = [
            n
            for n in forward_closure(gate, _allowed)
            if tensor_value(n) is not None
            and same_shape(tuple(value(n).shape), tuple(gv.shape))
            and n is not anchor
        ]
        reason = emit_first(
            ctx, FUSION, sinks[::-1], lambda sink, gate=gate: _try(ctx, gate, sink),
            "the activation multiplies no up tensor",
        )  # fmt: skip
        if reason is not None:
            ctx.rejected(FUSION, "swiglu", anchor, reason)

