"""The ``ccgqa`` torch.compile backend: Inductor plus our graph passes.

``torch.compile(model, backend="ccgqa")`` finds ``ccgqa_backend`` through the
``torch_dynamo_backends`` entry point, so no import is needed. The passes (the joint-graph
pass, and the pre-grad SDPA rewrite) are installed through
``compile_fx(config_patches=...)``, which Inductor re-applies when it compiles the backward
later: nothing global is changed.

``register_global()`` is the opt-in for plain ``torch.compile(model)``; it installs the same
passes in ``torch._inductor.config`` (chained with any pass already there) until
``unregister_global()`` restores the previous values.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from . import config, reporting

_OUR_OPTIONS = ("ccgqa_disable",)

# Inductor settings our fused ops need. A replacement's Triton launch is traced with the
# strides its inputs had then, and baked in as integers; Inductor only keeps the *order*
# of those strides for user kernels it did not trace itself (no eager_input_vals), so when
# it pads a buffer (odd sizes on CUDA: comprehensive padding of pointwise/reduction
# outputs, shape padding of matmul operands) the kernel reads it with stale strides:
# wrong gradients and out-of-bounds views, seen on the H100 with T = 37 in a CCGQA block.
# Without padding, a dense buffer of a given stride order has exactly the traced strides.
_LAYOUT_PATCHES = {"comprehensive_padding": False, "shape_padding": False}


def _pass_patches(disabled: set[str]) -> dict[str, Any]:
    from torch._inductor import config as inductor_config

    from .passes import make_pass, make_pre_grad_pass

    fusions = config.enabled_fusions(config.validate_fusion_names(disabled))
    return {
        "joint_custom_pre_pass": make_pass(fusions, inductor_config.joint_custom_pre_pass),
        "pre_grad_custom_pass": make_pre_grad_pass(fusions, inductor_config.pre_grad_custom_pass),
        **(_LAYOUT_PATCHES if fusions else {}),
    }


def ccgqa_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any):
    """Dynamo backend. Accepts ``mode=`` and ``options=`` like ``backend="inductor"``.

    ``options={"ccgqa_disable": ["rope"]}`` turns fusions off for this model only.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from . import ops  # noqa: F401  (the replacements call torch.ops.ccgqa.*)

    unknown = set(kwargs) - {"mode", "options"}
    if unknown:
        raise TypeError(f"ccgqa backend got unexpected arguments {sorted(unknown)}")
    options = dict(kwargs.get("options") or {})
    disabled = set(options.pop("ccgqa_disable", ()) or ())
    patches: dict[str, Any] = {}
    if kwargs.get("mode"):
        patches.update(list_mode_options(kwargs["mode"]))
    patches.update(options)
    patches.update(_pass_patches(disabled))
    from ._inductor_compat import current_compile_id
    from .passes import recognition_runs
    from .passes.common import discard_pending, record_cached_joint

    compile_id = current_compile_id()
    piece = _ddp_piece(gm)
    graphs = reporting.report().graphs
    before = len(graphs)
    runs = recognition_runs()
    try:
        compiled = compile_fx(gm, example_inputs, config_patches=patches, inner_compile=_inner_compile)
    except BaseException:
        discard_pending(compile_id)  # an abandoned attempt (Dynamo restarts it)
        raise
    if recognition_runs() == runs:
        _record_cache_hit(compile_id)
    else:
        record_cached_joint(compile_id)
    # this graph's records (a split graph's pieces share its compile id)
    records = [g for g in graphs[before:] if g.compile_id == compile_id]
    if piece is not None:
        _mark_ddp_piece(records, graphs[:before], *piece)
    return _run_tracking_modules(compiled, records) if records else compiled


def _record_cache_hit(compile_id: str) -> None:
    """The graph came whole from a compile cache (AOTAutograd's): no pass ran on it, so
    the report can only say so."""
    record = reporting.start_graph(compile_id, "unknown")
    record.from_cache = True
    record.note = ("loaded whole from the compile cache: the fusions in it are not known here "
                   "(TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 recompiles and reports them)")  # fmt: skip


