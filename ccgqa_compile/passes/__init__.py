"""The graph passes the ``ccgqa`` backend installs.

- ``pre_grad_custom_pass`` (``RecognitionPass``): on Dynamo's torch-level graph, before
  autograd, each recognizer finds candidate regions by their structure, proves on float64
  probes that a region computes its op's function, and replaces it with the op; AOTAutograd
  then differentiates the op with its own fused backward. Order: attention sites first
  (their q and k are where a CCGQA prologue ends), then the prologues feeding them, then
  RoPE, RMSNorm and SwiGLU anywhere else.
- ``joint_custom_pre_pass`` (``ReportPass``): rewrites nothing; it opens the fusion report's
  record of the graph (it knows whether the graph is a training or an inference graph) and
  writes the recognition events into it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .. import reporting as report
from .._inductor_compat import current_compile_id
from ..reporting import log
from .common import GraphContext, flush_pending_reports, flush_to_report
from .evaluate import size_assignments
from .fx_util import value

_PACKAGE = Path(__file__).resolve().parent.parent


def _source_files() -> tuple[str, ...]:
    """Everything whose edit must invalidate Inductor's FX graph cache."""
    files = [_PACKAGE / "_inductor_compat.py", _PACKAGE / "config.py"]
    for folder in ("passes", "ops", "kernels"):
        files.extend(sorted((_PACKAGE / folder).glob("*.py")))
    return tuple(str(f) for f in files)


def _graph_device_type(graph: torch.fx.Graph) -> str:
    for node in graph.nodes:
        if node.op == "placeholder":
            v = value(node)
            if isinstance(v, torch.Tensor):
                return v.device.type
    return "cpu"


def _functorch_transform(graph: torch.fx.Graph) -> str | None:
    """The first functorch transform call in ``graph`` (``torch.func.grad``, ``vmap``...
    compiled whole): the transform's own calls order what its body computes (the
    differentiated inputs are marked as requiring grad partway through the graph), and the
    ops' autograd does not implement functorch's levels, so such graphs are left alone."""
    for node in graph.nodes:
        module = getattr(node.target, "__module__", None) or ""
        if node.op == "call_function" and module.startswith(("torch._functorch", "torch._C._functorch")):
            return getattr(node.target, "__name__", str(node.target))
    return None


def _is_joint(graph: torch.fx.Graph) -> bool:
    return any(n.op == "placeholder" and "tangent" in str(n.target) for n in graph.nodes)


def recognise(ctx: GraphContext, fusions: tuple[str, ...]) -> None:
    """Every recognizer, in order: attention sites, the prologues ending at them (and the
    whole blocks they make), then RoPE, RMSNorm and SwiGLU wherever they remain."""
    from . import (
        aliases,
        attention,
        blocks,
        conv_forms,
        einops_calls,
        fresh_buffers,
        prologue,
        rms_norm,
        rope,
        score_factors,
        swiglu,
        value_shift,
    )

    ctx.decode = "gqa_decode_attention" in fusions
    if fusions:  # forms the recognizers read: einops calls written out, buffer writes as scatters
        _guarded(ctx, "aliases", lambda: aliases.run(ctx))
        _guarded(ctx, "einops_calls", lambda: einops_calls.run(ctx))
        _guarded(ctx, "fresh_buffers", lambda: fresh_buffers.run(ctx))
    # convolutions written without conv1d, as conv1d; put back where no prologue took them
    convs = _guarded(ctx, "ccgqa_prologue", lambda: conv_forms.run(ctx)) if "ccgqa_prologue" in fusions else None
    if "value_shift" in fusions:
        _guarded(ctx, "value_shift", lambda: value_shift.run(ctx))
    # run-time factors on the scores moved onto q; put back where nothing fused them
    moved = _guarded(ctx, "gqa_attention", lambda: score_factors.run(ctx)) if "gqa_attention" in fusions else None
    sites = _guarded(ctx, "gqa_attention", lambda: attention.run(ctx, "gqa_attention" in fusions))
    if "ccgqa_prologue" in fusions and sites:
        _guarded(ctx, "ccgqa_prologue", lambda: prologue.run(ctx, sites))
    if moved:
        _guarded(ctx, "gqa_attention", lambda: score_factors.undo_unused(ctx, moved))
    blocks.report(ctx, sites or [])
    if convs:
        _guarded(ctx, "ccgqa_prologue", lambda: conv_forms.undo_unused(ctx, convs))
    for name, run in (("rope", rope.run), ("rms_norm", rms_norm.run), ("swiglu", swiglu.run)):
        if name in fusions:
            _guarded(ctx, name, lambda run=run: run(ctx))


def _guarded(ctx: GraphContext, fusion: str, step):
    """Run one recognizer. An unexpected error must not fail the user's compilation (Dynamo
    would fall back to a graph break): the graph is checked intact and the error reported;
    ``CCGQA_STRICT=1`` (the tests) raises it instead."""
    from .. import config

    try:
        return step()
    except Exception as why:
        if config.strict():
            raise
        ctx.graph.lint()  # a half-done rewrite is not recoverable: fail loudly then
        log.warning("ccgqa: %s recognition failed, graph left as is: %r", fusion, why)
        ctx.rejected(fusion, "error", "-", f"internal error, left to Inductor: {why!r}"[:300])
        return None


_runs = [0]


def recognition_runs() -> int:
    """How many graphs the recognition pass has run on in this process (a compile that
    does not add one was served whole from a cache)."""
    return _runs[0]


class RecognitionPass(CustomGraphPass):
    """Pre-grad: replaces every region proven to compute a fused op's function."""

    def __init__(self, fusions: tuple[str, ...], fuse_on_cpu: bool | None = None) -> None:
        from .. import config

        self.fusions = tuple(fusions)
        self.fuse_on_cpu = config.fuse_on_cpu() if fuse_on_cpu is None else fuse_on_cpu

    def __call__(self, graph: torch.fx.Graph) -> None:
        from .. import ops  # noqa: F401  (registers torch.ops.ccgqa.*)

        _runs[0] += 1
        device_type = _graph_device_type(graph)
        ctx = GraphContext(graph, size_assignments(graph), self.fuse_on_cpu)
        if device_type != "cuda" and not self.fuse_on_cpu:
            ctx.events.append(
                ("note", (f"{device_type} graph left to Inductor (CCGQA_FUSE_ON_CPU=1 fuses it)",))
            )
        elif (transform := _functorch_transform(graph)) is not None:
            ctx.events.append(
                ("note", (f"graph left to Inductor: it runs a functorch transform ({transform})",))
            )
        else:
            recognise(ctx, self.fusions)
        flush_to_report(ctx)

    def uuid(self) -> Any:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        extra = f"{torch.__version__}|{triton_version}|{','.join(self.fusions)}|cpu={self.fuse_on_cpu}"
        return get_hash_for_files(_source_files(), extra)


class ReportPass(CustomGraphPass):
    """Joint-graph hook: opens the graph's report record, writes the pre-grad events."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        report.start_graph(current_compile_id(), "training" if _is_joint(graph) else "inference")
        flush_pending_reports()

    def uuid(self) -> Any:
        return get_hash_for_files(_source_files(), "report")


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


def make_pass(fusions: tuple[str, ...], existing: Any = None) -> Any:
    """The ``joint_custom_pre_pass``: the report hook, then ``existing``."""
    return _chain(ReportPass(), existing)


def make_pre_grad_pass(fusions: tuple[str, ...], existing: Any = None) -> Any:
    """The ``pre_grad_custom_pass``: recognition, then ``existing``."""
    return _chain(RecognitionPass(fusions), existing)
