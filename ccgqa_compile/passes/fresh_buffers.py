"""Writes into a freshly made tensor, rewritten as the functional ops they are.

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
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node
from torch.fx.proxy import GraphAppendingTracer, Proxy

from .common import GraphContext
from .fx_util import graph_changed, is_mutating, is_size_value, storage_base, value, written_tensors
from .region import propagate_fake

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


def _writes(buf: Node, order: dict[Node, int]) -> list[Node] | None:
    """The ``buf[index] = value`` writes, if they are all that writes ``buf``'s storage and
    every read of it comes after the last one; else None."""
    writes = [
        u for u in buf.users
        if u.op == "call_function" and u.target is operator.setitem and u.args[0] is buf
    ]  # fmt: skip
    if not writes:
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


def run(ctx: GraphContext) -> None:
    graph = ctx.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    buffers = [n for n in graph.nodes if _is_factory(n) and isinstance(value(n), torch.Tensor)]
    changed = False
    for buf in buffers:
        writes = _writes(buf, order)
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
