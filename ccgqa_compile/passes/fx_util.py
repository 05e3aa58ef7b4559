"""Reading Dynamo's torch-level FX graphs (what Inductor's pre-grad hook sees).

Nodes there are ``call_function`` on torch functions / operators and ``call_method`` on
tensors, with fake example values in ``node.meta["example_value"]``; module parameters are
placeholders. Nothing here rewrites a graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node


def value(arg: Any) -> Any:
    """A node's example value (a fake tensor, SymInt, tuple...), a literal as is."""
    if isinstance(arg, Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def tensor_value(node: Any) -> torch.Tensor | None:
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def is_size_value(node: Any) -> bool:
    """A size or shape (``x.size(-1)``, ``x.shape``): it depends on a tensor's metadata,
    never on its values."""
    v = value(node)
    if isinstance(v, (torch.Size, tuple, list)):
        return len(v) > 0 and all(isinstance(s, (int, torch.SymInt)) for s in v)
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def static_int(size: Any) -> Any:
    """An int for a size known when compiling (a SymInt Dynamo fixed to a number is
    one), else the size as given."""
    if isinstance(size, torch.SymInt):
        node = size.node
        expr = node.shape_env.replace(node.expr) if node.shape_env is not None else node.expr
        return int(expr) if expr.is_number else size
    return size


def requires_grad(node: Any) -> bool:
    v = tensor_value(node)
    return bool(v is not None and v.requires_grad)


def is_float_tensor(node: Any) -> bool:
    v = tensor_value(node)
    return v is not None and (v.dtype.is_floating_point or v.dtype.is_complex)


def call_name(node: Node) -> str:
    """``call_method`` name, or the function's name (``softmax``, ``linear``, ``mul``)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def is_function(node: Any, *fns: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in fns


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call (counting ``self`` of a method call as 0), or by name."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def node_inputs(node: Node) -> list[Node]:
    found: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def ancestors(nodes: Iterable[Node], stop: set[Node] | None = None) -> set[Node]:
    """Every node the given ones depend on (themselves included), not crossing ``stop``."""
    stop = stop or set()
    seen: set[Node] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            continue
        todo.extend(node_inputs(node))
    return seen


def descendants(nodes: Iterable[Node], skip: Callable[[Node, Node], bool] | None = None) -> set[Node]:
    """Every node reading the given ones (themselves included), not through a read
    ``skip(reader, node)`` holds for."""
    seen: set[Node] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(u for u in node.users if skip is None or not skip(u, node))
    return seen


# facts of one graph that the recognizers ask of many nodes, computed once per version of
# the graph: {name: (graph, its node count, the fact)}; one graph at a time
_PER_GRAPH: dict[str, tuple[torch.fx.Graph, int, Any]] = {}


def _per_graph(name: str, graph: torch.fx.Graph, build: Callable[[torch.fx.Graph], Any]) -> Any:
    count = len(graph.nodes)
    cached = _PER_GRAPH.get(name)
    if cached is not None and cached[0] is graph and cached[1] == count:
        return cached[2]
    fact = build(graph)
    _PER_GRAPH[name] = (graph, count, fact)
    return fact


def _runtime_nodes(graph: torch.fx.Graph) -> set[Node]:
    """Every node that reads a graph input tensor, directly or not, or a tensor the graph
    writes in place (its value when read is not what its definition gives)."""

    def build(graph: torch.fx.Graph) -> set[Node]:
        found: set[Node] = set()
        written = written_storages(graph)
        for n in graph.nodes:
            if (
                (n.op == "placeholder" and isinstance(value(n), torch.Tensor))
                or any(i in found for i in node_inputs(n))
                or (written and storage_base(n) in written)  # built here, then written
            ):
                found.add(n)
        return found

    return _per_graph("runtime", graph, build)


def graph_changed() -> None:
    """Forget what was computed of a graph before a rewrite changed it."""
    _PER_GRAPH.clear()


def depends_on_tensor_input(node: Node) -> bool:
    """Whether ``node`` reads a graph input tensor (user data or a parameter): if not,
    it is a constant of the compiled program (built from literals and sizes only)."""
    return node in _runtime_nodes(node.graph)


def runtime_inputs_of(node: Node) -> list[Node]:
    return [
        n for n in ancestors([node]) if n.op == "placeholder" and isinstance(value(n), torch.Tensor)
    ]


# ---- op kinds ----------------------------------------------------------------------

# a dtype cast: the same real function
CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type", "type_as"}
# views and copies that only move elements
LAYOUT_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten",
    "unsqueeze", "squeeze", "movedim", "swapaxes", "swapdims", "t", "clone", "view_as",
    "reshape_as", "expand", "expand_as", "repeat_interleave", "repeat",
}  # fmt: skip
LAYOUT_FUNCTIONS = {
    torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unflatten,
    torch.squeeze, torch.unsqueeze, torch.movedim, torch.swapaxes, torch.swapdims, torch.t,
    torch.clone, torch.repeat_interleave,
}  # fmt: skip
# ``x.mT`` / ``x.T`` as Dynamo records them: getattr(x, "mT")
LAYOUT_PROPERTIES = {"mT", "T"}
MATMULS = {torch.matmul, operator.matmul, torch.bmm, torch.einsum}
SOFTMAXES = {torch.softmax, F.softmax}
CONV1D = {torch.conv1d, F.conv1d}
PAD = {F.pad, torch._C._nn.pad, torch.constant_pad_nd}
SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def is_product(node: Any) -> bool:
    """A matrix product (``@``, ``matmul``, ``bmm``, ``einsum``): attention's scores and
    its probabilities times values."""
    return is_function(node, *MATMULS) or is_method(node, "matmul", "bmm", "__matmul__")


def is_add(node: Any) -> bool:
    return is_function(node, operator.add, torch.add) or is_method(node, "add", "__add__", "__radd__")


def is_softmax(node: Any) -> bool:
    return is_function(node, *SOFTMAXES) or is_method(node, "softmax")


def is_exp(node: Any) -> bool:
    return is_function(node, torch.exp, torch.exp2) or is_method(node, "exp", "exp2")


def einsum_letters(spec: str) -> tuple[list[str], str]:
    """(each operand's letters, the output's) of an explicit einsum equation."""
    spec = spec.replace(" ", "")
    lhs, out = spec.split("->")
    return lhs.split(","), out


def einsum_pair(node: Any) -> tuple[str, str, str] | None:
    """(the first operand's letters, the second's, the output's) of ``torch.einsum(spec,
    a, b)`` with an explicit output and no ellipsis, else None."""
    if not is_function(node, torch.einsum) or len(node.args) != 3:
        return None
    spec = node.args[0]
    if not isinstance(spec, str) or "..." in spec or "->" not in spec:
        return None
    ins, out = einsum_letters(spec)
    return (ins[0], ins[1], out) if len(ins) == 2 else None


def is_cast(node: Any) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_method" and node.target in CAST_METHODS:
        return True
    return False


def is_layout(node: Any) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_method" and node.target in LAYOUT_METHODS:
        return True
    if is_function(node, getattr) and len(node.args) == 2 and node.args[1] in LAYOUT_PROPERTIES:
        return isinstance(value(node.args[0]), torch.Tensor)
    return node.op == "call_function" and node.target in LAYOUT_FUNCTIONS


def is_basic_index(node: Any) -> bool:
    """``x[...]`` with slices, ints, None and Ellipsis only (a view)."""
    if not is_function(node, operator.getitem) or not isinstance(value(node.args[0]), torch.Tensor):
        return False
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, int, type(None))) or i is Ellipsis for i in items)


# layout ops that always copy: a write to their result does not land in their input, and
# they read their input when they run
_COPIES = {"clone", "repeat", "repeat_interleave", torch.clone, torch.repeat_interleave}


def view_chain(node: Any) -> list[Any]:
    """``node`` and the tensors it is a view of (through layout ops and basic indexing),
    nearest first, ending at the one owning the storage."""
    chain = [node]
    while isinstance(node, Node) and (is_layout(node) or is_basic_index(node)):
        if node.target in _COPIES:
            break
        node = node.args[0]
        chain.append(node)
    return chain


def storage_base(node: Any) -> Any:
    """The tensor whose storage ``node`` views: where an in-place write to it lands."""
    return view_chain(node)[-1]


def strip_casts(node: Any) -> Any:
    """Follow casts back to the tensor they convert."""
    while is_cast(node) and node.target != "type_as" and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


# the operator module's in-place forms (``x[i] = y``, ``x += y``, ``x &= m``...)
_OPERATOR_WRITES = (operator.setitem, operator.iadd, operator.isub, operator.imul,
                    operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                    operator.iand, operator.ior, operator.ixor, operator.ilshift,
                    operator.irshift, operator.imatmul)  # fmt: skip


def is_mutating(node: Node) -> bool:
    """In-place tensor methods and operators (``x.mul_(2)``, ``x += y``, ``x[i] = y``), and
    calls writing an ``out=`` tensor."""
    if node.op in ("call_function", "call_method") and node.kwargs.get("out") is not None:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _OPERATOR_WRITES:
            return True
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return False  # operator.and_ / or_ / not_ compute new values
        return name.endswith("_") and not name.startswith("_")
    return False


def written_tensors(node: Node) -> list[Any]:
    """What a mutating node writes: its ``out=`` tensors, else its first argument."""
    out = node.kwargs.get("out")
    if out is not None:
        return list(out) if isinstance(out, (list, tuple)) else [out]
    return [node.args[0]] if node.args else []


def shape_of(node: Any) -> tuple[Any, ...] | None:
    v = tensor_value(node)
    return tuple(v.shape) if v is not None else None


def same_size(a: Any, b: Any) -> bool:
    """a == b for sizes, without adding a guard (False when it depends on a symbol)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def topo_order(graph: torch.fx.Graph) -> dict[Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


# op names whose two calls never compute the same value: random draws, uninitialised memory
_UNREPEATABLE_OPS = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform",
                     "poisson", "exponential", "cauchy", "geometric", "empty")  # fmt: skip


@dataclass(frozen=True)
class ComputationContext:
    """What decides whether two equal-looking computations of one graph give equal values:
    the tensors the graph writes in place, and each node's autocast state."""

    written: frozenset
    autocast: dict


def written_storages(graph: torch.fx.Graph) -> frozenset:
    """The tensors whose storage some node of ``graph`` writes in place."""

    def build(graph: torch.fx.Graph) -> frozenset:
        return frozenset(
            storage_base(t) for n in graph.nodes if is_mutating(n) for t in written_tensors(n)
        )

    return _per_graph("written", graph, build)


def is_runtime_scalar(node: Any) -> bool:
    """A float known only when the program runs (a SymFloat): ``dynamic=True`` lifts a
    float attribute (HF's ``self.scaling``, ZAYA's ``head_dim ** 0.5``, an eps) to a graph
    input read with ``.item()``."""
    return isinstance(value(node), torch.SymFloat)


def is_zero_pad(node: Any) -> bool:
    """A constant pad (``F.pad``, ``constant_pad_nd``) that lets zeros in."""
    if not is_function(node, *PAD):
        return False
    mode = arg(node, 2, "mode", "constant")
    fill = (
        arg(node, 3, "value", None)
        if not is_function(node, torch.constant_pad_nd)
        else arg(node, 2, "value", 0)
    )
    return mode == "constant" and fill in (None, 0, 0.0)


def is_zero_fill(node: Any) -> bool:
    """A tensor of zeros the graph makes (``torch.zeros``, ``x.new_zeros``, ``zeros_like``,
    a ``full`` of 0), through casts and layout ops, whose storage nothing writes in place:
    a constant, not a run-time value."""
    while is_cast(node) or (is_layout(node) and node.target not in _COPIES):
        node = node.args[0]
    if not isinstance(node, Node) or node in written_storages(node.graph):
        return False
    if is_function(node, torch.zeros, torch.zeros_like) or is_method(node, "new_zeros"):
        return True
    if is_function(node, torch.full, torch.full_like) or is_method(node, "new_full"):
        return arg(node, 1, "fill_value") in (0, 0.0, False)
    return False


def autocast_stacks(graph: torch.fx.Graph) -> dict[Node, tuple[Node, ...]]:
    """For each node, the autocast regions in force where it runs: the ``_enter_autocast``
    calls (Dynamo keeps autocast as enter/exit calls) open before it, innermost last."""
    stack: list[Node] = []
    out: dict[Node, tuple[Node, ...]] = {}
    for n in graph.nodes:
        out[n] = tuple(stack)
        if n.op == "call_function" and n.target is torch.amp.autocast_mode._enter_autocast:
            stack.append(n)
        elif n.op == "call_function" and n.target is torch.amp.autocast_mode._exit_autocast:
            if stack:
                stack.pop()
    return out


def computation_context(graph: torch.fx.Graph) -> ComputationContext:
    return ComputationContext(written_storages(graph), autocast_stacks(graph))


def same_computation(a: Node, b: Node, context: ComputationContext | None = None) -> bool:
    """Whether ``a`` and ``b`` compute equal values: the same ops, in the same order and
    autocast state, on the same arguments, ending at the same graph inputs, none of whose
    storage the graph writes in place (a RoPE table sliced from a buffer once for q and once
    for k; never two reads of a KV cache around its write), and nothing random or
    uninitialised. ``context``: ``computation_context`` of the graph, where many pairs are
    compared."""
    if not (isinstance(a, Node) and isinstance(b, Node)) or a.op != b.op or a.target != b.target:
        return False
    if context is None:
        context = computation_context(a.graph)

    def equal(x: Any, y: Any) -> bool:
        if isinstance(x, Node) or isinstance(y, Node):
            if not (isinstance(x, Node) and isinstance(y, Node)):
                return False
            if x is y:
                return x.op not in ("placeholder", "get_attr") or x not in context.written
            if x.op != y.op or x.op not in ("call_function", "call_method") or x.target != y.target:
                return False
            name = call_name(x).lower()
            if is_mutating(x) or any(r in name for r in _UNREPEATABLE_OPS):
                return False
            if context.autocast.get(x) != context.autocast.get(y):
                return False
            return equal(x.args, y.args) and equal(x.kwargs, y.kwargs)
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(map(equal, x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        if isinstance(x, slice) and isinstance(y, slice):
            return equal((x.start, x.stop, x.step), (y.start, y.stop, y.step))
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return x is y
        return type(x) is type(y) and x == y

    return a is not b and equal(a, b)
