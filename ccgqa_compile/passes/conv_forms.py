"""Normal form: convolutions along time written without ``conv1d`` become ``conv1d``.

The CCGQA prologue's anchors are 1-D convolutions. Code that computes one without calling
``conv1d`` is rewritten to the call it computes:

- ``conv2d`` over a unit spatial axis (``(B, C, 1, T)`` against a ``(1, k)`` kernel) is
  ``conv1d`` of the squeezed tensors;
- taps written out, ``sum_j w_j * x[t + o_j]``: each term a time slice of one tensor (or it
  shifted by pads, zeros entering), times a factor constant along time (one filter per
  channel) or contracted with a weight by ``einsum`` (channels mixed, per group where the
  weight and x share a letter);
- windows, ``x.unfold(t, k, 1)`` or shifted copies of x stacked on a new axis, times
  taps summed over the window axis, or contracted with them by ``einsum``.

What is read off the code (which tensor, which axis, each tap's offset and weight) only
proposes the rewrite: the original and the ``conv1d`` computation are both evaluated on
float64 probes (random inputs and weights, at every size assignment) and must agree.
The original nodes are taken out of the graph (a dead reader would count as a reader
outside a fused region) and recorded: a convolution no fusion took is put back as written
(``undo_unused``), so the graph a user gets back is the one they wrote wherever nothing
fused.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.proxy import GraphAppendingTracer, Proxy

from .common import GraphContext
from .evaluate import Evaluator, NotEvaluable, Probes, agree, concrete, real_tensors
from .fx_util import (
    ancestors,
    arg,
    einsum_pair,
    is_add,
    is_function,
    is_method,
    is_mutating,
    is_zero_fill,
    is_zero_pad,
    same_computation,
    tensor_value,
    value,
)
from .region import propagate_fake, stable_sort

CONV2D = {torch.conv2d, F.conv2d}
_MULS = (operator.mul, torch.mul)
MAX_TAPS = 16  # a longer "kernel" is some other sum of slices


@dataclass
class Taps:
    """``out`` = sum over taps j of ``weights[j]`` applied to ``x`` shifted by ``offsets[j]``
    along ``time`` (zeros outside x), ``length`` positions long.

    The weights' roles are x's axes: ``batch`` axes the weights do not see, ``group`` axes
    they are indexed by (one filter per channel: every channel axis is a group), ``contr``
    axes they contract; ``outc`` are the weights' own output axes. ``weights[j]`` is laid
    out (group..., outc..., contr...) as a node, or as (node, axis, index): that select.
    ``out_axes`` orders (batch..., group..., outc..., time) as ``out`` lays them out."""

    out: Node
    x: Node
    time: int
    offsets: list[int]
    weights: list[Any]
    length: int
    batch: list[int]
    group: list[int]
    contr: list[int]
    outc_sizes: list[int]
    out_axes: list[int]
    # the taps read x with one channel axis split, (axis, sizes): each shifted copy viewed
    # as heads (``shift(x).view(B, T, H, D)``), a window viewed per group
    # (``x.unfold(1, k, 1).reshape(B, T, G, C // G, k)``); the conv reads x unflattened so
    split: tuple[int, tuple[int, ...]] | None = None

    def x_value(self) -> torch.Tensor:
        return _split_value(self.x, self.split)


@dataclass
class Rewrite:
    old: Node  # the output as written
    new: Node
    conv: Node
    made: list[Node]  # the conv1d computation's nodes
    # the code as written, taken out of the graph while the conv stands in for it (its
    # output always among them): each node, its name, op, target, args, kwargs and meta,
    # in graph order
    removed: list[tuple]


# ---- reading shifts -------------------------------------------------------------------


def _int(x: Any, sizes: dict) -> Any:
    return concrete(value(x), sizes)


def _shift_chain(node: Node) -> tuple[Node, list[Node]]:
    """The tensor ``node`` is sliced or zero-padded from, and those ops in order."""
    chain = []
    while True:
        if is_function(node, operator.getitem) and _slices_only(node.args[1]):
            chain.append(node)
            node = node.args[0]
        elif is_zero_pad(node) or _is_narrow(node):
            chain.append(node)
            node = node.args[0]
        elif (part := _zeros_around(node)) is not None:
            chain.append(node)
            node = part
        else:
            return node, chain[::-1]


def _zeros_around(node: Node) -> Node | None:
    """The one part of ``torch.cat([zeros, x], d)`` (zeros on either side or both) that is
    not zeros the graph made: a zero pad of x along d."""
    if not is_function(node, torch.cat) or not isinstance(node.args[0], (list, tuple)):
        return None
    parts = [p for p in node.args[0] if not is_zero_fill(p)]
    return parts[0] if len(parts) == 1 and isinstance(parts[0], Node) else None


def _is_narrow(node: Node) -> bool:
    return (is_method(node, "narrow") or is_function(node, torch.narrow)) and len(node.args) == 4


def _slices_only(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, slice) or i is Ellipsis for i in items)


def _positions(base: Node, chain: list[Node], sizes: dict) -> list[list[int]] | None:
    """Per axis, the base position each element of the chain's result reads (-1: a zero)."""
    shape = concrete(tuple(tensor_value(base).shape), sizes)
    pos = [list(range(n)) for n in shape]
    for op in chain:
        if is_function(op, operator.getitem):
            items = op.args[1] if isinstance(op.args[1], tuple) else (op.args[1],)
            if sum(i is Ellipsis for i in items) > 1:
                return None
            if Ellipsis in items:
                at = items.index(Ellipsis)
                items = items[:at] + (slice(None),) * (len(pos) - len(items) + 1) + items[at + 1 :]
            for axis, s in enumerate(items):
                bounds = slice(_int(s.start, sizes), _int(s.stop, sizes), _int(s.step, sizes))
                pos[axis] = pos[axis][bounds]
        elif _is_narrow(op):
            axis, start, length = (_int(a, sizes) for a in op.args[1:])
            axis %= len(pos)
            start %= max(len(pos[axis]), 1)
            pos[axis] = pos[axis][start : start + length]
        elif is_function(op, torch.cat):
            parts, axis = op.args[0], arg(op, 1, "dim", 0) % len(pos)
            at = next(i for i, p in enumerate(parts) if not is_zero_fill(p))
            lo, hi = (sum(concrete(tuple(tensor_value(p).shape), sizes)[axis] for p in side)
                      for side in (parts[:at], parts[at + 1 :]))  # fmt: skip
            pos[axis] = [-1] * lo + pos[axis] + [-1] * hi
        else:
            pads = [_int(p, sizes) for p in arg(op, 1, "pad")]
            for i in range(len(pads) // 2):
                axis, lo, hi = len(pos) - 1 - i, pads[2 * i], pads[2 * i + 1]
                p = pos[axis]
                p = [-1] * lo + p if lo >= 0 else p[-lo:]
                p = p + [-1] * hi if hi >= 0 else p[: len(p) + hi]
                pos[axis] = p
    return pos


def _shift(operand: Node, sizes: dict) -> tuple[Node, int | None, int, int] | None:
    """(base, time axis or None where unshifted, offset, length): ``operand`` is ``base``
    shifted along one axis (zeros entering), every other axis whole."""
    base, chain = _shift_chain(operand)
    bv = tensor_value(base)
    if bv is None or tensor_value(operand) is None or bv.dim() != tensor_value(operand).dim():
        return None
    pos = _positions(base, chain, sizes)
    if pos is None:
        return None
    n = concrete(tuple(bv.shape), sizes)
    moved = [a for a, p in enumerate(pos) if p != list(range(n[a]))]
    if not moved:
        return base, None, 0, None
    if len(moved) != 1:
        return None
    axis = moved[0]
    p = pos[axis]
    read = [(i, q) for i, q in enumerate(p) if q >= 0]
    if not read:
        return None
    offset = read[0][1] - read[0][0]
    want = [i + offset if 0 <= i + offset < n[axis] else -1 for i in range(len(p))]
    return (base, axis, offset, len(p)) if p == want else None


# ---- reading taps ---------------------------------------------------------------------


def _add_leaves(node: Node) -> list[Any]:
    leaves = []
    for a in node.args:
        if _plain_add(a) and len(a.users) == 1:
            leaves += _add_leaves(a)
        else:
            leaves.append(a)
    return leaves


def _plain_add(node: Any) -> bool:
    return is_add(node) and len(node.args) == 2 and not node.kwargs


def _is_mul(node: Any) -> bool:
    return (
        (is_function(node, *_MULS) or is_method(node, "mul", "__mul__"))
        and len(node.args) == 2
        and not node.kwargs
    )


def _term(leaf: Any, sizes: dict) -> list[tuple]:
    """Readings of one addend as a tap: (base, time, offset, length, kind, weight, letters,
    split) with kind "mul" (weight: the factor) or "einsum" (letters: x's, the weight's,
    out's); ``split``: the operand is the shifted base with a channel axis split (else
    None)."""
    if _is_mul(leaf):
        pairs = [(leaf.args[i], leaf.args[1 - i], None) for i in (0, 1)]
        kind = "mul"
    elif (letters := einsum_pair(leaf)) is not None:
        la, lb, out = letters
        pairs = [(leaf.args[1], leaf.args[2], (la, lb, out)), (leaf.args[2], leaf.args[1], (lb, la, out))]
        kind = "einsum"
    else:
        return []
    found = []
    for operand, weight, letters in pairs:
        if isinstance(operand, Node) and isinstance(weight, Node):
            for *shift, split in _shift_readings(operand, sizes):
                found.append((*shift, kind, weight, letters, split))
    return found


def _shift_readings(operand: Node, sizes: dict) -> list[tuple]:
    """(base, time, offset, length, split): ``operand`` shifted from base, or base shifted
    and then one channel axis split (``shift(x).view(B, T, H, D)``)."""
    found = []
    shift = _shift(operand, sizes)
    if shift is not None:
        found.append((*shift, None))
    split = _channel_split(operand)
    if split is not None:
        inner = _shift(operand.args[0], sizes)
        if inner is not None:
            base, time, offset, length = inner
            if time is None or time < split[0]:
                found.append((base, time, offset, length, split))
    return found


def _channel_split(node: Any) -> tuple[int, tuple[int, ...]] | None:
    """(axis, sizes): ``node`` (a view, reshape or unflatten) splits one axis of its input
    into several, every other axis kept."""
    if not is_method(node, "view", "reshape", "unflatten") or not isinstance(node.args[0], Node):
        return None
    a, b = tuple(tensor_value(node.args[0]).shape), tuple(tensor_value(node).shape)
    lead = 0
    while lead < min(len(a), len(b)) and a[lead] == b[lead]:
        lead += 1
    trail = 0
    while trail < min(len(a), len(b)) - lead and a[-1 - trail] == b[-1 - trail]:
        trail += 1
    if len(a) - lead - trail != 1 or len(b) - lead - trail < 2:
        return None
    sizes = b[lead : len(b) - trail]
    if not all(isinstance(n, int) for n in sizes) or math.prod(sizes) != a[lead]:
        return None
    return lead, tuple(sizes)


def _roles_mul(xv: torch.Tensor, time: int, factors: list[tuple], ov: Any) -> dict | None:
    """Axes of x a tap's factor varies along are its groups (one filter per channel);
    ``factors``: each tap's (shape, dtype)."""
    rank = xv.dim()
    group: set[int] = set()
    for shape, dtype in factors:
        if len(shape) > rank or dtype != xv.dtype:
            return None
        shape = (1,) * (rank - len(shape)) + tuple(shape)
        if shape[time] != 1:
            return None  # a factor varying along time is no filter
        for axis, size in enumerate(shape):
            if size != 1:
                if size != xv.shape[axis]:
                    return None
                group.add(axis)
    if not isinstance(ov, torch.Tensor) or ov.dim() != rank or ov.dtype != xv.dtype:
        return None
    group_axes = sorted(group)
    batch = [a for a in range(rank) if a != time and a not in group]
    produced = batch + group_axes + [time]
    return {"batch": batch, "group": group_axes, "contr": [], "outc_sizes": [],
            "out_axes": [produced.index(a) for a in range(rank)]}  # fmt: skip


def _roles_einsum(
    xv: torch.Tensor, wshape: tuple, time: int, letters: tuple[str, str, str]
) -> dict | None:
    xl, wl, ol = letters
    if any(len(set(s)) != len(s) for s in letters) or len(xl) != xv.dim() or len(wl) != len(wshape):
        return None
    tl = xl[time]
    if tl in wl or tl not in ol or set(ol) - set(xl) - set(wl):
        return None
    batch = [a for a, c in enumerate(xl) if c in ol and c not in wl and c != tl]
    group = [a for a, c in enumerate(xl) if c in ol and c in wl]
    contr = [a for a, c in enumerate(xl) if c in wl and c not in ol]
    if len(batch) + len(group) + len(contr) + 1 != len(xl):
        return None  # x summed over an axis the weight does not see
    outc = [c for c in wl if c not in xl]
    if any(c not in ol for c in outc):
        return None
    w_order = (
        [wl.index(xl[a]) for a in group]
        + [wl.index(c) for c in outc]
        + [wl.index(xl[a]) for a in contr]
    )
    produced = [xl[a] for a in batch] + [xl[a] for a in group] + outc + [tl]
    return {"batch": batch, "group": group, "contr": contr,
            "outc_sizes": [int(wshape[wl.index(c)]) for c in outc],
            "out_axes": [produced.index(c) for c in ol], "w_order": w_order}  # fmt: skip


def _taps_of_sum(root: Node, sizes: dict) -> tuple[Taps, list[Any]] | None:
    """The taps among a sum's addends (and the addends that are not taps)."""
    leaves = _add_leaves(root)
    readings = [_term(leaf, sizes) if isinstance(leaf, Node) else [] for leaf in leaves]
    bases = {(r[0], r[7]) for rs in readings for r in rs if r[1] is not None}
    for base, split in bases:
        for kind in ("mul", "einsum"):
            picked, rest = [], []
            for leaf, rs in zip(leaves, readings):
                match = [
                    r for r in rs
                    if (r[0] is base or same_computation(r[0], base)) and r[4] == kind
                    and r[7] == split
                ]  # fmt: skip
                (picked if match else rest).append(match[0] if match else leaf)
            shifted = [r for r in picked if r[1] is not None]
            times = {r[1] for r in shifted}
            lengths = {r[3] for r in shifted}
            if len(picked) < 2 or not shifted or len(times) != 1 or len(lengths) != 1:
                continue
            time, length = times.pop(), lengths.pop()
            bv = _split_value(base, split)
            n = concrete(tuple(bv.shape), sizes)[time]
            if any(r[1] is None and length != n for r in picked):
                continue  # an unshifted addend is as long as x; the taps are not
            offsets = [r[2] for r in picked]
            if len(set(offsets)) != len(offsets) or max(offsets) - min(offsets) >= MAX_TAPS:
                continue
            weights = [r[5] for r in picked]
            if kind == "mul":
                shapes = [(tuple(tensor_value(w).shape), tensor_value(w).dtype) for w in weights]
                roles = _roles_mul(bv, time, shapes, tensor_value(root))
                if roles is None:
                    continue
                weights = [("mul", w, shape) for w, (shape, _) in zip(weights, shapes)]
            else:
                letter_sets = {r[6] for r in picked}
                wshapes = {tuple(tensor_value(w).shape) for w in weights}
                if len(letter_sets) != 1 or len(wshapes) != 1:
                    continue
                letters = letter_sets.pop()
                roles = _roles_einsum(bv, wshapes.pop(), time, letters)
                if roles is None:
                    continue
                order = roles.pop("w_order")
                weights = [("einsum", w, order) for w in weights]
            taps = Taps(root, base, time, offsets, weights, length, **roles, split=split)
            return taps, rest
    return None


def _taps_of_window(node: Node, sizes: dict) -> Taps | None:
    """``(window * w).sum(k)`` or ``einsum(.., window, w)`` contracting the window axis k,
    where the window is ``x.unfold(t, k, 1)`` or a ``torch.stack`` of shifted copies of x."""
    if is_method(node, "sum") or is_function(node, torch.sum):
        dim = arg(node, 1, "dim")
        if arg(node, 2, "keepdim", False) or not _is_mul(node.args[0]) or dim is None:
            return None
        prod = node.args[0]
        found = [(a, w) for a in prod.args if (w := _window(a, sizes)) is not None]
        if len(found) != 1 or len(prod.users) != 1:
            return None
        (window, (x, time, offsets, length, at, split)), = found
        factor = next((a for a in prod.args if a is not window), None)
        if not isinstance(factor, Node):
            return None
        wv, fv = tensor_value(window), tensor_value(factor)
        dims = list(dim) if isinstance(dim, (tuple, list)) else [dim]
        if len(dims) != 1 or dims[0] % wv.dim() != at or fv is None:
            return None
        f_at = at - (wv.dim() - fv.dim())  # the factor's window axis, right-aligned
        if fv.dim() > wv.dim() or f_at < 0 or fv.shape[f_at] != len(offsets):
            return None
        shape = tuple(fv.shape[:f_at]) + tuple(fv.shape[f_at + 1 :])
        roles = _roles_mul(_split_value(x, split), time, [(shape, fv.dtype)], tensor_value(node))
        if roles is None:
            return None
        weights = [("mul", ("select", factor, f_at, j), shape) for j in range(len(offsets))]
    elif (letters := einsum_pair(node)) is not None:
        la, lb, out = letters
        found = [
            (operand, weight, ul, wl, w)
            for operand, weight, ul, wl in ((node.args[1], node.args[2], la, lb),
                                            (node.args[2], node.args[1], lb, la))
            if (w := _window(operand, sizes)) is not None
        ]  # fmt: skip
        if len(found) != 1:
            return None
        _, weight, ul, wl, (x, time, offsets, length, at, split) = found[0]
        if not isinstance(weight, Node) or len(set(ul)) != len(ul) or len(ul) <= at:
            return None
        kl = ul[at]
        if kl not in wl or kl in out or len(wl) != tensor_value(weight).dim():
            return None
        w_at = wl.index(kl)
        wshape = tuple(tensor_value(weight).shape)
        if wshape[w_at] != len(offsets):
            return None
        roles = _roles_einsum(
            _split_value(x, split),
            wshape[:w_at] + wshape[w_at + 1 :],
            time,
            (ul[:at] + ul[at + 1 :], wl.replace(kl, ""), out),
        )
        if roles is None:
            return None
        order = roles.pop("w_order")
        weights = [("einsum", ("select", weight, w_at, j), order) for j in range(len(offsets))]
    else:
        return None
    return Taps(node, x, time, offsets, weights, length, **roles, split=split)


def _window(node: Any, sizes: dict) -> tuple | None:
    """(x, x's time axis, each window position's offset, the output length, the window
    axis, a channel split or None) of ``x.unfold(t, k, 1)`` (the window axis last, x's
    time axis shortened to T - k + 1), of that with one channel axis split
    (``.reshape(B, T, G, C // G, k)``), or of ``torch.stack`` of copies of x each shifted
    along one time axis (zeros entering; the stack's axis the window's)."""
    split = _channel_split(node)
    if split is not None and _is_unfold_window(node.args[0]):
        inner = _window(node.args[0], sizes)
        rank = tensor_value(node.args[0]).dim()
        if inner is None or not inner[1] < split[0] < rank - 1:
            return None
        x, time, offsets, length, at, _ = inner
        return x, time, offsets, length, at + len(split[1]) - 1, split
    if _is_unfold_window(node):
        x, time, k = _unfold_window_args(node)
        n = concrete(tuple(tensor_value(x).shape), sizes)[time]
        return x, time, list(range(k)), n - k + 1, tensor_value(node).dim() - 1, None
    if not is_function(node, torch.stack) or not isinstance(node.args[0], (list, tuple)):
        return None
    parts = node.args[0]
    if not 2 <= len(parts) <= MAX_TAPS or not all(isinstance(p, Node) for p in parts):
        return None
    shifts = [_shift(p, sizes) for p in parts]
    if any(s is None for s in shifts):
        return None
    x = shifts[0][0]  # each copy may view x anew (``x.unflatten(...)`` per copy)
    if not all(s[0] is x or same_computation(s[0], x) for s in shifts):
        return None
    times = {s[1] for s in shifts if s[1] is not None}
    if len(times) != 1:
        return None
    time = times.pop()
    n = concrete(tuple(tensor_value(x).shape), sizes)[time]
    lengths = {n if s[1] is None else s[3] for s in shifts}
    offsets = [s[2] for s in shifts]
    if len(lengths) != 1 or len(set(offsets)) != len(offsets):
        return None
    at = arg(node, 1, "dim", 0) % tensor_value(node).dim()
    return x, time, offsets, lengths.pop(), at, None


def _split_value(x: Node, split) -> torch.Tensor:
    return tensor_value(x) if split is None else tensor_value(x).unflatten(*split)


def _is_unfold_window(node: Any) -> bool:
    if not is_method(node, "unfold") or len(node.args) != 4 or node.kwargs:
        return False
    x, dim, size, step = node.args
    return (
        isinstance(dim, int) and isinstance(size, int) and step == 1 and tensor_value(x) is not None
    )


def _unfold_window_args(window: Node) -> tuple[Node, int, int]:
    x, dim, size, _ = window.args
    return x, dim % tensor_value(x).dim(), size


# ---- writing the conv1d ----------------------------------------------------------------


def _tap_weight(spec: tuple, taps: Taps, rank: int, proxy) -> Proxy:
    """One tap's weight as (groups * out channels, in channels per group) for conv1d."""
    kind, source, layout = spec
    w = (
        proxy(source[1]).select(source[2], source[3])
        if isinstance(source, tuple)
        else proxy(source)
    )
    if kind == "mul":  # right-aligned to x, sized along the group axes only
        w = w.reshape(*((1,) * (rank - len(layout))), *layout)
        order = taps.group + [a for a in range(rank) if a not in taps.group]
        return w.permute(*order).reshape(-1, 1)
    xv = taps.x_value()
    inner = 1
    for a in taps.contr:
        inner *= int(xv.shape[a])
    return w.permute(*layout).reshape(-1, inner)


def _emit_taps(graph: torch.fx.Graph, taps: Taps, rest: list[Any]) -> tuple[Node, Node]:
    """(the conv1d computation's output, its conv1d), traced before ``taps.out``."""
    tracer = GraphAppendingTracer(graph)

    def proxy(n):
        return Proxy(n, tracer) if isinstance(n, Node) else n

    xv = taps.x_value()
    rank, time = xv.dim(), taps.time
    lo_off, hi_off = min(taps.offsets), max(taps.offsets)
    kernel = hi_off - lo_off + 1
    with graph.inserting_before(taps.out):
        x = proxy(taps.x)
        if taps.split is not None:
            x = x.unflatten(*taps.split)
        base = x
        n = xv.shape[time]
        # x shifted so that tap j reads position t + offsets[j] - lo_off
        lo, hi = -lo_off, taps.length + kernel - 1 - n + lo_off
        if lo or hi:
            x = F.pad(x, [0, 0] * (rank - 1 - time) + [lo, hi])
        axes = taps.batch + taps.group + taps.contr + [time]
        x = x.permute(*axes)
        nb = len(taps.batch)
        x = x.flatten(0, nb - 1) if nb else x.unsqueeze(0)
        channels = len(taps.group) + len(taps.contr)
        x = x.flatten(1, channels) if channels else x.unsqueeze(1)
        groups = 1
        for a in taps.group:
            groups *= int(xv.shape[a])
        per_tap = [_tap_weight(w, taps, rank, proxy) for w in taps.weights]
        by_offset = dict(zip(taps.offsets, per_tap))
        zero = torch.zeros_like(per_tap[0]) if len(by_offset) < kernel else None
        w = torch.stack([by_offset.get(lo_off + j, zero) for j in range(kernel)], -1)
        conv = F.conv1d(x, w, None, 1, 0, 1, groups)
        y = conv
        out_channels = [int(xv.shape[a]) for a in taps.group] + list(taps.outc_sizes)
        if out_channels:
            y = y.unflatten(1, out_channels)
        else:
            y = y.squeeze(1)
        if nb:
            y = y.unflatten(0, [base.size(a) if not isinstance(xv.shape[a], int) else xv.shape[a]
                                for a in taps.batch])  # fmt: skip
        else:
            y = y.squeeze(0)
        y = y.permute(*taps.out_axes)
        for other in rest:
            y = y + proxy(other)
    return y.node, conv.node


def _emit_conv2d(graph: torch.fx.Graph, node: Node, unit: int) -> tuple[Node, Node]:
    other = 5 - unit  # the spatial axis that is time
    tracer = GraphAppendingTracer(graph)

    def pick(x, default):
        return (
            x if isinstance(x, int) else x[other - 2] if isinstance(x, (list, tuple)) else default
        )

    with graph.inserting_before(node):
        x = Proxy(arg(node, 0, "input"), tracer).squeeze(unit)
        w = Proxy(arg(node, 1, "weight"), tracer).squeeze(unit)
        bias = arg(node, 2, "bias")
        bias = Proxy(bias, tracer) if isinstance(bias, Node) else None
        stride, padding, dilation = (pick(arg(node, i, name, d), d) for i, name, d in
                                     ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))  # fmt: skip
        conv = F.conv1d(x, w, bias, stride, padding, dilation, arg(node, 6, "groups", 1))
        y = conv.unsqueeze(unit)
    return y.node, conv.node


