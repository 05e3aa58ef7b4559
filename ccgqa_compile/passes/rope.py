"""Rotary position embedding, recognised by what it computes:
out[..., :r] = x[..., :r] * cos + rot(x[..., :r]) * sin, out[..., r:] = x[..., r:],
with rot the rotate-half or the pairwise (interleaved) quarter turn.

Anchors: concatenations and stacks (``cat((-x2, x1))``, gpt-fast's ``stack([x0*c - x1*s,
...])``) and complex views (Meta's ``view_as_complex(x) * freqs_cis``). The rotated tensor
is one of the tensors the anchor's cone slices or reshapes, the largest first; the region
grows forward from it through element-wise, slicing, reshaping and complex ops whose other
inputs do not depend on it (the tables). The op's full-width cos/sin tables are built from
the region's table inputs: two real tables used as they are or duplicated (``cat(c, c)``,
``repeat_interleave(c, 2)``), one real table holding (cos, sin) pairs, or one complex table.
Each (tables, layout) candidate must agree with the region in float64 on random x and
random tables.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
from torch.fx import Node

from .common import GraphContext, forward_closure, is_elementwise
from .fx_util import (
    ancestors,
    is_basic_index,
    is_cast,
    is_function,
    is_layout,
    is_method,
    node_inputs,
    requires_grad,
    same_shape,
    static_int,
    tensor_value,
    value,
)
from .region import Region, Rejected, emit_first, emitted, verify

FUSION = "rope"

_COMPLEX = {torch.view_as_complex, torch.view_as_real, torch.polar, torch.complex}
_STRUCTURE_FUNCTIONS = {torch.cat, torch.stack, torch.unbind, torch.chunk, torch.split}
_STRUCTURE_METHODS = {"unbind", "chunk", "split", "real", "imag"}


def _rotation_op(node: Node) -> bool:
    return (
        is_elementwise(node)
        or is_cast(node)
        or is_layout(node)
        or is_basic_index(node)
        or is_function(node, operator.getitem, torch.roll, *_COMPLEX, *_STRUCTURE_FUNCTIONS)
        or is_method(node, "roll", *_STRUCTURE_METHODS)
    )


def anchors(graph: torch.fx.Graph) -> list[tuple[Node, bool]]:
    """(anchor, whether a miss there is reported): a rotation with a negation, or a
    complex product, is reported; a plain swap of two parts or a roll (a rotation only
    where a table carries the sign) is common outside RoPE, and left unreported."""
    found = []
    for node in graph.nodes:
        if emitted(node):
            continue
        if is_function(node, torch.view_as_complex):
            found.append((node, True))
        elif is_function(node, torch.roll) or is_method(node, "roll"):
            found.append((node, False))
        elif is_function(node, torch.cat, torch.stack):
            parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
            parts = [p for p in parts if isinstance(p, Node)]
            if any(_has_neg_or_sub(p) for p in parts):
                found.append((node, True))
            elif _two_parts_of_one_tensor(parts):
                found.append((node, False))
    return found


def _two_parts_of_one_tensor(parts: list[Node]) -> bool:
    """Two parts of one tensor joined (``cat((x2, x1))``, pairs stacked swapped): a
    rotation whose sign the tables may carry."""
    if len(parts) != 2:
        return False
    bases = []
    for part in parts:
        while is_layout(part) or is_cast(part):
            part = part.args[0]
        if not (is_basic_index(part) or is_function(part, operator.getitem)):
            return False
        bases.append(_part_base(part.args[0]))
    return bases[0] is bases[1]


def _part_base(node):
    """What a chunk / split / unbind result, or a slice, was cut from."""
    if is_function(node, torch.chunk, torch.split, torch.unbind) or is_method(node, "chunk", "split", "unbind"):
        return node.args[0]
    return node


def _has_neg_or_sub(node: Node) -> bool:
    return (
        is_function(node, operator.neg, torch.neg, operator.sub, torch.sub)
        or is_method(node, "neg", "sub")
    )


def _sources(anchor: Node) -> list[Node]:
    """Tensors the anchor's cone slices, splits or reshapes: the rotated one among them."""
    seen, todo, found = set(), [anchor], []
    for _ in range(64):
        if not todo:
            break
        node = todo.pop()
        if node in seen or not isinstance(node, Node):
            continue
        seen.add(node)
        if node.op not in ("call_function", "call_method"):
            continue
        if not _rotation_op(node):
            continue
        if (
            is_basic_index(node)
            or is_layout(node)
            or is_function(node, torch.view_as_complex, torch.unbind, torch.chunk, torch.split, torch.roll)
            or is_method(node, "unbind", "chunk", "split", "roll")
        ):
            base = node.args[0]
            if isinstance(base, Node) and tensor_value(base) is not None:
                found.append(base)
        todo.extend(node_inputs(node))
    out = []
    for n in found:
        v = tensor_value(n)
        if v is not None and v.dtype.is_floating_point and v.dim() >= 2 and n not in out:
            out.append(n)
    return sorted(out, key=lambda n: -_numel_hint(n))


