"""A region of a graph (what lies between some sources and some sinks), its evaluation on
probes, and its replacement by a fused op.

Recognition by computation: a recognizer proposes a region and a candidate (a function of
some of the region's inputs, built on a ``torch.ops.ccgqa`` op); ``Region.verify`` runs
both in float64 on the same random inputs, at several scales and at every size assignment
the graph may run at, and only a candidate that agrees everywhere is emitted. The
candidate is then traced into the graph in place of the sinks (before autograd: the op's
registered backward is the one used).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch.fx import Node
from torch.fx.proxy import GraphAppendingTracer, Proxy

from .evaluate import (
    Evaluator,
    NotEvaluable,
    Probes,
    agree,
    concrete,
    fake_mode_of,
    real_tensors,
)
from .fx_util import (
    ancestors,
    computation_context,
    depends_on_tensor_input,
    descendants,
    is_mutating,
    is_runtime_scalar,
    is_size_value,
    node_inputs,
    same_computation,
    same_shape,
    storage_base,
    value,
    written_tensors,
)

# a candidate: (*input values, out_dtypes=[...]) -> one value per sink
Candidate = Callable[..., Sequence[Any]]


def reads_dtype_only(node: Node, of: Node) -> bool:
    """Whether ``node`` reads ``of`` for its dtype alone (``x.type_as(of)``, ``x.to(of)``)."""
    return (
        node.op == "call_method" and node.target in ("type_as", "to")
        and bool(node.args) and node.args[0] is not of and of in node.args[1:]
        and of not in node.kwargs.values()
    )  # fmt: skip


class Rejected(Exception):
    """A candidate region that must not be replaced; the message says why."""


@dataclass
class Region:
    graph: torch.fx.Graph
    sources: list[Node]
    sinks: list[Node]
    nodes: set[Node] = field(default_factory=set)
    leaves: list[Node] = field(default_factory=list)

    @classmethod
    def between(cls, sources: Sequence[Node], sinks: Sequence[Node]) -> Region:
        """Every node on a path from a source to a sink (sinks included); the other nodes
        those read are the region's leaves (sources among them)."""
        graph = sinks[0].graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        sources = list(dict.fromkeys(sources))
        # values computed from the sources: not through a read of a dtype (OLMo's RoPE
        # tables ``type_as(q)`` stay tables, not values computed from q)
        on_path = (descendants(sources, skip=reads_dtype_only) & ancestors(sinks)) - set(sources)
        for sink in sinks:
            if sink not in on_path:
                raise Rejected(f"{sink.name} does not depend on the sources")
        for node in on_path:
            if is_mutating(node):
                raise Rejected(f"{node.name} writes a tensor in place")
            if node.op not in ("call_function", "call_method"):
                raise Rejected(f"{node.name} is a {node.op}")
        _check_one_grad_mode(graph, on_path)
        _check_clamps(on_path)
        leaves = {i for n in on_path for i in node_inputs(n) if i not in on_path}
        return cls(
            graph,
            sources,
            list(sinks),
            on_path,
            sorted(leaves | set(sources), key=order.__getitem__),
        )

    def escapes(self) -> list[Node]:
        """Region nodes other than the sinks that something outside the region reads (a
        size read off a source may be: it stays, and the op does not change it)."""
        inside = self.nodes
        return [
            n
            for n in inside
            if n not in self.sinks
            and not is_size_value(n)
            and any(u not in inside for u in n.users)
        ]

    def float_leaves(self) -> list[Node]:
        """Float tensors the region reads values of (not those it reads only the size of:
        ``x.float().reshape(*x.shape[:-1], -1, 2)`` under dynamic shapes)."""
        return [
            n
            for n in self.leaves
            if isinstance(value(n), torch.Tensor)
            and (value(n).dtype.is_floating_point or value(n).dtype.is_complex)
            and not all(is_size_value(u) for u in n.users if u in self.nodes)
        ]

    def runtime_scalars(self) -> list[Node]:
        """Leaves holding a float known only when the program runs (``is_runtime_scalar``)."""
        return [n for n in self.leaves if is_runtime_scalar(n)]

    def device(self) -> torch.device:
        for node in (*self.sources, *self.leaves):
            v = value(node)
            if isinstance(v, torch.Tensor):
                return v.device
        return torch.device("cpu")

    # ---- evaluation ----

    def feeds(
        self,
        sizes: dict[sympy.Symbol, int],
        seed: int,
        given: dict[Node, Any] | None = None,
        scale: dict[Node, float] | None = None,
        zero_rows: Sequence[Node] = (),
    ) -> dict[Node, Any]:
        """A value for every leaf: ``given`` ones, constants computed, tensors of the
        compiled program's inputs drawn at random (float64), scaled by ``scale``; every
        other row (last dim) of ``zero_rows`` leaves exactly zero (padding positions)."""
        given = dict(given or {})
        scale = scale or {}
        probes = Probes(sizes, self.device(), seed)
        evaluator = Evaluator(self.graph, sizes)
        out: dict[Node, Any] = {}
        context = computation_context(self.graph)
        for leaf in self.leaves:
            if leaf in given:
                out[leaf] = given[leaf]
                continue
            twin = next((e for e in out if same_computation(leaf, e, context)), None)
            if twin is not None:  # computed apart, equal when the program runs
                out[leaf] = out[twin]
                continue
            v = value(leaf)
            if is_size_value(leaf):  # x.size(1) of an input: its symbols at these sizes
                out[leaf] = concrete(v, sizes)
            # a tensor written in place after it is built counts as a run-time input too
            elif not isinstance(v, torch.Tensor) or not depends_on_tensor_input(leaf):
                out[leaf] = evaluator.run([leaf], {})[0]
            elif v.dtype.is_floating_point or v.dtype.is_complex:
                out[leaf] = probes.like(leaf, scale.get(leaf, 1.0))
            else:
                raise Rejected(
                    f"{leaf.name} ({v.dtype}) is a runtime input of the region: its value "
                    "is not known when compiling"
                )
        for leaf in zero_rows:
            rows = out[leaf].clone()
            rows.reshape(-1, rows.shape[-1])[::2] = 0
            out[leaf] = rows
        return out

    def evaluate(self, feeds: dict[Node, Any], sizes: dict[sympy.Symbol, int]) -> list[Any]:
        return Evaluator(self.graph, sizes).run(self.sinks, feeds)