def _unit_conv2d(node: Node) -> int | None:
    """The spatial axis (2 or 3) along which a conv2d's input and kernel are one wide and
    unpadded: the conv2d is a conv1d along the other."""
    if not is_function(node, *CONV2D):
        return None
    xv, wv = tensor_value(arg(node, 0, "input")), tensor_value(arg(node, 1, "weight"))
    padding = arg(node, 4, "padding", 0)
    if xv is None or wv is None or xv.dim() != 4 or wv.dim() != 4 or isinstance(padding, str):
        return None
    for unit in (2, 3):
        pad = padding if isinstance(padding, int) else padding[unit - 2]
        if xv.shape[unit] == 1 and wv.shape[unit] == 1 and pad == 0:
            return unit
    return None


# ---- proof and bookkeeping ---------------------------------------------------------------


def _same_function(ctx: GraphContext, old: Node, new: Node, x: Node) -> bool:
    """``old`` and ``new`` agree on float64 probes of x and of every tensor input they read."""
    # x computed again for each shifted copy (``x.unflatten(...)`` per copy): one value
    copies = [n for n in ancestors([old], stop={x}) if same_computation(n, x)]
    stop = {x, *copies}
    feeds_from = [n for n in ancestors([old, new], stop=stop) if n.op == "placeholder" or n in stop]
    for seed, sizes in enumerate(ctx.sizes):
        probes = Probes(sizes, tensor_value(x).device, seed=7 + seed)
        feeds = {n: probes.like(n) for n in feeds_from if isinstance(tensor_value(n), torch.Tensor)
                 and tensor_value(n).dtype.is_floating_point}  # fmt: skip
        feeds.update({n: feeds[x] for n in copies if x in feeds})
        try:
            with real_tensors():
                a, b = Evaluator(ctx.graph, sizes).run([old, new], feeds)
        except (NotEvaluable, RuntimeError, TypeError, ValueError, IndexError):
            return False
        if not agree(b, a):
            return False
    return True


