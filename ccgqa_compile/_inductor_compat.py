"""Every private Inductor/AOTAutograd internal this package touches, in one place.

Checked against torch 2.11 (GPU image) and 2.13 (CPU CI). If a future torch moves one of
these, this is the only module to change; the version check below makes the failure a
clear message instead of an AttributeError deep inside a compilation.
"""

from __future__ import annotations

import contextlib

import torch

MIN_TORCH = (2, 11)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


if torch_version() < MIN_TORCH:  # pragma: no cover - exercised only on old installs
    raise ImportError(
        f"ccgqa_compile needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
        f"(joint-graph custom passes, triton_op); found {torch.__version__}"
    )

# re-exported: the passes use them from here
from torch._inductor.pattern_matcher import stable_topological_sort  # noqa: E402, F401
from torch.fx.experimental.symbolic_shapes import statically_known_true  # noqa: E402, F401


def symbol_hints(shape_env) -> dict:
    """The values a shape environment's backed size symbols had when traced (torch 2.13
    names the table ``backed_var_to_val``, 2.11 ``var_to_val``)."""
    table = getattr(shape_env, "backed_var_to_val", None)
    if table is None:
        table = shape_env.var_to_val
    return dict(table)


def specialize(size):
    """The int a backed symbolic size had when traced, guarded: the compiled program is
    valid for that value only, and Dynamo recompiles if a call brings another (its guards
    are produced after the backend compiled, from the same shape environment). An int
    passes through."""
    if not isinstance(size, torch.SymInt):
        return size
    from torch.fx.experimental.symbolic_shapes import guard_int

    return guard_int(size)


def current_compile_id() -> str:
    """``frame/compile``, with ``_attempt`` after a restarted attempt as in Dynamo's logs
    (``0/0_1``). Dynamo may run the backend, restart the analysis and run it again within
    one compile id (seen under ``dynamic=True`` on a CCGQA block, a restart from
    ``_tensorify_python_scalars``, plain Inductor too); the SDPA rewrite's report events of
    the abandoned attempt must not be counted with the next attempt's graph (they were:
    ``gqa_attention x2`` for one SDPA call)."""
    ctx = torch._guards.CompileContext.try_get()
    if ctx is not None and ctx.compile_id is not None:
        attempt = getattr(ctx, "attempt", 0)
        return f"{ctx.compile_id}_{attempt}" if attempt else str(ctx.compile_id)
    return "?"


def _has_symbolic_size(node) -> bool:
    return any(not isinstance(s, int) and getattr(s, "free_symbols", None) for s in node.get_size())


@contextlib.contextmanager
def conv1d_backward_fallback():
    """While it is entered: lower a 1-D ``convolution_backward`` with symbolic sizes to
    the ATen fallback (the backend enters it around each of its graph compilations, so
    nothing outlives them).

    torch 2.13's Inductor lowering of ``aten.convolution_backward`` calls
    ``guard_int_seq`` on the input gradient's strides (for a (B, C, T) input one of them
    is T), so a causal conv in a CCGQA block pins the sequence length: ``mark_dynamic`` on
    T raises ConstraintViolationError and ``dynamic=True`` recompiles per length. Its
    templates are 2-D only, so a 1-D conv always ends in the ATen kernel anyway; the
    fallback computes the same thing without the guard. torch 2.11 has no such lowering
    (it already falls back): nothing to do there. Affects no other conv.
    """
    from torch._inductor import lowering
    from torch._inductor.kernel import conv

    target = torch.ops.aten.convolution_backward.default
    original = lowering.lowerings.get(target)
    lowered = getattr(conv, "convolution_backward_lowering", None)
    fallback = getattr(conv, "aten_convolution_backward_fallback", None)
    if original is None or lowered is None or fallback is None or original is not lowered:
        yield  # torch 2.11, already entered, or a torch whose lowering we do not know
        return

    def conv1d_backward_lowering(grad_out, input, weight, *args, **kwargs):
        if len(input.get_size()) == 3 and (
            _has_symbolic_size(input) or _has_symbolic_size(grad_out)
        ):
            return fallback(grad_out, input, weight, *args, **kwargs)
        return original(grad_out, input, weight, *args, **kwargs)

    lowering.lowerings[target] = conv1d_backward_lowering
    try:
        yield
    finally:
        lowering.lowerings[target] = original


def triton_kernel_of(node: torch.fx.Node) -> str | None:
    """``module.name`` of the user Triton kernel a ``triton_kernel_wrapper_*`` node launches
    (how a ``triton_op`` body appears in a traced graph), else None."""
    from torch._higher_order_ops.triton_kernel_wrap import (
        kernel_side_table,
        triton_kernel_wrapper_functional,
        triton_kernel_wrapper_mutation,
    )

    if node.op != "call_function" or node.target not in (
        triton_kernel_wrapper_functional,
        triton_kernel_wrapper_mutation,
    ):
        return None
    fn = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
        fn = fn.fn
    return f"{fn.__module__}.{fn.__name__}"


def kernel_written_args(kernel, kwargs: dict) -> list[str]:
    """The tensor arguments Inductor's analysis of a user Triton kernel (its TTIR) says the
    kernel writes: what ``triton_op`` functionalization clones and writes back. A false
    positive there is not harmless: a "written" stride-0 (expanded) view is written back
    into its base by summing over the broadcast dim (seen with the seed prologue's RoPE
    tables). torch 2.13 names it ``identify_accessed_tensors``, 2.11
    ``identify_mutated_tensors``; both assume every input written when the analysis fails.
    """
    from torch._higher_order_ops import triton_kernel_wrap

    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, dict(kwargs), {})
        names = [dep.name for dep in accesses.read_writes.writes]
    else:
        names = triton_kernel_wrap.identify_mutated_tensors(kernel, dict(kwargs), {})
    return [n for n in names if isinstance(kwargs.get(n), torch.Tensor)]
