"""Run parts of a Dynamo graph on real tensors: the probes that decide what a region computes.

``Evaluator`` executes the nodes a set of outputs needs, from values fed for chosen nodes
(the probes), in one of two modes:

- ``real``: float64 semantics. Every floating dtype a node names (``.float()``,
  ``.to(torch.bfloat16)``, ``softmax(dtype=torch.float32)``) becomes float64 and complex
  dtypes complex128, so a region's casts, which change rounding but not the function,
  drop out, and what is compared is the real function the code spells;
- ``fake``: the graph's own dtypes on fake tensors (shape and dtype propagation for the
  nodes a rewrite inserts).

Sizes: a graph compiled with symbolic sizes is evaluated at an assignment of its symbols
(their hints, or a perturbed assignment, so a region that only matches at one length is
caught).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import sympy
import torch
from torch.fx import Node

from .fx_util import ancestors, value, view_chain, written_storages

_WIDE = {
    torch.float16: torch.float64,
    torch.bfloat16: torch.float64,
    torch.float32: torch.float64,
    torch.complex32: torch.complex128,
    torch.complex64: torch.complex128,
}
_WIDE_METHODS = {"float": "double", "half": "double", "bfloat16": "double"}


class NotEvaluable(Exception):
    """The outputs need a node that has no value here (an unfed graph input)."""


def _widen(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return _WIDE.get(obj, obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_widen(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _widen(v) for k, v in obj.items()}
    return obj


# ---- symbolic sizes -----------------------------------------------------------------


def _symbols_of(obj: Any, found: set[sympy.Symbol]) -> None:
    if isinstance(obj, torch.SymInt | torch.SymFloat | torch.SymBool):
        found.update(obj.node.expr.free_symbols)
    elif isinstance(obj, torch.Tensor):
        for size in (*obj.shape, *obj.stride(), obj.storage_offset()):
            _symbols_of(size, found)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _symbols_of(o, found)


def _shape_env(graph: torch.fx.Graph):
    for node in graph.nodes:
        v = value(node)
        if isinstance(v, torch.SymInt):
            return v.node.shape_env
        if isinstance(v, torch.Tensor):
            for size in v.shape:
                if isinstance(size, torch.SymInt):
                    return size.node.shape_env
    return None


def size_assignments(graph: torch.fx.Graph) -> list[dict[sympy.Symbol, int]]:
    """Symbol values to evaluate at: the hints, then (when sizes are symbolic) each symbol
    moved by 3, so what is checked holds beyond the one size being compiled for."""
    env = _shape_env(graph)
    if env is None:
        return [{}]
    symbols: set[sympy.Symbol] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            _symbols_of(value(node), symbols)
    from .._inductor_compat import symbol_hints

    table = symbol_hints(env)
    hints = {s: int(table[s]) for s in symbols if s in table}
    if not hints:
        return [{}]
    return [hints, {s: v + 3 for s, v in hints.items()}]


def concrete(x: Any, sizes: dict[sympy.Symbol, int]) -> Any:
    """An int (or a tuple of them) for a possibly symbolic size at an assignment."""
    if isinstance(x, torch.SymInt):
        node = x.node
        # a symbol specialised by a guard (``_inductor_compat.specialize``) is its number
        expr = node.shape_env.replace(node.expr) if node.shape_env is not None else node.expr
        expr = sympy.sympify(sympy.sympify(expr).xreplace(sizes))
        if not expr.is_number:
            raise NotEvaluable(f"size {x} has unassigned symbols")
        return int(expr)
    if isinstance(x, (torch.Size, tuple, list)):
        return tuple(concrete(v, sizes) for v in x)
    return x


# ---- probes -------------------------------------------------------------------------


class Probes:
    """Random float64 (complex128) tensors shaped like nodes' example values, reproducible."""

    def __init__(self, sizes: dict[sympy.Symbol, int], device: torch.device, seed: int = 0):
        self.sizes = sizes
        self.device = torch.device(device)
        # drawn where they are used: a (2, 4096, 14336) float64 probe drawn on one CPU thread
        # and copied to the GPU cost seconds each, at Llama-3-8B's widths
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def shape(self, node: Node) -> tuple[int, ...]:
        return concrete(tuple(value(node).shape), self.sizes)

    def like(self, node: Node, scale: float = 1.0) -> torch.Tensor:
        v = value(node)
        shape = self.shape(node)
        draw = dict(generator=self.gen, dtype=torch.float64, device=self.device)
        if v.dtype.is_complex:
            t = torch.complex(torch.randn(shape, **draw), torch.randn(shape, **draw))
        else:
            t = torch.randn(shape, **draw)
        return t * scale


