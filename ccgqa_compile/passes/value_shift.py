"""The CCGQA value shift, moved from the block's input onto the projected V half.

CCGQA builds half of V from the previous token: ``v_prev = linear(x_prev, W)`` with
``x_prev`` the input shifted by s tokens, zero rows entering (../shared/design/ccgqa.md).
Compiled as written, the shift copies the whole (B, T, E) input and its backward adds a
padded, sliced (B, T, E) gradient: on the H100 0.28 ms of a 3.2 ms E2048 block fwd+bwd and
0.09 of 0.99 ms at E512 (``scripts/bench_value_shift.py``, docs/benchmarks). A linear map
without bias sends zero rows to zero rows and acts on each row alone, so for a shift along
any dim but the one it contracts

    linear(shift(x, s, dim), W) == shift(linear(x, W), s, dim)

and the rewritten graph shifts the (B, T, E_kv / 2) projection instead (one
``pad(y, (..., s, 0))[..., :-s, :]``: s zero rows in front, s rows dropped at the end);
Inductor fuses that shift into the copy that concatenates V, and the backward needs no
padded input gradient. Measured: the shift's kernels 0.306 -> 0.018 ms, the E2048 block
3.22 -> 3.12 ms (what remains of the gap to a block without shift is V's two half-width projections). This is our
form of "folding the shift into the V load": the attention kernel still reads one V tensor,
which Inductor builds already shifted.

Recognised by what the linear's input computes, not by its spelling: people write
``pad(x, (0, 0, s, 0))[:, :T]``, ``pad(x[:, :-s], (0, 0, s, 0))``, ``pad(x, (0, 0, s, -s))``,
``cat((zeros, x[:, :-s]), 1)``, ``roll(x, s, 1)`` with the first rows zeroed (in place,
``where`` or ``masked_fill``), ``empty_like(x)`` filled by slice assignments, or the same
along dim 0 of a sequence-first (T, 1, E) tensor. The walk back from a linear's input
through data-movement ops (pads, slices, rolls, cats, selections and masks, constructors,
in-place writes and their functional scatter forms) proposes; a linear is considered when
that walk meets an op that can move rows and a tensor of the input's shape and dtype (a
candidate x, nearest first). The ops from x to the input, in-place writes before the linear
included, are replayed in float64 on random x (at every size assignment, two draws), and the
rewrite happens only when the result is x shifted by some s >= 1 along some dim but the
last, zero rows entering. The dim and s are searched on a per-row fingerprint (literals of
the graph's pads and rolls tried first: at a length <= s the shifted input is all zero, and
the graph's own s is reported).

Left as written, each with a report line saying why: a bias (the entering rows would become
the bias, not zero); entering rows that are not zero (a roll without zeroing wraps around,
a pad with a value, a replicate pad); a shift along the contracted (feature) dim; different
shifts per batch; a slice dropping the wrong end; a region that reads another runtime
tensor (a decode state's previous row) or cuts the gradient; x written in place before the
linear. Not considered, and not reported: a linear whose input no row-moving op touches
(q_proj(x), out_proj(o)), or that has no tensor of its input's shape behind it (a pad or
cat that changes the length: no shift). vLLM's ``cat((linear(zeros), linear(x)[:-1]))``
shifts after the projection already: nothing to move (its one-row projection of zeros is
left as written).

Then V's two halves, ``cat((linear(x, W_now), shift(linear(x, W_prev))), -1)``, project
the same x, and become one matmul with ``cat((W_now, W_prev))`` split in two
(``_merge_with_sibling_projection``): x is read once forward and backward, and dx is one
matmul instead of two summed. The report's idiom then ends in ``_one_v_matmul``. Runs as
part of the pre-grad pass, on Dynamo's torch-level graph.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

from .._inductor_compat import stable_topological_sort
from .common import GraphContext
from .evaluate import Evaluator, NotEvaluable, Probes, agree, concrete, real_tensors
from .fx_util import (
    arg,
    call_name,
    depends_on_tensor_input,
    is_basic_index,
    is_cast,
    is_function,
    is_layout,
    is_method,
    is_mutating,
    is_size_value,
    node_inputs,
    same_shape,
    storage_base,
    tensor_value,
    value,
    written_tensors,
)
from .region import propagate_fake

FUSION = "value_shift"
IDIOM = "linear_of_token_shift"

_LINEAR = (torch._C._nn.linear, F.linear)
_PAD = (torch._C._nn.pad, F.pad, torch.constant_pad_nd)
_CAT = (torch.cat, torch.concat, torch.concatenate, torch.stack)
# a slice assignment as a functional op (passes/fresh_buffers.py writes them so)
_SCATTERS = (torch.slice_scatter, torch.select_scatter, torch.index_put, torch.scatter)
# ops through which the walk back from a linear's input looks for the shifted tensor: they
# move, select, mask or build rows (``mul`` and ``where`` for a mask zeroing the first rows)
_MOVE_FUNCTIONS = {
    *_PAD, *_CAT, torch.roll, torch.narrow, torch.where, torch.masked_fill, torch.index_select,
    torch.gather, torch.mul, operator.mul, torch.zeros, torch.zeros_like, torch.empty,
    torch.empty_like, torch.full, torch.full_like, operator.getitem, *_SCATTERS, torch.select,
}  # fmt: skip
_MOVE_METHODS = {
    "roll", "narrow", "masked_fill", "where", "index_select", "gather", "mul", "__mul__",
    "new_zeros", "new_empty", "new_full", "__getitem__", "select", "slice_scatter",
    "select_scatter", "index_put", "scatter", "index_fill",
}  # fmt: skip
_CONSTRUCTOR_NAMES = ("zeros", "empty", "full")
_ROW_WRITE_METHODS = {
    "fill_", "zero_", "masked_fill_", "index_fill_", "copy_", "index_put_", "scatter_",
    "index_copy_", "masked_scatter_",
}  # fmt: skip
# a node whose walk found none of these only selects, masks or casts: not a shift
_SHIFT_HINT_FUNCTIONS = {*_PAD, *_SCATTERS, torch.roll, torch.where, torch.masked_fill}
_MAX_WALK = 48
_MAX_CANDIDATES = 6
_MAX_LITERAL = 64


# ---- proposing ------------------------------------------------------------------------


def _moves_rows(node: Node) -> bool:
    return (
        is_layout(node)
        or is_cast(node)
        or is_basic_index(node)
        or is_function(node, *_MOVE_FUNCTIONS)
        or is_method(node, *_MOVE_METHODS)
    )


def _is_constructor(node: Node) -> bool:
    name = call_name(node)
    return node.op in ("call_function", "call_method") and any(
        name.startswith(c) or name.startswith("new_" + c) for c in _CONSTRUCTOR_NAMES
    )


def _hints_a_shift(node: Node) -> bool:
    """An op that can move rows along a dim other than the features: a pad, a roll, a
    select or mask, a constructor, an in-place write, a cat on another dim than the last."""
    if is_function(node, *_SHIFT_HINT_FUNCTIONS) or is_method(
        node, "roll", "masked_fill", "where", "slice_scatter", "select_scatter", "index_put",
        "scatter", "index_fill",
    ):  # fmt: skip
        return True
    if _is_constructor(node) or _writes_rows(node):
        return True
    if is_function(node, *_CAT):
        v = tensor_value(node)
        dim = arg(node, 1, "dim", 0)
        return v is not None and isinstance(dim, int) and dim % v.dim() != v.dim() - 1
    return False


def _writes_rows(node: Node) -> bool:
    """An in-place write that can set rows (``buf[i] = v``, ``fill_``, ``copy_``...), not an
    in-place arithmetic op (``h.mul_(2)``)."""
    return is_function(node, operator.setitem) or is_method(node, *_ROW_WRITE_METHODS)


def _writes_before(graph: torch.fx.Graph, stop: Node) -> list[Node]:
    """The in-place writes that run before ``stop``."""
    found = []
    for node in graph.nodes:
        if node is stop:
            break
        if is_mutating(node) or is_function(node, operator.setitem):
            found.append(node)
    return found


def _writes_into(writes: list[Node], nodes: set[Node], skip: Any = None) -> list[Node]:
    """The writes landing in the storage of one of ``nodes`` (except ``skip``'s)."""
    bases = {storage_base(n) for n in nodes} - {skip}
    return [
        w
        for w in writes
        if w not in nodes and any(storage_base(t) in bases for t in written_tensors(w))
    ]


def _walk(u: Node, linear: Node) -> tuple[list[Node], bool]:
    """Nodes met walking back from the linear's input ``u`` through row-moving ops and the
    in-place writes into what they build (nearest first), and whether one of them can shift."""
    writes = _writes_before(linear.graph, linear)
    seen: list[Node] = []
    todo = [u]
    hint = False
    while todo and len(seen) < _MAX_WALK:
        node = todo.pop(0)
        if node in seen or not isinstance(node, Node):
            continue
        seen.append(node)
        if not _moves_rows(node) and not is_mutating(node):
            continue  # a tensor computed otherwise: a candidate x, not walked through
        if node.op not in ("call_function", "call_method"):
            continue
        hint = hint or _hints_a_shift(node)
        todo.extend(i for i in node_inputs(node) if tensor_value(i) is not None)
        for w in _writes_into(writes, {node}):
            hint = hint or _writes_rows(w)
            todo.append(w)
    return seen, hint


def _candidates(u: Node, walked: list[Node]) -> list[Node]:
    """Tensors the shift may be of: same shape, dtype and device as ``u``, computed from the
    program's inputs (not a constant)."""
    want = tensor_value(u)
    found = []
    for node in walked:
        v = tensor_value(node)
        if node is u or v is None or not v.dtype.is_floating_point or is_mutating(node):
            continue
        if v.dtype != want.dtype or v.device != want.device:
            continue
        if not same_shape(tuple(v.shape), tuple(want.shape)) or not depends_on_tensor_input(node):
            continue
        found.append(node)
    return found[:_MAX_CANDIDATES]


def _literals(walked: list[Node]) -> list[int]:
    """Positive ints the walked ops are written with, the pads' and rolls' first (in a graph
    compiled at a length <= s the shifted input is all zero: any s fits, the code's is
    reported)."""

    def ints(obj: Any, out: list[int]) -> None:
        if isinstance(obj, bool):
            return
        if isinstance(obj, int) and 1 <= abs(obj) <= _MAX_LITERAL:
            out.append(abs(obj))
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                ints(o, out)
        elif isinstance(obj, slice):
            ints((obj.start, obj.stop), out)

    first: list[int] = []
    rest: list[int] = []
    for node in walked:
        if node.op not in ("call_function", "call_method"):
            continue
        out = first if is_function(node, *_PAD, torch.roll) or is_method(node, "roll") else rest
        ints((node.args[1:], tuple(node.kwargs.values())), out)
    return list(dict.fromkeys(first + rest))


# ---- proving --------------------------------------------------------------------------


class _NotAShift(Exception):
    """The candidate cannot be the shifted tensor; the message says why."""


def _region(u: Node, x: Node, linear: Node) -> tuple[list[Node], list[Node]]:
    """(nodes to replay in graph order, non-tensor nodes fed their example values): what
    computes ``u`` from ``x`` as the linear reads it, in-place writes before it included."""
    graph = linear.graph
    writes = _writes_before(graph, linear)
    order = {n: i for i, n in enumerate(graph.nodes)}
    base_x = storage_base(x)
    for w in writes:
        if order[w] > order[x] and any(storage_base(t) is base_x for t in written_tensors(w)):
            raise _NotAShift(f"{w.name} writes {x.name} in place before the linear reads it")
    run: set[Node] = set()
    fed: set[Node] = set()
    todo = [u]
    while todo:
        while todo:
            node = todo.pop()
            if node is x or node in run or node in fed:
                continue
            v = value(node)
            if is_size_value(node) or isinstance(v, (torch.device, torch.dtype, torch.layout)):
                fed.add(node)
                continue
            if node.op == "placeholder" and isinstance(v, torch.Tensor):
                raise _NotAShift(f"it also reads {node.name}, another runtime tensor")
            if node.op not in ("call_function", "call_method", "get_attr"):
                raise _NotAShift(f"it reads {node.name}, a {node.op}")
            run.add(node)
            todo.extend(node_inputs(node))
            if len(run) > 4 * _MAX_WALK:
                raise _NotAShift("the ops between it and the linear are too many to be a shift")
        for w in _writes_into(writes, run, skip=base_x):  # x is read as it is
            run.add(w)
            todo.extend(node_inputs(w))
    return sorted(run, key=order.__getitem__), sorted(fed, key=order.__getitem__)


def _replay(
    graph: torch.fx.Graph, u: Node, x: Node, nodes: list[Node], fed: list[Node], sizes, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, u) in float64 on a random x: the region's ops and writes run in graph order
    (uninitialised memory reads as NaN, so a row nothing writes never passes for zero)."""
    probes = Probes(sizes, tensor_value(x).device, seed)
    env: dict[Node, Any] = {x: probes.like(x)}
    for node in fed:
        v = value(node)
        env[node] = concrete(v, sizes) if is_size_value(node) else v
    evaluator = Evaluator(graph, sizes)
    for node in nodes:
        out = evaluator.execute(node, env)
        if isinstance(out, torch.Tensor) and "empty" in call_name(node) and out.is_floating_point():
            out.fill_(math.nan)
        env[node] = out
    return env[x], env[u]


def _shift(x: torch.Tensor, dim: int, s: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    n = x.shape[dim]
    if s < n:
        out.narrow(dim, s, n - s).copy_(x.narrow(dim, 0, n - s))
    return out


def _fingerprint(t: torch.Tensor, dim: int, weights: torch.Tensor) -> torch.Tensor:
    """One number per index along ``dim``: the same random combination of each row."""
    others = [d for d in range(t.dim()) if d != dim]
    return (t * weights).sum(others) if others else t * weights


def _find_shift(x: torch.Tensor, u: torch.Tensor, literals: list[int]) -> tuple[int, int] | str:
    """(dim, s) with u == shift(x, s, dim), zero rows entering, else why not. Searched on
    fingerprints (a (T,) vector per dim), confirmed on the whole tensors."""
    dims = [x.dim() - 2, *range(x.dim() - 2)] if x.dim() >= 2 else []
    gen = torch.Generator(device=x.device).manual_seed(7)
    wrapped = None
    for dim in dims:
        n = x.shape[dim]
        shape = [1 if d == dim else size for d, size in enumerate(x.shape)]
        weights = torch.randn(shape, generator=gen, dtype=x.dtype, device=x.device)
        fx, fu = _fingerprint(x, dim, weights), _fingerprint(u, dim, weights)
        for s in dict.fromkeys([*literals, *range(1, n)]):
            if s >= n and s not in literals:
                continue
            kept = max(n - s, 0)
            if kept and not agree(fu[s:], fx[:kept]):
                continue
            if s < n and not agree(fu[:s], torch.zeros_like(fu[:s])):
                wrapped = wrapped or (dim, s)
                continue
            if agree(u, _shift(x, dim, s)):
                return dim, s
    if wrapped is not None:
        return (
            f"it is shifted by {wrapped[1]} along dim {wrapped[0]}, but the rows entering are "
            "not zero (a wrap-around roll, a pad value, a replicate pad): linear(row) != 0 there"
        )
    return "it is no shift along a dim but the last (the features) with zero rows entering"


def _prove(
    ctx: GraphContext, linear: Node, u: Node, walked: list[Node]
) -> tuple[Node, int, int, list[Node]] | str:
    """(x, dim, s, the ops from x to u) for the nearest candidate x whose shift the linear
    reads, else why not."""
    candidates = _candidates(u, walked)
    literals = _literals(walked)
    reasons = []
    for x in candidates:
        try:
            nodes, fed = _region(u, x, linear)
            found = _prove_candidate(ctx, linear, u, x, nodes, fed, literals)
        except _NotAShift as why:
            found = str(why)
        if not isinstance(found, str):
            return (x, *found, nodes)
        reasons.append(f"of {x.name}: {found}")
    return "; ".join(reasons[:2])


def _prove_candidate(
    ctx: GraphContext,
    linear: Node,
    u: Node,
    x: Node,
    nodes: list[Node],
    fed: list[Node],
    literals: list[int],
) -> tuple[int, int] | str:
    if tensor_value(x).requires_grad and not tensor_value(u).requires_grad:
        return (
            "the gradient does not flow through it (detach or no_grad): it would after the rewrite"
        )
    found: tuple[int, int] | None = None
    try:
        with real_tensors():
            for sizes in ctx.sizes:
                for seed in (1, 2):
                    xv, uv = _replay(linear.graph, u, x, nodes, fed, sizes, seed)
                    if found is None:
                        found = _find_shift(xv, uv, literals)
                        if isinstance(found, str):
                            return found
                    elif not agree(uv, _shift(xv, *found)):
                        return (
                            f"a shift by {found[1]} along dim {found[0]} on one probe, another "
                            f"function on another (seed {seed}, sizes {sizes})"
                        )
    except NotEvaluable as why:
        return f"cannot be evaluated: {why}"
    except (RuntimeError, ValueError, TypeError, IndexError) as why:
        return f"probe evaluation failed: {type(why).__name__}: {str(why).splitlines()[0][:160]}"
    return found


# ---- rewriting ------------------------------------------------------------------------


def run(ctx: GraphContext) -> int:
    """Move every proven shift past its linear; returns how many were moved."""
    graph = ctx.graph
    moved = 0
    for node in list(graph.nodes):
        if not ctx.alive(node) or not is_function(node, *_LINEAR):
            continue
        u, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        if not isinstance(u, Node) or tensor_value(u) is None or tensor_value(u).dim() < 2:
            continue
        walked, hint = _walk(u, node)
        if not hint or not _candidates(u, walked):
            continue  # no row moved, or no tensor of its shape to be a shift of
        proven = _prove(ctx, node, u, walked)
        if isinstance(proven, str):
            ctx.rejected(FUSION, IDIOM, node, f"the linear's input {u.name}: {proven}")
            continue
        if bias is not None:
            ctx.rejected(
                FUSION, IDIOM, node,
                "the linear has a bias: its rows for the shifted-in zeros are the bias, "
                "where the shift moved after it would give zeros",
            )  # fmt: skip
            continue
        x, dim, shift, region = proven
        projected, shifted = _rewrite(graph, node, x, weight, dim, shift, region)
        merged = _merge_with_sibling_projection(graph, projected, shifted)
        ctx.fused(FUSION, f"{IDIOM}_{shift}" + ("_one_v_matmul" if merged else ""))
        moved += 1
    if moved:
        from .fx_util import graph_changed

        graph_changed()
        stable_topological_sort(graph)  # the merged matmul sits after its first reader
    return moved


def _rewrite(
    graph: torch.fx.Graph,
    linear: Node,
    x: Node,
    weight: Node,
    dim: int,
    shift: int,
    region: list[Node],
) -> tuple[Node, Node]:
    """``linear(u, W)`` -> ``pad(linear(x, W), (..., s, 0))[..., :-s]`` along ``dim``; then the ops
    that built ``u`` and nothing else reads are erased."""
    u = linear.args[0] if linear.args else linear.kwargs["input"]
    ndim = tensor_value(u).dim()
    pads = (0, 0) * (ndim - 1 - dim) + (shift, 0)
    # the last s rows dropped by a negative stop: right at every length, T <= s included
    # (all rows zero), where a negative pad or a narrow to T would need T's value
    rows = (slice(None),) * dim + (slice(None, -shift),)
    with graph.inserting_before(linear):
        projected = graph.call_function(linear.target, (x, weight, None))
        padded = graph.call_function(torch._C._nn.pad, (projected, pads))
        shifted = graph.call_function(operator.getitem, (padded, rows))
    propagate_fake(graph, [projected, padded, shifted])
    linear.replace_all_uses_with(shifted)
    graph.erase_node(linear)
    _erase_dead(graph, region)
    return projected, shifted


def _erase_dead(graph: torch.fx.Graph, region: list[Node]) -> None:
    """Erase the ops that built the linear's input and nothing else reads: side-effect-free
    ops without users, and in-place writes into a tensor nobody else reads."""
    alive = [n for n in region if n.op in ("call_function", "call_method")]
    erased: set[Node] = set()
    changed = True
    while changed:
        changed = False
        for node in reversed(alive):
            if node in erased or node.users:
                continue
            if is_mutating(node) or is_function(node, operator.setitem):
                base = storage_base(written_tensors(node)[0]) if node.args else None
                if not isinstance(base, Node) or not _only_written(base):
                    continue
            graph.erase_node(node)
            erased.add(node)
            changed = True


def _only_written(base: Node) -> bool:
    """Whether every use of ``base`` (and of its views) is an in-place write without users:
    its value is never read, so the writes are dead."""
    if base.op not in ("call_function", "call_method"):
        return False  # an input's storage: a write there is visible to the caller
    todo, seen = [base], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if (is_mutating(user) or is_function(user, operator.setitem)) and not user.users:
                if user.args and user.args[0] is node:
                    continue
                return False  # reads node as a source
            if (is_layout(user) or is_basic_index(user)) and storage_base(user) is base:
                todo.append(user)
                continue
            return False
    return True


def _weight_shape(node: Any) -> tuple[int, int] | None:
    val = tensor_value(node)
    if val is None or val.dim() != 2:
        return None
    if not all(isinstance(n, int) for n in val.shape):
        return None
    return tuple(val.shape)


def _merge_with_sibling_projection(
    graph: torch.fx.Graph, projected: torch.fx.Node, shifted: torch.fx.Node
) -> bool:
    """V's other half: ``cat((linear(x, W_now), shifted), -1)`` with ``shifted`` now
    ``shift(linear(x, W_prev))``. Both halves project the same x, so one matmul with
    ``cat((W_now, W_prev))`` computes both (each output column is the same dot product)
    and reads x once, forward and backward (one dx matmul, no sum of two). Merged only
    for exactly that: a bias-free linear of the same x, same weight width and dtype, and
    a ``cat`` on the last dim taking the sibling's and the shifted half."""
    x, w_prev = projected.args[0], projected.args[1]
    prev_shape = _weight_shape(w_prev)
    last = tensor_value(shifted).dim() - 1
    cats = [
        u
        for u in shifted.users
        if u.target is torch.cat
        and u.kwargs.get("dim", u.args[1] if len(u.args) > 1 else 0) in (-1, last)
        and isinstance(u.args[0], (tuple, list))
    ]
    if prev_shape is None or len(cats) != 1:
        return False
    for sibling in x.users:
        if sibling is projected or not is_function(sibling, *_LINEAR):
            continue
        if arg(sibling, 2, "bias") is not None or arg(sibling, 0, "input") is not x:
            continue
        if sibling not in cats[0].args[0]:
            continue
        w_now = arg(sibling, 1, "weight")
        now_shape = _weight_shape(w_now)
        if now_shape is None or now_shape[1] != prev_shape[1]:
            continue
        if tensor_value(w_now).dtype != tensor_value(w_prev).dtype:
            continue
        with graph.inserting_before(projected):
            weight = graph.call_function(torch.cat, ((w_now, w_prev),), {"dim": 0})
            both = graph.call_function(projected.target, (x, weight, None))
            now = graph.call_function(torch.narrow, (both, -1, 0, now_shape[0]))
            prev = graph.call_function(torch.narrow, (both, -1, now_shape[0], prev_shape[0]))
        now.meta.update(sibling.meta)
        prev.meta.update(projected.meta)
        sibling.replace_all_uses_with(now)
        projected.replace_all_uses_with(prev)
        graph.erase_node(sibling)
        graph.erase_node(projected)
        return True
    return False