def _ddp_piece(gm: torch.fx.GraphModule) -> tuple[set[str], set[str]] | None:
    """For a piece of a graph DDPOptimizer split at gradient-bucket boundaries (it tags
    each piece with its reason before calling the backend): the names of the nodes whose
    value leaves the piece, and of those reading a value from an earlier piece (a
    placeholder without a Dynamo source). None for any other graph."""
    reason = getattr(getattr(gm, "compile_subgraph_reason", None), "reason", "")
    if "DDPOptimizer" not in str(reason):
        return None
    leaving: set[str] = set()
    for node in gm.graph.find_nodes(op="output"):
        torch.fx.map_arg(node.args, lambda n: leaving.add(n.name))
    entering = {
        user.name
        for node in gm.graph.find_nodes(op="placeholder")
        if getattr(node, "_dynamo_source", None) is None
        for user in node.users
    }
    return leaving, entering


def _mark_ddp_piece(records, earlier, leaving: set[str], entering: set[str]) -> None:
    """Number the pieces of one split graph, and say so where a candidate stops at a
    piece boundary: the rest of its pattern is in another piece."""
    for record in records:
        record.ddp_piece = 1 + sum(
            1 for g in earlier if g.compile_id == record.compile_id and g.ddp_piece
        )
        earlier = [*earlier, record]
        for r in (*record.rejected, *record.unfused_candidates):
            if r.node in leaving:
                r.reason += (
                    f"; cut by DDPOptimizer's split: {r.node} leaves this piece, "
                    "the rest of the pattern is in the next"
                )
            elif r.node in entering:
                r.reason += (
                    f"; cut by DDPOptimizer's split: {r.node} reads a value of an earlier piece"
                )


def _run_tracking_modules(compiled, records):
    """The compiled graph, noting at each call which module it runs for (its first
    parameter input): Dynamo runs one compiled graph for every module of the same code
    whose guards pass (FSDP2's per-block compiled blocks, blocks between graph breaks),
    and the report counts each fusion once per module (``GraphRecord.sites``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    def is_param(a) -> bool:
        # not a fake one: DDPOptimizer runs each compiled piece on fake tensors once
        return isinstance(a, torch.nn.Parameter) and not isinstance(a, FakeTensor)

    first_param: list[int] = []

    def run(*args):
        if not first_param:
            first_param.append(next((i for i, a in enumerate(args) if is_param(a)), -1))
        i = first_param[0]
        if 0 <= i < len(args) and is_param(args[i]):
            for record in records:
                record.modules.add(args[i])
        return compiled(*args)

    return functools.update_wrapper(run, compiled)


def _inner_compile(gm, example_inputs, **kwargs):
    """Inductor's own graph compiler (forward and, later, backward graphs), with a 1-D
    conv's backward lowered without pinning a dynamic length (see ``_inductor_compat``)."""
    from torch._inductor.compile_fx import compile_fx_inner

    from ._inductor_compat import conv1d_backward_fallback

    with conv1d_backward_fallback():
        return compile_fx_inner(gm, example_inputs, **kwargs)


_HOOKS = ("joint_custom_pre_pass", "pre_grad_custom_pass", *_LAYOUT_PATCHES)
_saved_global_pass: list[dict[str, Any]] = []


def register_global(disable: tuple[str, ...] = ()) -> None:
    """Opt in: plain ``torch.compile(model)`` (Inductor) also runs the ccgqa passes.

    Undo with ``unregister_global()``. Calling it twice is a no-op.
    """
    from torch._inductor import config as inductor_config

    from . import ops  # noqa: F401

    if _saved_global_pass:
        return
    patches = _pass_patches(set(disable))
    _saved_global_pass.append({hook: getattr(inductor_config, hook) for hook in _HOOKS})
    for hook in _HOOKS:
        if hook in patches:
            setattr(inductor_config, hook, patches[hook])


def unregister_global() -> None:
    """Restore Inductor's pass hooks to what they were before ``register_global``."""
    from torch._inductor import config as inductor_config

    if _saved_global_pass:
        for hook, value in _saved_global_pass.pop().items():
            setattr(inductor_config, hook, value)
