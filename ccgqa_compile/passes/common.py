"""What every recognizer shares: the context of one graph, forward closures, constants."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch.fx import Node

from .. import reporting as report
from .._inductor_compat import current_compile_id
from .fx_util import descendants, is_cast, is_size_value, node_inputs, value

# elementwise tensor ops (functions and methods) that may appear inside a fused region
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt,
    torch.reciprocal, torch.square, torch.abs, torch.exp, torch.clamp, torch.clamp_min,
    torch.maximum, torch.minimum, torch.where, torch.sigmoid, torch.nn.functional.silu,
    torch.tanh, torch.cos, torch.sin, torch.multiply, torch.true_divide, torch.negative,
    torch.masked_fill, torch.log, torch.log2, torch.exp2, torch.log1p, torch.expm1,
    torch.special.expit,
}  # fmt: skip
ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "reciprocal", "square", "abs",
    "exp", "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "sigmoid", "tanh",
    "multiply", "true_divide", "negative", "masked_fill", "__mul__", "__add__", "__truediv__",
    "__rtruediv__", "__rmul__", "__radd__", "__sub__", "__rsub__", "__neg__", "log", "log2",
    "exp2", "log1p", "expm1",
}  # fmt: skip


def is_elementwise(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return False


@dataclass
class GraphContext:
    """One graph being recognised: its size assignments and report events."""

    graph: torch.fx.Graph
    sizes: list[dict[sympy.Symbol, int]]
    fuse_on_cpu: bool
    decode: bool = True  # whether decode-step attention may become gqa_decode_attention
    events: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def fused(self, fusion: str, idiom: str) -> None:
        self.events.append(("fused", (fusion, idiom)))

    def rejected(self, fusion: str, idiom: str, node: Node | str, reason: str) -> None:
        name = node.name if isinstance(node, Node) else node
        self.events.append(("rejected", (fusion, idiom, name, reason)))

    def unfused(self, fusion: str, node: Node | str, reason: str) -> None:
        name = node.name if isinstance(node, Node) else node
        self.events.append(("unfused", (fusion, name, reason)))

    def alive(self, node: Node) -> bool:
        return node.graph is self.graph and node in self.graph.nodes


def forward_closure(
    source: Node, allowed: Callable[[Node], bool], max_nodes: int = 48
) -> list[Node]:
    """Nodes reached from ``source`` through ``allowed`` ops whose every other input does
    not depend on ``source`` (a weight, a table, a constant) or is already reached; in graph
    order. A residual add (whose other input comes from later layers) is never reached.
    Sizes read off a reached tensor count as independent of it (``F.rms_norm(x,
    (x.size(-1),))`` under dynamic shapes)."""
    depends = descendants([source])
    reached: set[Node] = {source}
    order = {n: i for i, n in enumerate(source.graph.nodes)}
    frontier = [source]
    while frontier and len(reached) < max_nodes:
        node = frontier.pop()
        for user in node.users:
            if user in reached or not allowed(user):
                continue
            inputs = node_inputs(user)
            if all(i in reached or i not in depends or is_size_value(i) for i in inputs):
                reached.add(user)
                frontier.append(user)
    reached.discard(source)
    return sorted(reached, key=order.__getitem__)


def float_literals(nodes) -> set[float]:
    found: set[float] = set()

    def visit(a: Any) -> None:
        if isinstance(a, float):
            found.add(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    for node in nodes:
        visit(node.args)
        visit(tuple(node.kwargs.values()))
    return found


def snap(estimate: float, literals: set[float], rel: float = 1e-3) -> float:
    """A literal of the region close to a numerically inferred constant, else the estimate
    (the literal is what the code says; the estimate carries float64 noise)."""
    extra = {torch.finfo(t).eps for t in (torch.float16, torch.bfloat16, torch.float32)}
    best = None
    for lit in literals | extra | {0.0, 1e-12, 1e-6, 1e-5, 1e-8}:
        if lit >= 0 and abs(lit - estimate) <= rel * max(abs(lit), 1e-300):
            if best is None or abs(lit - estimate) < abs(best - estimate):
                best = lit
    if best is None and abs(estimate) < 1e-18:
        return 0.0
    return best if best is not None else estimate


def source_through_casts(node: Any) -> Any:
    while is_cast(node) and isinstance(node.args[0], Node) and node.target != "type_as":
        node = node.args[0]
    return node


def flush_to_report(ctx: GraphContext) -> None:
    compile_id = current_compile_id()
    _pending.append((compile_id, "graph_kind", (_graph_kind(ctx.graph),)))
    for kind, args in ctx.events:
        _pending.append((compile_id, kind, args))
    ctx.events.clear()


def is_training_graph(graph: torch.fx.Graph) -> bool:
    """Whether AOTAutograd will build a joint graph: grad mode on and a graph input that
    requires grad."""
    return torch.is_grad_enabled() and any(
        n.op == "placeholder" and getattr(value(n), "requires_grad", False) for n in graph.nodes
    )


def _graph_kind(graph: torch.fx.Graph) -> str:
    return "training" if is_training_graph(graph) else "inference"


# pre-grad events wait here until the joint-graph pass opens the graph's report record
_pending: list[tuple[str, str, tuple[Any, ...]]] = []
report.ON_RESET.append(_pending.clear)


def flush_pending_reports() -> None:
    """The joint-graph pass of the current graph: record its pre-grad events."""
    compile_id = current_compile_id()
    mine = [e for e in _pending if e[0] == compile_id]
    _pending[:] = [e for e in _pending if e[0] != compile_id]
    _record(mine)


def record_cached_joint(compile_id: str) -> None:
    """After a successful compile: events still waiting for ``compile_id`` belong to a
    graph whose joint pass did not run (Inductor loaded its compiled code from its cache,
    with our rewrite in it: the pre-grad pass runs before that lookup)."""
    events = [e for e in _pending if e[0] == compile_id]
    if not events:
        return
    discard_pending(compile_id)
    kind = next((a[0] for _c, k, a in events if k == "graph_kind"), "inference")
    record = report.start_graph(compile_id, kind)
    record.from_cache = True
    _record(events)


def discard_pending(compile_id: str) -> None:
    _pending[:] = [e for e in _pending if e[0] != compile_id]


def _record(events: list[tuple[str, str, tuple[Any, ...]]]) -> None:
    for _cid, kind, args in events:
        if kind == "graph_kind":
            continue
        if kind == "fused":
            report.record_fusion(*args)
        elif kind == "rejected":
            report.record_rejection(*args)
        elif kind == "note":
            record = report.current_graph()
            if record is not None:
                record.note = args[0]
        else:
            report.record_unfused(*args)


def inputs_of(node: Node) -> list[Node]:
    return node_inputs(node)


def numel_static(node: Node) -> int | None:
    v = value(node)
    if not isinstance(v, torch.Tensor):
        return None
    n = 1
    for s in v.shape:
        if not isinstance(s, int):
            return None
        n *= s
    return n


def sqrt(x: float) -> float:
    return math.sqrt(x)
