"""A test-only backend: Inductor's whole graph pipeline with our passes, minus code generation.

Dynamo -> AOTAutograd -> Inductor decompositions -> joint-graph passes (ours included) ->
partition, exactly as ``backend="ccgqa"``, but the partitioned graphs run eagerly instead of
being compiled to C++: a hypothesis example costs a fraction of a second instead of seconds.
The full backend is exercised on every corpus entry too (test_corpus_equivalence).
"""

from __future__ import annotations

from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.compile_fx import compile_fx

from ccgqa_compile import ops  # noqa: F401  (a cached graph calls torch.ops.ccgqa.*)
from ccgqa_compile.backend import _pass_patches


def _run_eagerly(gm, example_inputs, **kwargs):
    return make_boxed_func(gm.forward)


def ccgqa_without_codegen(gm, example_inputs, **kwargs):
    return compile_fx(
        gm, example_inputs, inner_compile=_run_eagerly, config_patches=_pass_patches(set())
    )


def dynamo_graph(fn, *args):
    """The graph Dynamo captures of ``fn`` on ``args``, before any pass: what the
    pre-grad passes receive."""
    import torch

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]