def run_candidate(candidate: Candidate, inputs: Sequence[Node], feeds: dict[Node, Any]):
    values = [feeds[n] if isinstance(n, Node) else n for n in inputs]
    outs = candidate(*values, out_dtypes=[None] * 8)
    return list(outs)


def verify(
    region: Region,
    candidate: Candidate,
    inputs: Sequence[Node],
    sizes_list: Sequence[dict[sympy.Symbol, int]],
    trials: Sequence[dict[str, Any]],
    rtol: float = 1e-8,
) -> str | None:
    """None when the candidate computes the region's sinks on every trial, else why not.

    Each trial is a dict of ``Region.feeds`` keyword arguments (seed, given, scale)."""
    try:
        with real_tensors():
            for sizes in sizes_list:
                for trial in trials:
                    feeds = region.feeds(sizes, **trial)
                    expected = region.evaluate(feeds, sizes)
                    actual = run_candidate(candidate, inputs, feeds)
                    for sink, a, e in zip(region.sinks, actual, expected):
                        if not agree(a, e, rtol):
                            return f"it computes another function at {sink.name} (probe {trial.get('seed', 0)})"
    except Rejected as why:
        return str(why)
    except NotEvaluable as why:
        return f"cannot be evaluated: {why}"
    except (RuntimeError, ValueError, TypeError, IndexError) as why:
        return f"probe evaluation failed: {type(why).__name__}: {str(why).splitlines()[0][:160]}"
    return None


# ---- rewriting ----------------------------------------------------------------------


