"""Every private Inductor/AOTAutograd internal this package touches, in one place.

Checked against torch 2.11 (GPU image) and 2.13 (CPU CI). If a future torch moves one of
these, this is the only module to change; the version check below makes the failure a
clear message instead of an AttributeError deep inside a compilation.
"""

from __future__ import annotations

import contextlib
import functools

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

from torch._inductor.fx_passes.joint_graph import early_patterns  # noqa: E402
from torch._inductor.fx_passes.post_grad import remove_noop_ops  # noqa: E402
from torch._inductor.pattern_matcher import (  # noqa: E402
    Match,
    PatternMatcherPass,
    fwd_only,
    joint_fwd_bwd,
    register_replacement,
    stable_topological_sort,
)
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily  # noqa: E402
from torch._subclasses.functional_tensor import dispatch_functionalize  # noqa: E402
from torch.fx.experimental.symbolic_shapes import statically_known_true  # noqa: E402


def fwd_only_functional(fn, args, **kwargs):
    """``fwd_only`` through functionalization.

    Inference graphs reaching the joint pass are functional (``add``, never ``add_``), but
    some decompositions (``F.rms_norm``) trace to in-place ops; and a ``triton_op`` in a
    replacement is only inlined into Inductor's code when traced functionalized.
    """
    return fwd_only(dispatch_functionalize(fn), args, **kwargs)


@functools.cache
def joint_fwd_bwd_with_tangents(contiguous: bool):
    """``joint_fwd_bwd`` with the tangents' strides guessed contiguous (``True``) or as the
    outputs' (``False``).

    A gradient's layout decides where the backward copies: an output that is a transposed
    view (q after ``transpose(1, 2)`` and RoPE) gets a contiguous gradient from attention's
    backward, and the backward of the later ``.view`` then clones it; with a gradient laid
    out as the output, no clone. AOTAutograd guesses the tangents' strides for the trace
    by ``torch._functorch.config.guess_tangent_strides_as_outputs`` (True on torch 2.13,
    False on 2.11), so a pattern traced with the default matches only one of the two
    graphs. Patterns whose backward depends on it are traced both ways. Where the flag
    does not exist, the plain tracer (a missed fusion at worst: the exact re-trace still
    decides every match).
    """
    config = torch._functorch.config
    if not hasattr(config, "guess_tangent_strides_as_outputs"):
        return joint_fwd_bwd

    @functools.wraps(joint_fwd_bwd)
    def trace(fn, args, **kwargs):
        with config.patch(guess_tangent_strides_as_outputs=not contiguous):
            return joint_fwd_bwd(fn, args, **kwargs)

    return trace


