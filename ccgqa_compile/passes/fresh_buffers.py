"""Writes into freshly made tensors, rewritten as the functional ops they are.

Code fills a buffer by slice assignment where others stack or concatenate: HYDRA's RoPE
(``out = torch.empty_like(pairs); out[..., 0] = x1 * cos - x2 * sin; out[..., 1] = ...``),
a value shift built in ``torch.empty`` (``v[:, 1:, h:] = v_prev[:, :-1]``), serving code
writing q/k/v into a zeroed buffer. The recognizers read values through pure ops, and an
in-place write makes every view of its storage a value known only when the program runs.

When a tensor made by a factory (``empty``, ``zeros``, ``full``, their ``_like`` and
``new_`` forms: no input shares its storage) is written only by ``buf[index] = value``
with a basic index (ints, slices, Ellipsis), and read only after its last write, each
write becomes ``select_scatter`` / ``slice_scatter`` of the previous version and the
readers read the last version: exactly what AOTAutograd's functionalization makes of it
later, so the graph computes the same whether or not anything fuses.

In-place ops on a tensor the graph computed into new memory (``nn.SiLU(inplace=True)`` on a
projection, ``gate.mul_(up)``, ``x += y``) likewise become their out-of-place ops, later
readers reading the new value, where nothing views that tensor and it aliases no input (the
example values show ``x.float()`` of a float tensor is x).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node
from torch.fx.proxy import GraphAppendingTracer, Proxy

from .common import GraphContext
from .fx_util import (
    graph_changed,
    is_mutating,
    is_size_value,
    requires_grad,
    storage_base,
    value,
    view_chain,
    written_tensors,
)
from .region import grad_modes, propagate_fake

_FACTORIES = {
    torch.empty, torch.zeros, torch.ones, torch.full,
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
}  # fmt: skip
_FACTORY_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full"}


def _is_factory(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _FACTORIES
    return node.op == "call_method" and node.target in _FACTORY_METHODS


def _basic_index(index: Any, ndim: int) -> tuple[Any, ...] | None:
    """The index as one item per dim (ints and slices), or None if it is not basic."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not (isinstance(i, (int, slice)) or i is Ellipsis) for i in items):
        return None
    bounds = [b for i in items if isinstance(i, slice) for b in (i.start, i.stop, i.step)]
    if not all(isinstance(b, (int, type(None))) for b in bounds):
        return None  # symbolic bounds: leave it
    if sum(i is Ellipsis for i in items) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = ndim - (len(items) - 1)
        items = items[:at] + (slice(None),) * fill + items[at + 1 :]
    if len(items) > ndim:
        return None
    return items + (slice(None),) * (ndim - len(items))


def _scatter(base: Proxy, items: tuple[Any, ...], src: Any, dtype: torch.dtype) -> Proxy:
    """``base`` with ``base[items] = src`` applied, as a new tensor."""
    d = next((i for i, item in enumerate(items) if item != slice(None)), None)
    if d is None:  # the whole tensor: src broadcast and cast, as a write of it would
        if isinstance(src, Proxy):
            return src.to(dtype).expand_as(base)
        return torch.full_like(base, src)
    item, rest = items[d], items[d + 1 :]
    if isinstance(item, int):
        inner = base.select(d, item)
        return torch.select_scatter(base, _scatter(inner, rest, src, dtype), d, item)
    inner = base[(slice(None),) * d + (item,)]  # keeps dim d: the rest index from d + 1
    step = 1 if item.step is None else item.step
    new_inner = _scatter(inner, (slice(None),) * (d + 1) + rest, src, dtype)
    return torch.slice_scatter(base, new_inner, d, item.start, item.stop, step)


def _writes(buf: Node, order: dict[Node, int], modes: dict[Node, Any]) -> list[Node] | None:
    """The ``buf[index] = value`` writes, if they are all that writes ``buf``'s storage and
    every read of it comes after the last one; else None. Writes under no_grad are left:
    they change values without cutting a gradient path an earlier write made."""
    writes = [
        u for u in buf.users
        if u.op == "call_function" and u.target is operator.setitem and u.args[0] is buf
    ]  # fmt: skip
    if not writes or any(modes.get(w) is False for w in writes):
        return None
    ndim = value(buf).dim()
    for w in writes:
        if _basic_index(w.args[1], ndim) is None or w.users:
            return None
    last = max(order[w] for w in writes)
    for u in buf.users:
        if u not in writes and order[u] < last and not is_size_value(u):
            return None
    for n in buf.graph.nodes:  # any other write to the storage (a view written, out=)
        if n not in writes and is_mutating(n) and any(storage_base(t) is buf for t in written_tensors(n)):
            return None
    return sorted(writes, key=order.__getitem__)


# in-place forms whose out-of-place twin computes the same values into a new tensor
_INPLACE_METHODS = {
    "add_", "sub_", "mul_", "div_", "neg_", "exp_", "sigmoid_", "tanh_", "pow_", "abs_",
    "sqrt_", "rsqrt_", "clamp_", "clamp_min_", "clamp_max_", "masked_fill_", "addcmul_",
    "addcdiv_", "lerp_", "relu_", "reciprocal_", "square_",
}  # fmt: skip
_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
}  # fmt: skip