def _numel_hint(node: Node) -> int:
    n = 1
    for s in tensor_value(node).shape:
        n *= s if isinstance(s, int) else 1 << 20
    return n


def _dup(table, how):
    if how == "cat":
        return torch.cat((table, table), dim=-1)
    if how == "interleave":
        return table.repeat_interleave(2, dim=-1)
    return table


def _table_options(tables: list[Node], width):
    """(name, inputs, build(tables...) -> (cos, sin), rotary width, interleaved) candidates."""
    options = []
    width = static_int(width)
    if any(tensor_value(t) is None or tensor_value(t).dim() == 0 for t in tables):
        return options  # a 0-d factor (a logit scale held in a buffer) is no table
    if len(tables) == 2:
        a, b = tables
        va, vb = tensor_value(a), tensor_value(b)
        if va.dtype.is_complex or vb.dtype.is_complex:
            return options
        last = static_int(va.shape[-1])
        if not same_shape((vb.shape[-1],), (last,)) or not isinstance(last, int):
            return options
        for first, second in ((a, b), (b, a)):
            for how, r, inter in (
                ("full", last, False),
                ("full", last, True),
                ("cat", 2 * last, False),
                ("interleave", 2 * last, True),
            ):

                def build(c, s, how=how):
                    return _dup(c, how), _dup(s, how)

                options.append((f"{how}", [first, second], build, r, inter))
            for inter in (False, True):  # the quarter turn's sign baked into sin
                options.append(("full_signed", [first, second], _signed(inter, last), last, inter))
    elif len(tables) == 3:  # sin times a sign table (``roll(x) * sign * sin``)
        lasts = [static_int(tensor_value(t).shape[-1]) for t in tables]
        if any(tensor_value(t).dtype.is_complex for t in tables) or not all(
            isinstance(n, int) for n in lasts
        ) or len(set(lasts)) != 1:  # a symbolic width (SymInts do not hash) is no option
            return options
        last = lasts[0]
        for order in itertools.permutations(tables):
            for inter in (False, True):
                options.append(("full_sign_table", list(order), _times_sign(_signed(inter, last)), last, inter))
    elif len(tables) == 1:
        (t,) = tables
        v = tensor_value(t)
        dims = [static_int(s) for s in v.shape]
        if v.dtype.is_complex and isinstance(dims[-1], int):
            last = dims[-1]
            for how, inter in (("interleave", True), ("cat", False)):

                def build(z, how=how):
                    return _dup(z.real, how), _dup(z.imag, how)

                options.append((f"complex_{how}", [t], build, 2 * last, inter))
        elif v.dim() >= 2 and dims[-1] == 2 and isinstance(dims[-2], int):
            last = dims[-2]
            for how, inter in (("interleave", True), ("cat", False)):

                def build(p, how=how):
                    return _dup(p[..., 0], how), _dup(p[..., 1], how)

                options.append((f"pairs_{how}", [t], build, 2 * last, inter))
    # the same tables rotating the other way (x*cos - rot(x)*sin: rotate_half written as
    # cat(x2, -x1)), tried after every forward reading
    options += [(f"{name}_negative", ins, _negated(build), r, i) for name, ins, build, r, i in options]
    return [o for o in options if isinstance(width, int) and 0 < o[3] <= width and o[3] % 2 == 0]


def _signed(interleaved: bool, width: int):
    """Full-width tables where the rotation is a plain swap (``cat(x2, x1)``, pairs
    swapped, ``roll``) and the sin table carries the quarter turn's sign (``cat(-sin,
    sin)``): the op's sin is that table with the sign taken back out, whatever it holds."""

    def build(c, s):
        if interleaved:
            return c, torch.stack((-s[..., 0::2], s[..., 1::2]), dim=-1).flatten(-2)
        half = width // 2  # traced with proxies too: the width as a number
        return c, torch.cat((-s[..., :half], s[..., half:]), dim=-1)

    return build


def _times_sign(signed):
    """Three tables: cos, sin and a sign table multiplying sin."""

    def build(c, s, sign):
        return signed(c, s * sign)

    return build


def _negated(build):
    def negative(*tables):
        cos, sin = build(*tables)
        return cos, -sin

    return negative


def _with_heads_axis(build):
    def built(*tables):
        return tuple(t.unsqueeze(-2) for t in build(*tables))

    return built


def _candidate(build, rotary_dim: int, interleaved: bool, pairs_split: bool = False):
    """The op on x; ``pairs_split``: on x's pairs split into halves first (even dims, then
    odd), as DeepSeek-V3's ``cat(a * c - b * s, b * c + a * s)`` of ``a, b = x[..., 0::2],
    x[..., 1::2]`` reads them."""

    def rope(x, *tables, out_dtypes):
        cos, sin = build(*tables)
        out_dtype = out_dtypes[0] or torch.float64
        if pairs_split:
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return (torch.ops.ccgqa.rope(x, cos, sin, rotary_dim, interleaved, out_dtype),)

    return rope