def pattern_tracing_context():
    """The context Inductor itself registers patterns under (see ``init_once_fakemode``)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._guards.tracing(None))
    stack.enter_context(unset_fake_temporarily())
    stack.enter_context(FakeTensorMode())
    stack.enter_context(torch.inference_mode(False))
    return stack


def normalize_joint_graph(graph: torch.fx.Graph) -> None:
    """Bring a joint graph to the form our patterns were traced in.

    ``joint_custom_pre_pass`` runs before Inductor's own no-op removal and early patterns;
    the pattern tracer (``joint_fwd_bwd``) applies both, so we apply them first.
    """
    remove_noop_ops(graph)
    early_patterns.apply(graph)


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


def _possibly_true(expr) -> bool:
    """Not statically known to be false (``statically_known_true`` of the negation)."""
    return not statically_known_true(torch.sym_not(expr))


_SYM_ARG_DEDUP = "statically_known_true(v != a) for a in sym_args"


@functools.cache
def _sym_arg_dedup_patchable() -> bool:
    """Whether ``pattern_matcher`` calls ``statically_known_true`` only in the sym-arg
    dedup of ``register_replacement`` (checked on the installed torch's source)."""
    import inspect

    from torch._inductor import pattern_matcher

    if pattern_matcher.statically_known_true is not statically_known_true:
        return False
    try:
        source = inspect.getsource(pattern_matcher)
    except (OSError, TypeError):  # pragma: no cover - no source installed
        return False
    return source.count("statically_known_true(") == 1 and _SYM_ARG_DEDUP in source


@contextlib.contextmanager
def symbolic_sizes_as_pattern_inputs():
    """Around a ``register_replacement`` exact check: every distinct symbolic size of the
    matched inputs becomes an input of the re-traced pattern.

    The check re-traces the search function at the matched shapes, with the SymInts of the
    inputs' sizes and strides as extra inputs so that the pattern refers to them as the
    graph does (AOTAutograd passes each size symbol in as a placeholder). It keeps a SymInt
    only if ``statically_known_true(v != a)`` for every one kept before: two independent
    symbols (B and T under ``dynamic=True``, s0 != s1 not provable) keep only the first.
    The pattern then reads T as ``sym_size(q, 2)``, with tril's ``arange`` length as
    ``(T - 0 + 1 - 1) // 1`` around it, where the graph has the placeholder: no exact match,
    so no hand-written attention or CCGQA prologue fused under ``dynamic=True`` (with T
    the only symbol, ``mark_dynamic``, it was kept: no miss). Here a SymInt is kept unless
    it is statically known equal to one kept before: one input per distinct size, what the
    dedup is for.
    ``statically_known_true`` has no other use in ``pattern_matcher`` (checked on the
    source; on a torch where that is not so, this does nothing and the tests that count
    the ``dynamic=True`` fusions fail).
    """
    from torch._inductor import pattern_matcher

    if not _sym_arg_dedup_patchable():
        yield
        return
    original = pattern_matcher.statically_known_true
    pattern_matcher.statically_known_true = _possibly_true
    try:
        yield
    finally:
        pattern_matcher.statically_known_true = original


def _has_symbolic_size(node) -> bool:
    return any(not isinstance(s, int) and getattr(s, "free_symbols", None) for s in node.get_size())


def install_conv1d_backward_fallback() -> None:
    """Lower a 1-D ``convolution_backward`` with symbolic sizes to the ATen fallback.

    torch 2.13's Inductor lowering of ``aten.convolution_backward`` calls
    ``guard_int_seq`` on the input gradient's strides (for a (B, C, T) input one of them
    is T), so a causal conv in a CCGQA block pins the sequence length: ``mark_dynamic`` on
    T raises ConstraintViolationError and ``dynamic=True`` recompiles per length. Its
    templates are 2-D only, so a 1-D conv always ends in the ATen kernel anyway; the
    fallback computes the same thing without the guard. torch 2.11 has no such lowering
    (it already falls back): nothing to do there. Idempotent; affects no other conv.
    """
    from torch._inductor import lowering
    from torch._inductor.kernel import conv

    target = torch.ops.aten.convolution_backward.default
    original = lowering.lowerings.get(target)
    lowered = getattr(conv, "convolution_backward_lowering", None)
    fallback = getattr(conv, "aten_convolution_backward_fallback", None)
    if original is None or lowered is None or fallback is None or original is not lowered:
        return  # torch 2.11, already installed, or a torch whose lowering we do not know

    def conv1d_backward_lowering(grad_out, input, weight, *args, **kwargs):
        if len(input.get_size()) == 3 and (
            _has_symbolic_size(input) or _has_symbolic_size(grad_out)
        ):
            return fallback(grad_out, input, weight, *args, **kwargs)
        return original(grad_out, input, weight, *args, **kwargs)

    lowering.lowerings[target] = conv1d_backward_lowering


__all__ = [
    "Match",
    "PatternMatcherPass",
    "current_compile_id",
    "fwd_only",
    "fwd_only_functional",
    "install_conv1d_backward_fallback",
    "joint_fwd_bwd",
    "joint_fwd_bwd_with_tangents",
    "matched_so_far",
    "multi_output_pairing_supported",
    "normalize_joint_graph",
    "pair_multi_outputs",
    "pattern_tracing_context",
    "register_replacement",
    "relax_list_arguments",
    "stable_topological_sort",
    "statically_known_true",
    "symbolic_sizes_as_pattern_inputs",
]


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
    tables, 2026-11-25). torch 2.13 names it ``identify_accessed_tensors``, 2.11
    ``identify_mutated_tensors``; both assume every input written when the analysis fails.
    """
    from torch._higher_order_ops import triton_kernel_wrap

    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, dict(kwargs), {})
        names = [dep.name for dep in accesses.read_writes.writes]
    else:
        names = triton_kernel_wrap.identify_mutated_tensors(kernel, dict(kwargs), {})
    return [n for n in names if isinstance(kwargs.get(n), torch.Tensor)]


# ---- Pattern internals the CCGQA prologue's patterns need -----------------------------


@functools.cache
def _list_arguments_relaxable() -> bool:
    """Whether ``CallFunction`` still keeps its arguments and flattening where
    ``relax_list_arguments`` rewrites them."""
    from torch._inductor.pattern_matcher import CallFunction

    probe = CallFunction(torch.ops.aten.add.default, [1], 2)
    return hasattr(CallFunction, "simple_flatten") and all(
        hasattr(probe, name) for name in ("args", "kwargs", "flatten", "flat_args_kwargs")
    )


def relax_list_arguments(pattern_pass, target) -> bool:
    """Make the loose match of every registered pattern node calling ``target`` ignore its
    list arguments, as ``fx_to_pattern`` already does for int lists (``list`` is an ignored
    type there) but not for bool lists such as ``convolution_backward``'s ``output_mask``:
    a pattern node with a nested list is compared with ``pytree_flatten``, which expands
    the matched node's int lists into tuples, so its structure check ("args_structure")
    failed on every real graph. Idempotent. The exact re-trace at match time still
    compares every literal, so this only widens the loose match.

    Returns False (and changes nothing) on a torch whose pattern classes do not look as
    they did in 2.11 to 2.13: those patterns then never match, a missed fusion, never a
    wrong one."""
    from torch._inductor.pattern_matcher import (
        CallFunction,
        Ignored,
        MultiOutputPattern,
        PatternExpr,
    )

    if not _list_arguments_relaxable():
        return False
    seen: set[int] = set()

    def walk(pattern) -> None:
        if id(pattern) in seen or not isinstance(pattern, PatternExpr):
            return
        seen.add(id(pattern))
        if isinstance(pattern, MultiOutputPattern):
            for output in pattern.outputs:
                walk(output)
            return
        if not isinstance(pattern, CallFunction):
            return
        if target in pattern.fns:
            pattern.args = tuple(
                Ignored() if isinstance(a, (list, tuple)) else a for a in pattern.args
            )
            pattern.flatten = pattern.simple_flatten
            pattern.flat_args_kwargs = pattern.flatten(pattern.args, pattern.kwargs)
        for arg in (*pattern.args, *pattern.kwargs.values()):
            walk(arg)

    for entries in pattern_pass.patterns.values():
        for entry in entries:
            walk(entry.pattern)
    return True


# What ``MultiOutputPattern`` must look like for ``pair_multi_outputs`` to replace its
# anchor search: ``_match`` hands every later output to ``_match_from_anchors``, which
# tries the anchor nodes in turn and keeps the first that matches (torch 2.11 to 2.13).
_ANCHOR_SEARCH_SOURCE = (
    "self._match_from_anchors(pattern, ctx)",
    "pattern.find_anchor_nodes(ctx,",
    "ctx.pattern_to_node = dict(prior)",
)


@functools.cache
def multi_output_pairing_supported() -> bool:
    """Whether ``pair_multi_outputs`` can take over the anchor search (checked on the
    installed torch's source)."""
    import inspect

    from torch._inductor.pattern_matcher import MultiOutputPattern

    try:
        source = inspect.getsource(MultiOutputPattern)
    except (OSError, TypeError):  # pragma: no cover - no source installed
        return False
    return all(line in source for line in _ANCHOR_SEARCH_SOURCE)


def _anchor_search(accept):
    """``MultiOutputPattern._match_from_anchors`` of torch 2.11 to 2.13, skipping a
    candidate an earlier output took and one for which ``accept(ctx, outputs)`` is False."""

    def _match_from_anchors(self, pattern, ctx):
        from torch._inductor.pattern_matcher import FailedMatch, is_match

        taken = {ctx.pattern_to_node.get(output) for output in self.outputs}
        prior = dict(ctx.pattern_to_node)
        m = FailedMatch("no anchor found")
        for node in pattern.find_anchor_nodes(ctx, set()):
            if node in taken:
                continue
            m = ctx.match(pattern, node)
            if is_match(m) and not accept(ctx, self.outputs):
                m = FailedMatch("the outputs found so far were refused")
            if is_match(m):
                return m
            ctx.pattern_to_node = dict(prior)
        return m

    return _match_from_anchors


def pair_multi_outputs(pattern_pass, accept, wrap_check) -> bool:
    """Give every registered multi-output pattern of ``pattern_pass`` an anchor search
    that skips taken and refused candidates (``_anchor_search``): for its loose match
    through the class of the pattern, and for the exact re-trace that
    ``register_replacement`` matches again from the anchor (inside its ``extra_check``)
    by a swap of ``MultiOutputPattern._match_from_anchors`` for the time of that check,
    the way ``symbolic_sizes_as_pattern_inputs`` swaps a helper there.
    ``wrap_check(match, inner)`` runs in the swap and calls the entry's own check.
    Idempotent. Returns False (changing nothing) where the anchor search is not the one
    replaced here: the caller must then not register patterns that need the pairing."""
    from torch._inductor.pattern_matcher import MultiOutputPattern

    if not multi_output_pairing_supported():
        return False
    search = _anchor_search(accept)

    class PairedOutputs(MultiOutputPattern):
        _match_from_anchors = search

    @contextlib.contextmanager
    def exact_match_pairs_outputs():
        original = MultiOutputPattern._match_from_anchors
        MultiOutputPattern._match_from_anchors = search
        try:
            yield
        finally:
            MultiOutputPattern._match_from_anchors = original

    for entries in pattern_pass.patterns.values():
        for entry in entries:
            if type(entry.pattern) is MultiOutputPattern:
                entry.pattern.__class__ = PairedOutputs
            if getattr(entry.extra_check, "ccgqa_pairs_outputs", False):
                continue

            def paired(match, inner=entry.extra_check) -> bool:
                with exact_match_pairs_outputs():
                    return wrap_check(match, inner)

            paired.ccgqa_pairs_outputs = True  # type: ignore[attr-defined]
            entry.extra_check = paired
    return True


def matched_so_far(ctx, outputs) -> tuple[list[torch.fx.Node], set[torch.fx.Node]]:
    """In a match in progress: the graph nodes matched to ``outputs`` so far, and those
    bound to the pattern's named inputs (``KeywordArg``s)."""
    from torch._inductor.pattern_matcher import KeywordArg

    found = [n for n in map(ctx.pattern_to_node.get, outputs) if isinstance(n, torch.fx.Node)]
    inputs = {
        node
        for pattern, node in ctx.pattern_to_node.items()
        if isinstance(pattern, KeywordArg) and isinstance(node, torch.fx.Node)
    }
    return found, inputs