def _inplace_form(node: Node) -> tuple[Any, str] | None:
    """(the out-of-place target, its kind) of an in-place op writing its first argument."""
    if node.op == "call_method" and node.target in _INPLACE_METHODS:
        return node.target[:-1], "call_method"
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return _INPLACE_OPERATORS[node.target], "call_function"
    if node.op == "call_function" and node.kwargs.get("inplace") is True:  # F.silu(x, inplace=True)
        return node.target, "call_function"
    return None


def _same_storage(a: torch.Tensor, b: Any) -> bool:
    if not isinstance(b, torch.Tensor):
        return False
    try:
        return a.untyped_storage()._cdata == b.untyped_storage()._cdata
    except Exception:  # noqa: BLE001  (no storage to compare: assume shared)
        return True


def _is_fresh(node: Any) -> bool:
    """A tensor the graph computes into new memory (no input, view or write shares it:
    ``x.contiguous()``, ``x.float()`` or ``x.to(x.dtype)`` return x itself, which the
    example values show)."""
    if not (isinstance(node, Node) and node.op in ("call_function", "call_method")):
        return False
    v = value(node)
    return (
        isinstance(v, torch.Tensor) and storage_base(node) is node
        and not is_mutating(node) and _inplace_form(node) is None
        and not any(_same_storage(v, value(i)) for i in node.all_input_nodes)
    )  # fmt: skip


def _only_view_of_fresh(node: Any) -> bool:
    """A view of a tensor the graph made, through views each read by nothing else
    (Megatron's ``scores = baddbmm(...).view(b, h, s, s)`` then ``scores.masked_fill_``):
    the only name its memory has, so writing it is writing a fresh tensor."""
    chain = view_chain(node)
    if len(chain) < 2 or not _is_fresh(chain[-1]):
        return False
    return all(set(outer.users) == {inner} for inner, outer in zip(chain, chain[1:]))


def _inplace_on_fresh(graph: torch.fx.Graph, modes: dict[Node, Any]) -> bool:
    """``g = silu(h, inplace=True)``, ``g.mul_(up)``, ``x += y`` on tensors the graph made
    (or on the only view of one): each write becomes its out-of-place op, and later
    readers read the new value. Only where no view of the written tensor is taken before
    the write (it would see it)."""
    changed = False
    for node in list(graph.nodes):
        form = _inplace_form(node)
        if form is None or not node.args:
            continue
        base = node.args[0]
        if not (_is_fresh(base) or _only_view_of_fresh(base)):
            continue
        if modes.get(node) is False and requires_grad(base):
            continue  # a write under no_grad keeps base's gradient path (straight-through)
        order = {n: i for i, n in enumerate(graph.nodes)}
        if any(
            base in view_chain(u)[1:] and order[u] < order[node]
            for u in base.users if u is not node
        ):  # fmt: skip
            continue  # a view taken before the write sees it: left as written
        # (a view taken after it reads the written value, as it reads the new one)
        target, kind = form
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        with graph.inserting_before(node):
            if kind == "call_method":
                new = graph.call_method(target, node.args, kwargs)
            else:
                new = graph.call_function(target, node.args, kwargs)
        try:
            propagate_fake(graph, [new])
        except Exception:
            graph.erase_node(new)
            continue
        if value(new).shape != value(base).shape or value(new).dtype != value(base).dtype:
            graph.erase_node(new)  # the write would have broadcast or cast into base
            continue
        later = [u for u in base.users if u not in (node, new) and order[u] > order[node]]
        for u in later:
            u.replace_input_with(base, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed = True
    return changed


def run(ctx: GraphContext) -> None:
    graph = ctx.graph
    modes = grad_modes(graph)  # the writes' own modes: the rewrites below keep their nodes
    if _inplace_on_fresh(graph, modes):
        graph_changed()
    order = {n: i for i, n in enumerate(graph.nodes)}
    buffers = [n for n in graph.nodes if _is_factory(n) and isinstance(value(n), torch.Tensor)]
    changed = False
    for buf in buffers:
        writes = _writes(buf, order, modes)
        if writes is None:
            continue
        readers = [u for u in buf.users if u not in writes]
        tracer = GraphAppendingTracer(graph)
        current, new = buf, []
        dtype = value(buf).dtype
        for w in writes:
            before = set(graph.nodes)
            with graph.inserting_before(w):
                src = w.args[2]
                src = Proxy(src, tracer) if isinstance(src, Node) else src
                items = _basic_index(w.args[1], value(buf).dim())
                current = _scatter(Proxy(current, tracer), items, src, dtype).node
            new += [n for n in graph.nodes if n not in before]
        try:
            propagate_fake(graph, new)
        except Exception:  # not traceable as written here: leave the writes
            for n in reversed(new):
                graph.erase_node(n)
            continue
        for r in readers:
            if not is_size_value(r):
                r.replace_input_with(buf, current)
        for w in writes:
            graph.erase_node(w)
        changed = True
    if changed:
        graph_changed()