def lift_table_slices(region: Region, x: Node, keep=None) -> Region:
    """Slices and views of one table read only inside the region join the region; their
    table becomes the leaf (where ``keep(table)`` holds, when given). gpt-fast indexes its
    (..., 2) cos/sin pairs once per product: four leaves of one table; code rotating q held
    (B, T, Hkv, G, D) and k (B, T, Hkv, D) views one table with a unit axis more for q.
    Each leaf's views are followed back to the nearest tensor another leaf views too (or
    reads as it is), not further: the table, not the buffer it is sliced from."""
    leaves = set(region.leaves)
    chains = {}  # leaf -> [leaf, what it views, ...]
    for leaf in region.float_leaves():
        if leaf is not x:
            chain = [leaf]
            while _table_view(chain[-1]):
                chain.append(chain[-1].args[0])
            chains[leaf] = chain
    lifts: dict[Node, list[Node]] = {}
    for leaf, chain in chains.items():
        others = {n for other, c in chains.items() if other is not leaf for n in c}
        meet = next((n for n in chain[1:] if n in others or n in leaves), None)
        if meet is not None and (keep is None or keep(meet)):
            lifts[leaf] = chain[: chain.index(meet)]
    while True:  # a view read outside the region stays outside, and so do its leaf's
        lifted = {n for chain in lifts.values() for n in chain}
        outside = {n for n in lifted if any(u not in region.nodes and u not in lifted for u in n.users)}
        if not outside:
            break
        lifts = {leaf: c for leaf, c in lifts.items() if not outside.intersection(c)}
    if not lifted:
        return region
    order = {n: i for i, n in enumerate(region.graph.nodes)}
    nodes = region.nodes | lifted
    inputs = {i for n in nodes for i in node_inputs(n) if i not in nodes}
    return Region(
        region.graph, region.sources, region.sinks, nodes,
        sorted(inputs | set(region.sources), key=order.__getitem__),
    )  # fmt: skip


def _table_view(node: Any) -> bool:
    """An index into a table, or a view of it that reads no other tensor."""
    if not isinstance(node, Node) or not isinstance(node.args[0] if node.args else None, Node):
        return False
    if is_function(node, operator.getitem):
        return True
    if not is_layout(node) or node.target in ("view_as", "reshape_as", "expand_as"):
        return False
    return all(not isinstance(value(a), torch.Tensor) for a in node_inputs(node)[1:])


def _try(ctx: GraphContext, x: Node, sink: Node):
    try:
        region = lift_table_slices(Region.between([x], [sink]), x)
    except Rejected as why:
        return str(why)
    if region.escapes():
        return f"{region.escapes()[0].name} is also read outside the rotation"
    tables = [n for n in region.float_leaves() if n is not x]
    learned = [n for n in tables if requires_grad(n)]
    if learned:
        return f"the table {learned[0].name} requires grad (the op gives tables no gradient)"
    width = static_int(tensor_value(x).shape[-1])
    options = _table_options(tables, width)
    if not options:
        return f"no cos/sin tables among the region's inputs ({len(tables)} float inputs)"
    if tensor_value(x).dim() == 4:  # (T, r) rows for x laid out (B, T, H, D), the code
        # transposing to (B, H, T, D) inside (gemma_pytorch): a unit heads axis
        options += [(f"{n}_heads_axis", ins, _with_heads_axis(b), r, i) for n, ins, b, r, i in options]
    trials = [{"seed": 1}, {"seed": 2, "scale": {x: 1e2}}]
    reason = "no rotation fits"
    split = [(f"{n}_pairs_split", ins, b, r, i) for n, ins, b, r, i in options if r == width and not i]
    for name, inputs, build, r, inter in options + split:
        candidate = _candidate(build, r, inter, name.endswith("_pairs_split"))
        why = verify(region, candidate, [x, *inputs], ctx.sizes, trials)
        if why is None:
            layout = "interleaved" if inter else "rotate_half"
            partial = "" if r == width else f" r={r}"
            negative = " negative_angles" if "_negative" in name else ""
            split_pairs = " pairs_split_into_halves" if name.endswith("_pairs_split") else ""
            return f"{layout}{partial}{negative}{split_pairs}", region, candidate, [x, *inputs]
        reason = why
    return reason


def run(ctx: GraphContext) -> None:
    for anchor, reported in anchors(ctx.graph):
        if not ctx.alive(anchor):
            continue
        reason = "no rotated tensor found"
        done = False
        for x in _sources(anchor):
            if done or not ctx.alive(x):
                break
            xv = tensor_value(x)
            sinks = [
                n
                for n in forward_closure(x, _rotation_op, max_nodes=64)
                if tensor_value(n) is not None
                and same_shape(tuple(value(n).shape), tuple(xv.shape))
            ]
            sinks = [sink for sink in reversed(sinks) if anchor in ancestors([sink])]
            reason = emit_first(ctx, FUSION, sinks, lambda sink, x=x: _try(ctx, x, sink), reason)
            done = reason is None
        if not done and ctx.alive(anchor) and reported:
            ctx.rejected(FUSION, "rope", anchor, reason)
