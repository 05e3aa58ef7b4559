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
    fwd_only,
    joint_fwd_bwd,
    pattern_tracing_context,
    register_replacement,
)

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


def _value(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("val")
    return arg


def _make_extra_check(idiom: Idiom) -> Callable[[Match], bool]:
    def extra_check(match: Match) -> bool:
        values = {name: _value(arg) for name, arg in match.kwargs.items()}
        reason = idiom.check(values) if idiom.check is not None else None
        node = match.output_nodes()[0]
        where = node.name if node is not None else "?"
        if reason is not None:
            report.record_rejection(idiom.fusion, idiom.name, where, reason)
            return False
        report.record_fusion(idiom.fusion, idiom.name)
        return True

    return extra_check


def _with_grads(args: Sequence[Any], grads: tuple[bool, ...] | None) -> list[Any]:
    flags = iter(grads or ())
    out = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            wanted = next(flags, False) if grads is not None else False
            arg = arg.detach().requires_grad_(wanted)
        out.append(arg)
    return out


def register_idioms(pattern_pass: PatternMatcherPass, idioms: Sequence[Idiom], device: str) -> int:
    """Register every idiom in every traced variant; returns the number registered."""
    registered = 0
    for idiom in idioms:
        check = _make_extra_check(idiom)
        for act_dtype, param_dtype in idiom.dtype_combos:
            base_args = idiom.make_inputs(act_dtype, param_dtype, device)
            # training variants first: they are larger and must win over the forward-only one
            for grads in (*idiom.grad_combos, None):
                args = _with_grads(base_args, grads)
                trace_fn = fwd_only if grads is None else joint_fwd_bwd
                registered += bool(
                    register_replacement(
                        idiom.search,
                        idiom.replace,
                        args,
                        trace_fn,
                        pattern_pass,
                        extra_check=check,
                        scalar_workaround=dict(idiom.scalar_workaround),
                        skip_duplicates=True,
                    )
                )
    return registered


_FAMILIES: dict[str, Callable[[], Sequence[Idiom]]] = {}


def family(fusion: str):
    """Decorator: ``fn() -> list[Idiom]`` provides the idioms of one fusion."""

    def wrap(fn: Callable[[], Sequence[Idiom]]) -> Callable[[], Sequence[Idiom]]:
        _FAMILIES[fusion] = fn
        return fn

    return wrap


@functools.cache
def pattern_pass_for(fusion: str, device_type: str) -> PatternMatcherPass:
    """Built lazily, once per process and device type, under a fake tensor mode."""
    pattern_pass = PatternMatcherPass(pass_name=f"ccgqa_{fusion}")
    with pattern_tracing_context():
        register_idioms(pattern_pass, _FAMILIES[fusion](), device_type)
    return pattern_pass


def idioms_of(fusion: str) -> Sequence[Idiom]:
    return _FAMILIES[fusion]()