def _graph_order(graph: torch.fx.Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def grad_modes(graph: torch.fx.Graph) -> dict[Node, Any]:
    """For each node, the grad mode Dynamo's ``_set_grad_enabled`` calls put it in (None:
    the mode the graph is called in). Dynamo ends every grad-mode block by setting the
    mode back, so the last switch names the mode the graph is called in: nodes before the
    first switch get that value too, and one mode has one name."""
    switches = [
        bool(n.args[0])
        for n in graph.nodes
        if n.op == "call_function" and n.target is torch._C._set_grad_enabled
    ]
    mode, out = (switches[-1] if switches else None), {}
    for node in graph.nodes:
        out[node] = mode
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            mode = bool(node.args[0])
    return out


def insertion_point(region: Region, inputs: Sequence[Any]) -> tuple[Node, list[Node]]:
    """Where the replacement goes: after its last input, before the first reader of a
    sink, and in the grad mode the sinks were computed in (a table built under
    ``torch.no_grad()`` must not pull the op into that block: its output would not
    require grad). With it, the in-place writes to its inputs that must move after it: a
    write the region's reads came before (a decode step's conv state overwritten with the
    window it read) whose input is ready only later (a temperature computed there), when
    nothing else in between touches that storage."""
    graph = region.graph
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    modes = grad_modes(graph)
    sink_modes = {modes[s] for s in region.sinks}
    if len(sink_modes) != 1:
        raise Rejected("the outputs are computed in different grad modes")
    (want,) = sink_modes
    start = max(order[n] for n in inputs if isinstance(n, Node)) + 1
    after, late = _write_bounds(region, inputs, order)
    start = max(start, after)
    readers = [order[u] for s in region.sinks for u in s.users if u not in region.nodes]
    stop = min(readers) if readers else len(nodes) - 1
    before = min((order[w] for w in late), default=len(nodes))
    for i in range(start, min(stop, before) + 1):
        if modes[nodes[i]] == want:
            return nodes[i], []
    for i in range(start, stop + 1):
        if modes[nodes[i]] == want and _writes_can_wait(region, late, i, nodes, order):
            return nodes[i], late
    raise Rejected("no place after the inputs and before the readers has the outputs' grad mode")


def _writes_can_wait(region: Region, writes: list[Node], where: int, nodes: list[Node], order) -> bool:
    """Whether ``writes`` may move to position ``where``: no node between them and there
    (other than the region's, which the op replaces) reads or writes the written storage
    or uses the write's result."""
    for w in writes:
        base = storage_base(w.args[0])
        if w.users:
            return False
        for node in nodes[order[w] + 1 : where]:
            if node in region.nodes:
                continue
            if any(storage_base(i) is base for i in node_inputs(node)):
                return False
    return True


def _write_bounds(region: Region, inputs: Sequence[Any], order: dict[Node, int]) -> tuple[int, list[Node]]:
    """Where the op may read its inputs, given in-place writes to them (or to views of
    their storage): after every write that comes before the region's reads of that storage
    (a KV cache after this step's ``index_copy_``, even where the query was projected
    before it), and before every later one (a conv state overwritten once the
    step has read it; those writes are returned). A write followed by another read of the
    region leaves no single place to read the input: rejected."""
    bases = {storage_base(n) for n in inputs if isinstance(n, Node)}
    first = min(order[n] for n in region.nodes)
    # a view reads nothing when it runs: its readers do (``v.transpose(1, 2)`` taken before
    # ``v.clamp_()``, repeated after it, reads v once, after the write)
    readers = [n for n in region.nodes if storage_base(n) is n]
    reads = {
        b: [order[n] for n in readers if any(storage_base(i) is b for i in node_inputs(n))]
        for b in bases
    }  # fmt: skip
    after, late = 0, []
    for node in region.graph.nodes:
        if not is_mutating(node):
            continue
        hit = [storage_base(t) for t in written_tensors(node) if storage_base(t) in bases]
        if not hit:
            continue
        base = hit[0]
        read_before = any(r < order[node] for r in reads[base])
        read_after = any(r > order[node] for r in reads[base])
        if order[node] < first or (read_after and not read_before):
            after = max(after, order[node] + 1)
            continue
        if read_after:
            raise Rejected(f"{node.name} writes an input in place between the region's reads")
        late.append(node)
    return after, late


EMITTED = "ccgqa_emitted"


def emitted(node: Node) -> bool:
    """Whether ``node`` is part of an op call a fusion wrote (its table builds, casts)."""
    return bool(node.meta.get(EMITTED))


def emit(region: Region, candidate: Candidate, inputs: Sequence[Any]) -> list[Node]:
    """Trace ``candidate`` into the graph on ``inputs`` and route every use of the region's
    sinks to its outputs (cast to each sink's dtype). Returns the new output nodes."""
    graph = region.graph
    where, delayed = insertion_point(region, inputs)
    tracer = GraphAppendingTracer(graph)
    before = set(graph.nodes)
    out_dtypes = [value(s).dtype for s in region.sinks]
    try:
        with graph.inserting_before(where):
            proxies = [Proxy(n, tracer) if isinstance(n, Node) else n for n in inputs]
            outs = candidate(*proxies, out_dtypes=out_dtypes)
            nodes = [out.node if isinstance(out, Proxy) else out for out in outs]
        new = [n for n in graph.nodes if n not in before]
        propagate_fake(graph, new)
        for n in new:  # our own code: never a later recognizer's anchor
            n.meta[EMITTED] = True
    except Exception as why:  # the graph is as it was: the op does not trace here
        for n in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(n)
        raise Rejected(
            f"the op cannot be traced here: {type(why).__name__}: {str(why).splitlines()[0][:160]}"
        ) from why
    for write in delayed:  # after the op, which reads what they overwrite
        where.prepend(write)
    results = []
    for node, sink in zip(nodes, region.sinks):
        v, want = value(node), value(sink)
        if not same_shape(tuple(v.shape), tuple(want.shape)):
            for n in reversed(new):
                if not n.users:
                    graph.erase_node(n)
            raise Rejected(f"the op gives {tuple(v.shape)} where {tuple(want.shape)} is needed")
        if v.dtype != want.dtype:
            with graph.inserting_after(node):
                cast = graph.call_method("to", (node, want.dtype))
            cast.meta["example_value"] = _fake_call(cast)
            node = cast
        results.append(node)
    for node, sink in zip(results, region.sinks):
        sink.replace_all_uses_with(node)
    _erase_dead(graph, region.nodes)
    stable_sort(graph)
    return results


def emit_first(
    ctx, fusion: str, sinks: Sequence[Node], attempt: Callable, reason: str
) -> str | None:
    """Emit the first sink ``attempt`` proves (it returns why not, or (idiom, region,
    candidate, inputs)) and record the fusion: None then, else the last reason (``reason``
    when no sink was tried)."""
    for sink in sinks:
        found = attempt(sink)
        if isinstance(found, str):
            reason = found
            continue
        idiom, region, candidate, inputs = found
        try:
            emit(region, candidate, inputs)
        except Rejected as why:
            reason = str(why)
            continue
        ctx.fused(fusion, idiom)
        return None
    return reason


def _fake_call(node: Node) -> Any:
    mode = fake_mode_of(node_inputs(node))
    evaluator = Evaluator(node.graph, mode="fake")
    feeds = {n: value(n) for n in node_inputs(node)}
    with mode if mode is not None else _null():
        return evaluator.run([node], feeds)[0]


def propagate_fake(graph: torch.fx.Graph, new: list[Node]) -> None:
    new_set = set(new)
    outside = {i for n in new for i in node_inputs(n) if i not in new_set}
    mode = fake_mode_of(outside)
    feeds = {n: value(n) for n in outside}
    evaluator = Evaluator(graph, mode="fake")
    with mode if mode is not None else _null():
        values = evaluator.run(new, feeds)
    for node, v in zip(new, values):
        node.meta["example_value"] = v


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _erase_dead(graph: torch.fx.Graph, nodes: set[Node]) -> None:
    """Erase the replaced region's nodes nothing reads any more (all side-effect free)."""
    order = _graph_order(graph)
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        if node.graph is graph and not node.users and not is_mutating(node):
            graph.erase_node(node)


def erase_unused(graph: torch.fx.Graph, nodes: Sequence[Node]) -> None:
    """Erase ``nodes`` and then their inputs, as long as nothing reads them (views, casts:
    side-effect free ops a rewrite made dead)."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node.graph is not graph or node.users or node.op not in ("call_function", "call_method"):
            continue
        if is_mutating(node) or node.target is operator.setitem:
            continue
        inputs = node_inputs(node)
        graph.erase_node(node)
        todo.extend(inputs)


def stable_sort(graph: torch.fx.Graph) -> None:
    """Restore a topological order after a rewrite (and forget what was cached of the
    graph: every rewrite ends here)."""
    from .._inductor_compat import stable_topological_sort
    from .fx_util import graph_changed

    graph_changed()
    stable_topological_sort(graph)


def _check_one_grad_mode(graph: torch.fx.Graph, nodes: set[Node]) -> None:
    """Every node on the region's paths computed in one grad mode. A
    ``with torch.no_grad()`` around part of them (the RMS statistics, say) cuts the
    gradient there in eager, while the fused op's backward would send gradient through
    all of it. Tables built under ``no_grad`` off those paths (RoPE's cos/sin) are leaves
    and do not count."""
    modes = grad_modes(graph)
    if len({modes[n] for n in nodes}) > 1:
        raise Rejected(
            "the grad mode changes inside the region (torch.no_grad() around part of it): "
            "its gradient differs from the fused op's"
        )


# a lower bound this small binds only near zero, where the passes that meet clamps (the
# norms' eps: ``x / max(|x|, eps)``) probe on purpose
_EPS_LIKE = 1e-2


def _check_clamps(nodes: set[Node]) -> None:
    """A clamp that can bind on finite values (``scores.clamp(-30, 30)``, a cap on an
    activation) is a function the probes cannot tell from the unclamped one wherever their
    values stay inside the bounds: left as written. Bounds past the dtype's finite range
    (HF's ``clamp(min=finfo.min)``) and eps-like lower bounds are kept."""
    for node in nodes:
        bounds = _clamp_bounds(node)
        if bounds is None:
            continue
        v = value(node)
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            continue
        big = torch.finfo(v.dtype).max
        lo, hi = (None if isinstance(b, Node) and depends_on_tensor_input(b) else b for b in bounds)
        if hi is not None and not (isinstance(hi, (int, float)) and hi >= big):
            raise Rejected(f"{node.name} clamps at most {hi}: where it binds, the probes do not reach")
        if lo is not None and not (
            isinstance(lo, (int, float)) and (lo <= -big or 0 <= lo <= _EPS_LIKE)
        ):
            raise Rejected(f"{node.name} clamps at least {lo}: where it binds, the probes do not reach")


def _clamp_bounds(node: Node) -> tuple[Any, Any] | None:
    """(lower, upper) bounds of a clamp-like call (None: that side is open), else None."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_function", "call_method"):
        return None
    args, kwargs = node.args[1:], node.kwargs
    if name in ("clamp", "clip"):
        lo = args[0] if len(args) > 0 else kwargs.get("min")
        hi = args[1] if len(args) > 1 else kwargs.get("max")
        return lo, hi
    if name == "clamp_min":
        return (args[0] if args else kwargs.get("min")), None
    if name == "clamp_max":
        return None, (args[0] if args else kwargs.get("max"))
    # an element-wise min / max against a number or a tensor: a clamp when that tensor is
    # a constant (one computed from the data varies on the probes, which then show it);
    # torch.max(x, -1) is a reduction over a dim: for min / max only a tensor is a bound
    other = args[0] if len(args) == 1 else None
    tensor_other = isinstance(other, Node) and isinstance(value(other), torch.Tensor)
    is_bound = tensor_other or isinstance(other, (int, float))
    if (name in ("minimum", "fmin") and is_bound) or (name == "min" and tensor_other):
        return None, other
    if (name in ("maximum", "fmax") and is_bound) or (name == "max" and tensor_other):
        return other, None
    if name == "hardtanh":
        lo = args[0] if len(args) > 0 else kwargs.get("min_val", -1.0)
        hi = args[1] if len(args) > 1 else kwargs.get("max_val", 1.0)
        return lo, hi
    return None