def _replace(ctx: GraphContext, old: Node, x: Node, emit) -> Rewrite | None:
    """Emit the conv1d computation and, where it is proven, route old's readers to it
    and take out the code it replaces."""
    graph = ctx.graph
    before = set(graph.nodes)
    try:
        new, conv = emit()
        made = [n for n in graph.nodes if n not in before]
        propagate_fake(graph, made)
        proven = _same_function(ctx, old, new, x)
    except Exception:  # the rewrite does not trace or run here: the code stays as written
        proven = False
    if not proven:
        for n in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(n)
        return None
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in made)
    return Rewrite(old, new, conv, made, _take_out(graph, old, x))


def _take_out(graph: torch.fx.Graph, old: Node, x: Node) -> list[tuple]:
    """Erase ``old`` and the nodes only it reads (side-effect free), recording them."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    dead: set[Node] = set()
    for node in sorted(ancestors([old], stop={x}), key=order.__getitem__, reverse=True):
        if node.op not in ("call_function", "call_method") or is_mutating(node):
            continue
        if node is old or (node.users and all(u in dead for u in node.users)):
            dead.add(node)
    kept = sorted(dead, key=order.__getitem__)
    removed = [(n, n.name, n.op, n.target, n.args, dict(n.kwargs), dict(n.meta)) for n in kept]
    for n in reversed(kept):
        graph.erase_node(n)
    return removed


def _put_back(ctx: GraphContext, rw: Rewrite) -> bool:
    """Re-create the code as written before ``rw.new`` and route its readers back."""
    graph = ctx.graph
    made: dict[Node, Node] = {}
    removed = {rec[0] for rec in rw.removed}
    outside = [i for rec in rw.removed for i in _inputs(rec) if i not in removed]
    if not all(ctx.alive(i) for i in outside):
        return False  # an input of the original is gone (fused away): the conv stays
    with graph.inserting_before(rw.new):
        for node, name, op, target, args, kwargs, meta in rw.removed:
            args, kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: made.get(n, n))
            back = graph.create_node(op, target, args, kwargs, name=name)
            back.meta.update(meta)
            made[node] = back
    rw.new.replace_all_uses_with(made[rw.old])
    return True


def _inputs(rec: tuple) -> list[Node]:
    found: list[Node] = []
    torch.fx.node.map_arg((rec[4], rec[5]), found.append)
    return found


def _proposal(node: Node, sizes: dict) -> tuple[Node, Any] | None:
    """(the tensor convolved, how to emit the conv1d) where ``node`` computes one."""
    unit = _unit_conv2d(node)
    if unit is not None:
        return arg(node, 0, "input"), partial(_emit_conv2d, node.graph, node, unit)
    # a size with a symbol no assignment gives (a float lifted by ``dynamic=True`` times a
    # size) is not read: the code stays as written
    unreadable = (IndexError, ValueError, TypeError, NotEvaluable)
    if _plain_add(node) and not (len(node.users) == 1 and _plain_add(next(iter(node.users)))):
        try:
            found = _taps_of_sum(node, sizes)
        except unreadable:
            return None
        if found is not None:
            return found[0].x, partial(_emit_taps, node.graph, *found)
        return None
    try:
        taps = _taps_of_window(node, sizes)
    except unreadable:
        return None
    return None if taps is None else (taps.x, partial(_emit_taps, node.graph, taps, []))


def run(ctx: GraphContext) -> list[Rewrite]:
    """Rewrite every convolution written otherwise to ``conv1d``; returns what
    ``undo_unused`` may put back."""
    done: list[Rewrite] = []
    gone: set[Node] = set()  # taken out by an earlier rewrite
    for node in list(ctx.graph.nodes):
        if node in gone:
            continue
        proposal = _proposal(node, ctx.sizes[0])
        if proposal is not None and (rw := _replace(ctx, node, *proposal)) is not None:
            done.append(rw)
            gone.update(rec[0] for rec in rw.removed)
    if done:
        stable_sort(ctx.graph)
    return done


def undo_unused(ctx: GraphContext, rewrites: list[Rewrite]) -> None:
    """Put back each convolution as written where no fusion took its conv1d."""
    graph = ctx.graph
    for rw in reversed(rewrites):
        if ctx.alive(rw.conv) and ctx.alive(rw.new) and _put_back(ctx, rw):
            for node in reversed(rw.made):
                if ctx.alive(node) and not node.users:
                    graph.erase_node(node)
    if rewrites:
        stable_sort(graph)