def agree(actual: Any, expected: Any, rtol: float = 1e-8) -> bool:
    """Equal up to float64 rounding: same shapes, NaN and infinity where the other has
    them, the rest within ``rtol`` of the largest magnitude."""
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(actual, (list, tuple))
            and len(actual) == len(expected)
            and all(agree(a, e, rtol) for a, e in zip(actual, expected))
        )
    if not isinstance(expected, torch.Tensor) or not isinstance(actual, torch.Tensor):
        return actual == expected
    if tuple(actual.shape) != tuple(expected.shape):
        return False
    a = actual.detach().to(torch.complex128 if actual.is_complex() else torch.float64)
    e = expected.detach().to(a.dtype)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return False
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        return False
    finite = ~(nan_e | inf_e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return True
    scale = e.abs().max().item()
    return (a - e).abs().max().item() <= rtol * scale + 1e-300


# ---- evaluation ---------------------------------------------------------------------


class Evaluator:
    def __init__(
        self,
        graph: torch.fx.Graph,
        sizes: dict[sympy.Symbol, int] | None = None,
        mode: str = "real",
    ):
        self.graph = graph
        self.sizes = sizes or {}
        self.mode = mode
        self._order = {node: i for i, node in enumerate(graph.nodes)}

    def run(self, outputs: Sequence[Node], feeds: dict[Node, Any]) -> list[Any]:
        needed = ancestors(outputs, stop=set(feeds))
        written = written_storages(self.graph)
        env: dict[Node, Any] = {}
        for node in sorted(needed, key=self._order.__getitem__):
            if node in feeds:
                env[node] = feeds[node]
                continue
            chain = view_chain(node)
            if chain[-1] in written and not any(n in feeds for n in chain):
                # built here (from sizes), then written in place: what readers see is not
                # what evaluating its definition gives (a causal mask with one entry set).
                # A view of a fed tensor (a slice of q after q.clamp_()) is computed from
                # the value fed, which is what the region reads.
                raise NotEvaluable(f"{node.name} is written in place after it is built")
            env[node] = self.execute(node, env)
        return [env[node] for node in outputs]

    def execute(self, node: Node, env: dict[Node, Any]) -> Any:
        """One node on the values ``env`` holds for its inputs (casts widened to float64
        when real); ``run`` orders the nodes, callers replaying in-place writes in graph
        order call this one by one."""
        if node.op == "placeholder":
            v = value(node)
            if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                return concrete(v, self.sizes) if self.mode == "real" else v
            raise NotEvaluable(f"graph input {node.name} has no value here")
        if node.op == "get_attr":
            obj = self.graph.owning_module
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        if self.mode == "real":
            args, kwargs = _widen(args), _widen(kwargs)
        if node.op == "call_function":
            return _defined(node, node.target(*args, **kwargs), self.mode)
        if node.op == "call_method":
            name = str(node.target)
            if self.mode == "real":
                name = _WIDE_METHODS.get(name, name)
            return _defined(node, getattr(args[0], name)(*args[1:], **kwargs), self.mode)
        if node.op == "call_module":
            module = self.graph.owning_module.get_submodule(str(node.target))
            return module(*args, **kwargs)
        raise NotEvaluable(f"cannot evaluate {node.op} {node.name}")


_UNINITIALISED = {torch.empty, torch.empty_like, torch.empty_strided}
_UNINITIALISED_METHODS = {"new_empty", "new_empty_strided"}


def _defined(node: Node, out: Any, mode: str) -> Any:
    """A tensor made uninitialised (``torch.empty``: whatever the memory held) as NaN on the
    probes: its contents are no value of the program, so a region reading them is never
    proven (and the probes do not vary with the allocator), while one that overwrites them,
    or ignores them (``baddbmm(empty, ..., beta=0)``), computes as written."""
    uninitialised = (node.op == "call_function" and node.target in _UNINITIALISED) or (
        node.op == "call_method" and str(node.target) in _UNINITIALISED_METHODS
    )
    if mode == "real" and uninitialised and isinstance(out, torch.Tensor):
        return out.fill_(float("nan") if out.dtype.is_floating_point else 0)
    return out


@contextlib.contextmanager
def real_tensors():
    """Run real ops inside a compilation (no fake mode, no autograd), on one CPU thread:
    the probes are small, and a float64 grouped conv1d on 2 threads of a loaded 2-core
    machine took 1.5 s where one thread takes 4 ms (OpenMP waiting on busy cores)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with unset_fake_temporarily(), torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def fake_mode_of(nodes: Iterable[Node]):
    for node in nodes:
        v = value(node)
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def constant_value(graph: torch.fx.Graph, node: Node, sizes: dict[sympy.Symbol, int]) -> Any:
    """The value of a node that reads no graph input tensor (a mask built from sizes)."""
    return Evaluator(graph, sizes).run([node], {})[0]


def is_getitem(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem
