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

from typing import Any

import torch

from . import config

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
    return compile_fx(gm, example_inputs, config_patches=patches, inner_compile=_inner_compile)


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
