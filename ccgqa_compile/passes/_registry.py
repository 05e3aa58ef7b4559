"""Shared machinery: turn a list of ``Idiom``s into a registered ``PatternMatcherPass``.

Each idiom is a (search, replace) pair of plain functions, as in Inductor's
``fx_passes/fuse_attention.py``. It is registered once per input dtype family and per
requires-grad combination (``joint_fwd_bwd`` bakes requires_grad into a training pattern)
plus once as an inference pattern (``fwd_only``).

Why the matches are exact: the first, loose match ignores literals (ints, lists, dtypes);
``register_replacement`` then re-traces the search function at the matched graph's real
shapes and dtypes and matches again with every literal compared (reduction dims, slice
bounds, cast dtypes, constants such as Gemma's ``1 +``). Only then does the idiom's own
``check`` run (shape/broadcast conditions the op needs) and the replacement happen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import reporting as report
from .._inductor_compat import (
    Match,
    PatternMatcherPass,
    fwd_only_functional,
    joint_fwd_bwd,
    joint_fwd_bwd_with_tangents,
    pattern_tracing_context,
    register_replacement,
    symbolic_sizes_as_pattern_inputs,
)
from .grad_sums import nodes_depending_on_tangents

# (activation dtype, parameter dtype) pairs a pattern is traced with. fp32 traces have no
# casts; bf16 traces contain the upcast/downcast nodes of mixed-precision idioms; the
# exact re-trace at match time then checks the real dtypes.
DTYPES_SAME = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16))
DTYPES_MIXED = (*DTYPES_SAME, (torch.bfloat16, torch.float32))

HALF_OR_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Idiom:
    """One way users write one fusion."""

    fusion: str
    name: str
    search: Callable[..., Any]
    replace: Callable[..., Any]
    # (activation dtype, parameter dtype, device) -> example args for tracing
    make_inputs: Callable[[torch.dtype, torch.dtype, str], Sequence[Any]]
    # requires_grad per tensor argument, for each training combination to register
    grad_combos: tuple[tuple[bool, ...], ...]
    dtype_combos: tuple[tuple[torch.dtype, torch.dtype], ...] = DTYPES_SAME
    scalar_workaround: dict[str, float] = field(default_factory=dict)
    # values of the matched arguments -> None to accept, or the reason to reject
    check: Callable[[dict[str, Any]], str | None] | None = None
    # training patterns: None traces with the torch's default tangent strides; True/False
    # with contiguous tangents / tangents laid out as the outputs
    # (``_inductor_compat.joint_fwd_bwd_with_tangents``)
    contiguous_tangents: bool | None = None
    # applied to training (forward+backward) matches only, after ``check``: None to accept,
    # or the reason to leave them to Inductor (a policy measured on the training step,
    # e.g. a fused forward that is faster and a backward that is not)
    training_check: Callable[[dict[str, Any]], str | None] | None = None


def matched_value(arg: Any) -> Any:
    """A matched argument's value: a node's fake tensor (or SymInt), a literal as is."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("val")
    return arg


_backward_cache: dict[int, tuple[torch.fx.Graph, set[torch.fx.Node]]] = {}


def refresh_backward_nodes(graph: torch.fx.Graph) -> None:
    """Recompute which nodes are backward; called before each round of patterns."""
    _backward_cache[id(graph)] = (graph, nodes_depending_on_tangents(graph))


def forget_graph(graph: torch.fx.Graph) -> None:
    _backward_cache.pop(id(graph), None)


