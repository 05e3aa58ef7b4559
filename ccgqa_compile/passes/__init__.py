"""The graph passes the ``ccgqa`` backend installs: ``joint_custom_pre_pass`` (the pattern
fusions) and ``pre_grad_custom_pass`` (SDPA -> our attention op, see ``sdpa_attention.py``;
the value shift moved onto V, see ``value_shift.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .. import reporting as report
from .._inductor_compat import (
    current_compile_id,
    normalize_joint_graph,
    stable_topological_sort,
)
from . import ccgqa_prologue, ccgqa_seed_prologue, gqa_attention, rms_norm, rope, swiglu  # noqa: F401  (families)
from ._registry import forget_graph, pattern_passes_for, refresh_backward_nodes
from .blocks import report_fused_blocks
from .candidates import find_candidates, report_unfused_candidates
from .grad_sums import is_tangent, order_scatter_sums, peel_first_addend
from .sdpa_attention import SdpaAttentionPass, flush_pending_reports
from .value_shift import rewrite_value_shift

# fusions done entirely by the pre-grad pass: no joint-graph patterns
PRE_GRAD_ONLY = frozenset({"value_shift"})

_PACKAGE = Path(__file__).resolve().parent.parent


def _source_files() -> tuple[str, ...]:
    """Everything whose edit must invalidate Inductor's FX graph cache."""
    folders = ("passes", "ops", "kernels")
    files = [_PACKAGE / "_inductor_compat.py", _PACKAGE / "config.py"]
    for folder in folders:
        files.extend(sorted((_PACKAGE / folder).glob("*.py")))
    return tuple(str(f) for f in files)


def _graph_device_type(graph: torch.fx.Graph) -> str:
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return val.device.type
    return "cpu"


def _graph_kind(graph: torch.fx.Graph) -> str:
    is_joint = any(is_tangent(n) for n in graph.nodes)
    return "training" if is_joint else "inference"


class CCGQAGraphPass(CustomGraphPass):
    """Replaces every recognised idiom of the enabled fusions by a ``torch.ops.ccgqa`` op."""

    def __init__(self, fusions: tuple[str, ...], fuse_on_cpu: bool | None = None) -> None:
        from .. import config

        self.fusions = tuple(f for f in fusions if f not in PRE_GRAD_ONLY)
        self.fuse_on_cpu = config.fuse_on_cpu() if fuse_on_cpu is None else fuse_on_cpu

    def __call__(self, graph: torch.fx.Graph) -> None:
        record = report.start_graph(current_compile_id(), _graph_kind(graph))
        flush_pending_reports()  # what the pre-grad SDPA pass did to this graph
        if not self.fusions:
            return
        device_type = _graph_device_type(graph)
        if device_type != "cuda" and not self.fuse_on_cpu:
            record.note = f"{device_type} graph left to Inductor (CCGQA_FUSE_ON_CPU=1 fuses it)"
            return
        normalize_joint_graph(graph)
        order_scatter_sums(graph)
        before = {fusion: find_candidates(graph, fusion) for fusion in self.fusions}
        try:
            self._apply_patterns(graph, device_type)
            alive = set(graph.nodes)
            if any(node in alive for nodes in before.values() for node in nodes):
                # second chance: gradient sums interleaved with a residual's gradient
                if peel_first_addend(graph):
                    self._apply_patterns(graph, device_type)
        finally:
            forget_graph(graph)
        for fusion in self.fusions:
            report_unfused_candidates(graph, fusion, before[fusion])
        if {"ccgqa_prologue", "gqa_attention"} <= set(self.fusions):
            report_fused_blocks(graph)

    def _apply_patterns(self, graph: torch.fx.Graph, device_type: str) -> None:
        for fusion in self.fusions:
            # only the parts that may match this graph get built (traced) and run
            for pattern_pass in pattern_passes_for(fusion, graph, device_type):
                refresh_backward_nodes(graph)
                if pattern_pass.apply(graph):
                    # replacements are inserted at the match's last node; restore the
                    # order before anything lints the graph
                    stable_topological_sort(graph)
                    graph.eliminate_dead_code()

    def uuid(self) -> Any:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        extra = (
            f"{torch.__version__}|{triton_version}|{','.join(self.fusions)}|cpu={self.fuse_on_cpu}"
        )
        return get_hash_for_files(_source_files(), extra)


class ChainedGraphPass(CustomGraphPass):
    """Ours, then whatever pass was already installed in the same hook (never clobber it)."""

    def __init__(self, first: CustomGraphPass, then: Any) -> None:
        self.first, self.then = first, then

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.first(graph)
        self.then(graph)

    def uuid(self) -> Any:
        then_uuid = self.then.uuid() if isinstance(self.then, CustomGraphPass) else None
        if then_uuid is None:
            return None  # an opaque pass: bypass the FX graph cache rather than risk it
        digest = hashlib.sha256(repr((self.first.uuid(), then_uuid)).encode())
        return digest.digest()


def _chain(ours: CustomGraphPass, existing: Any) -> Any:
    if existing is None:
        return ours
    if isinstance(existing, (list, tuple)):  # torch >= 2.13 lets a hook hold a list
        return [ours, *existing]
    return ChainedGraphPass(ours, existing)


def make_pass(fusions: tuple[str, ...], existing: Any = None) -> CustomGraphPass:
    """The ``joint_custom_pre_pass``: ours, then ``existing`` (the hook's previous value)."""
    return _chain(CCGQAGraphPass(fusions), existing)


class ValueShiftPass(CustomGraphPass):
    """Pre-grad: ``linear(pad(x)[:, :T])`` -> ``pad(linear(x))[:, :T]`` (``value_shift.py``),
    on CUDA graphs (and CPU ones with ``CCGQA_FUSE_ON_CPU=1``, as every fusion)."""

    def __init__(self, fuse_on_cpu: bool | None = None) -> None:
        from .. import config

        self.fuse_on_cpu = config.fuse_on_cpu() if fuse_on_cpu is None else fuse_on_cpu

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.fuse_on_cpu or _dynamo_graph_device_type(graph) == "cuda":
            rewrite_value_shift(graph)

    def uuid(self) -> Any:
        extra = f"value_shift|{torch.__version__}|cpu={self.fuse_on_cpu}"
        return get_hash_for_files(_source_files(), extra)


def _dynamo_graph_device_type(graph: torch.fx.Graph) -> str:
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("example_value", node.meta.get("val"))
            if isinstance(val, torch.Tensor):
                return val.device.type
    return "cpu"


def make_pre_grad_pass(fusions: tuple[str, ...], existing: Any = None) -> Any:
    """The ``pre_grad_custom_pass``: the value-shift rewrite and the SDPA rewrite (part of
    the ``gqa_attention`` fusion), each when its fusion is on, then ``existing``."""
    ours: list[CustomGraphPass] = []
    if "value_shift" in fusions:
        ours.append(ValueShiftPass())
    if "gqa_attention" in fusions:
        ours.append(SdpaAttentionPass())
    for pass_ in reversed(ours):
        existing = _chain(pass_, existing)
    return existing