def backward_nodes_of(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    cached = _backward_cache.get(id(graph))
    if cached is None or cached[0] is not graph:
        refresh_backward_nodes(graph)
        cached = _backward_cache[id(graph)]
    return cached[1]


def backward_pairing_error(match: Match) -> str | None:
    """In a joint graph, check that the matched backward is the gradient of the matched forward.

    A pattern whose backward reaches its forward only through shared inputs (RoPE: dx needs
    only dy, cos and sin) could pair q's forward with k's backward, which share cos and sin.
    AOTAutograd stamps each backward node with the ``seq_nr`` of the forward op it
    differentiates; every matched backward node (gradient sums aside, which carry their
    consumer's number) must point into the matched forward.
    """
    in_backward = backward_nodes_of(match.graph)
    forward_seq, backward = set(), []
    for node in match.nodes:
        if node in in_backward:
            backward.append(node)
        else:
            forward_seq.add(node.meta.get("seq_nr"))
    for node in backward:
        if node.target is torch.ops.aten.add.Tensor:
            continue
        seq = node.meta.get("seq_nr")
        if seq is None or seq not in forward_seq:
            return (
                "its backward belongs to another instance (seq_nr mismatch); "
                "the forward-only form may fuse instead"
            )
    return None


def _make_extra_check(idiom: Idiom, joint: bool) -> Callable[[Match], bool]:
    """Runs on the exact (re-traced) match: the idiom's own shape conditions.

    ``joint``: the pattern is a forward+backward one; a forward-only pattern firing in a
    training graph leaves that instance's backward to Inductor, and the report says so.
    """

    def extra_check(match: Match) -> bool:
        values = {name: matched_value(arg) for name, arg in match.kwargs.items()}
        reason = _scalar_error(idiom, match)
        if reason is None and idiom.check is not None:
            reason = idiom.check(values)
        if reason is None and joint and idiom.training_check is not None:
            reason = idiom.training_check(values)
        if reason is not None:
            report.record_rejection(idiom.fusion, idiom.name, _where(match), reason)
            return False
        report.record_fusion(idiom.fusion, idiom.name, joint=joint)
        return True

    return extra_check


def _scalar_error(idiom: Idiom, match: Match) -> str | None:
    """Scalars (eps) must be compile-time constants: the ops take them as plain floats."""
    for name in idiom.scalar_workaround:
        if name not in match.kwargs:
            # torch < 2.13 re-traces with the matched value itself, so the exact pattern
            # holds it as a literal (compared during the exact match): a constant
            continue
        if not isinstance(match.kwargs[name], (int, float)):
            return f"{name} is not a constant (a symbolic or tensor value)"
    return None


def _where(match: Match) -> str:
    node = match.output_nodes()[0]
    return node.name if node is not None else "?"


def _guard_new_entries(pattern_pass: PatternMatcherPass, seen: set[int], idiom: Idiom) -> None:
    """Put the pairing check in front of every entry registered since the last call.

    It must see the loose match, because that is the one Inductor replaces: for a
    multi-output pattern the exact re-trace may pick a different (correct) backward than
    the loose match did, and then pass while the wrong nodes get replaced.

    The exact check itself runs with every distinct size symbol as a pattern input
    (``symbolic_sizes_as_pattern_inputs``): without that, no pattern whose inputs have two
    independent symbolic sizes (B and T under ``dynamic=True``) matched exactly.
    """
    for entries in pattern_pass.patterns.values():
        for entry in entries:
            if id(entry) in seen:
                continue
            seen.add(id(entry))
            exact_check = entry.extra_check

            def guarded(match: Match, exact_check=exact_check) -> bool:
                reason = backward_pairing_error(match)
                if reason is not None:
                    report.record_rejection(idiom.fusion, idiom.name, _where(match), reason)
                    return False
                with symbolic_sizes_as_pattern_inputs():
                    return exact_check(match)

            entry.extra_check = guarded


def _with_grads(args: Sequence[Any], grads: tuple[bool, ...] | None) -> list[Any]:
    flags = iter(grads or ())
    out = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            wanted = next(flags, False) if grads is not None else False
            arg = arg.detach().requires_grad_(wanted)
        out.append(arg)
    return out


def _trace_fn(idiom: Idiom, joint: bool):
    if not joint:
        return fwd_only_functional
    if idiom.contiguous_tangents is None:
        return joint_fwd_bwd
    return joint_fwd_bwd_with_tangents(idiom.contiguous_tangents)


def register_idioms(pattern_pass: PatternMatcherPass, idioms: Sequence[Idiom], device: str) -> int:
    """Register every idiom in every traced variant; returns the number registered.

    Every training (forward+backward) pattern of the family is registered before any
    forward-only one: patterns are tried in registration order, and a forward-only pattern
    that fires in a training graph leaves the backward unfused, so no idiom's forward-only
    form may pre-empt another idiom's training form of the same forward.
    """
    registered = 0
    guarded: set[int] = set()
    for joint in (True, False):
        for idiom in idioms:
            check = _make_extra_check(idiom, joint)
            for act_dtype, param_dtype in idiom.dtype_combos:
                base_args = idiom.make_inputs(act_dtype, param_dtype, device)
                for grads in idiom.grad_combos if joint else (None,):
                    args = _with_grads(base_args, grads)
                    registered += bool(
                        register_replacement(
                            idiom.search,
                            idiom.replace,
                            args,
                            _trace_fn(idiom, joint),
                            pattern_pass,
                            extra_check=check,
                            scalar_workaround=dict(idiom.scalar_workaround),
                            skip_duplicates=True,
                        )
                    )
                    _guard_new_entries(pattern_pass, guarded, idiom)
    return registered


@dataclass(frozen=True)
class _Part:
    """One separately built set of a family's patterns."""

    name: str
    idioms: Callable[[], Sequence[Idiom]]
    after_build: Callable[[PatternMatcherPass], None] | None
    # whether a graph may hold one of these idioms (e.g. contains one of their ops): the
    # patterns are built (traced, seconds each) and run only on graphs where it is so
    applies: Callable[[torch.fx.Graph], bool] | None


_FAMILIES: dict[str, list[_Part]] = {}


def family(
    fusion: str,
    after_build: Callable[[PatternMatcherPass], None] | None = None,
    *,
    part: str = "",
    applies: Callable[[torch.fx.Graph], bool] | None = None,
):
    """Decorator: ``fn() -> list[Idiom]`` provides the idioms of one fusion, or of one
    ``part`` of it: each part is built and applied on its own, only to graphs that
    ``applies(graph)`` accepts. ``after_build(pattern_pass)`` runs once the part is
    registered (a part whose traced patterns need adjusting, e.g. the prologue's
    ``convolution_backward``)."""

    def wrap(fn: Callable[[], Sequence[Idiom]]) -> Callable[[], Sequence[Idiom]]:
        parts = _FAMILIES.setdefault(fusion, [])
        parts[:] = [p for p in parts if p.name != part]  # a re-import replaces its part
        parts.append(_Part(part, fn, after_build, applies))
        return fn

    return wrap


def graph_calls(*targets) -> Callable[[torch.fx.Graph], bool]:
    """``applies`` for a part every idiom of which calls one of ``targets``."""
    wanted = set(targets)

    def applies(graph: torch.fx.Graph) -> bool:
        return any(n.op == "call_function" and n.target in wanted for n in graph.nodes)

    return applies


def reaches(node: torch.fx.Node, goals, through, max_hops: int) -> bool:
    """Whether a user of ``node``, or of a chain of at most ``max_hops`` users calling
    ``through``, calls one of ``goals``: a cheap look along a decomposed graph's data flow
    (a cat into a conv, a softmax into its matmul)."""
    frontier, seen = [node], {node}
    for _ in range(max_hops):
        users = [u for n in frontier for u in n.users]
        if any(u.target in goals for u in users):
            return True
        frontier = [u for u in users if u.target in through and u not in seen]
        seen.update(frontier)
    return False


def pattern_passes_for(fusion: str, graph: torch.fx.Graph, device_type: str):
    """The built passes of ``fusion``'s parts that apply to ``graph``."""
    return [
        pattern_pass_for(fusion, device_type, part.name)
        for part in _FAMILIES[fusion]
        if part.applies is None or part.applies(graph)
    ]


@functools.cache
def pattern_pass_for(fusion: str, device_type: str, part: str = "") -> PatternMatcherPass:
    """Built lazily, once per process, device type and part, under a fake tensor mode."""
    (found,) = [p for p in _FAMILIES[fusion] if p.name == part]
    suffix = f"_{part}" if part else ""
    pattern_pass = PatternMatcherPass(pass_name=f"ccgqa_{fusion}{suffix}")
    with pattern_tracing_context():
        register_idioms(pattern_pass, found.idioms(), device_type)
    if found.after_build is not None:
        found.after_build(pattern_pass)
    return pattern_pass
