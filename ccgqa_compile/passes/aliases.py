"""Normal form: functions that are other names of one op, called by the name the
recognizers read.

``torch.concatenate`` and ``torch.concat`` (NumPy's and the array API's names, ``axis=``
for ``dim=``) are ``torch.cat``: a JAX port concatenating q and k before one
convolution spells it so. The other NumPy and ``torch.special`` names of one op
(``torch.multiply``, ``x.divide``, ``torch.clip``, ``torch.special.logsumexp``,
``torch.special.expit``...) are called by the name the recognizers read, with the same
arguments.

``x.to(other)`` and ``x.type_as(other)`` read only ``other``'s dtype and device, which a
compiled graph knows (Dynamo guards on them): they become ``x.to(device, dtype)``, so a
causal mask cast to the scores' type (fairseq's ``mask.to(attn_weights)``) stays a
constant rather than a value computed from the scores.

``F.rms_norm`` / ``torch.rms_norm`` with ``eps=None`` (``nn.RMSNorm``'s default) take the
machine epsilon of the type they compute in when they run (float32's for half inputs):
the call is given that number, read off the input's dtype in the graph (Dynamo guards on
it). Left as a default, float64 probes of the
call would compute with float64's eps, another function than the graph's.

``F.scaled_dot_product_attention`` on 3-D (H, T, D) q, k and v (no batch dim: vLLM's torch
SDPA backend calls it per sequence on token-flat heads) is the same call on a batch of one:
the operands get a unit batch dim in front and the output loses it again.

The rewrites change how a call is spelled, never what it computes, so they stay whether
or not anything fuses.
"""

from __future__ import annotations

import torch

from .common import GraphContext
from .fx_util import SDPA, autocast_stacks, graph_changed, tensor_value
from .region import propagate_fake

_CAT_ALIASES = {torch.concatenate, torch.concat}
# other names of one function, same arguments: (function, method) alias -> the name read
_FUNCTION_ALIASES = {
    torch.multiply: torch.mul, torch.divide: torch.div, torch.true_divide: torch.div,
    torch.subtract: torch.sub, torch.negative: torch.neg, torch.absolute: torch.abs,
    torch.clip: torch.clamp, torch.special.logsumexp: torch.logsumexp,
    torch.special.softmax: torch.softmax, torch.special.log_softmax: torch.log_softmax,
    torch.special.expit: torch.sigmoid, torch.special.exp2: torch.exp2,
    torch.special.expm1: torch.expm1, torch.special.log1p: torch.log1p,
}  # fmt: skip
_METHOD_ALIASES = {
    "multiply": "mul", "divide": "div", "true_divide": "div", "subtract": "sub",
    "negative": "neg", "absolute": "abs", "clip": "clamp",
}  # fmt: skip
_RMS_NORMS = {torch.nn.functional.rms_norm, torch.rms_norm}


def _default_rms_eps(dtype: torch.dtype) -> float:
    """What ATen's rms_norm adds with ``eps=None``: the machine epsilon of the type it
    computes in (float32 for half inputs; the docs' ``finfo(x.dtype)`` is not what runs:
    bf16's eps would be 2**-7 instead of 2**-23)."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def run(ctx: GraphContext) -> None:
    changed = False
    autocast = autocast_stacks(ctx.graph)
    for node in ctx.graph.nodes:
        if _default_eps(node) and not autocast.get(node):
            x = tensor_value(node.args[0])
            if x is not None and x.dtype.is_floating_point:
                given = dict(zip(("input", "normalized_shape", "weight"), node.args))
                given.update(node.kwargs)
                node.args = (
                    given["input"], given["normalized_shape"], given.get("weight"),
                    _default_rms_eps(x.dtype),
                )  # fmt: skip
                node.kwargs = {}
                changed = True
        elif (args := _sdpa_without_batch(node)) is not None:
            _add_batch_dim(ctx.graph, node, args)
            changed = True
        elif node.op == "call_function" and node.target in _FUNCTION_ALIASES:
            node.target = _FUNCTION_ALIASES[node.target]
            changed = True
        elif node.op == "call_method" and node.target in _METHOD_ALIASES:
            node.target = _METHOD_ALIASES[node.target]
            changed = True
        elif node.op == "call_function" and node.target in _CAT_ALIASES:
            kwargs = dict(node.kwargs)
            if "axis" in kwargs:
                kwargs["dim"] = kwargs.pop("axis")
            node.target = torch.cat
            node.kwargs = kwargs
            changed = True
        elif (like := _cast_like(node)) is not None:
            other = tensor_value(like)
            kwargs = {k: v for k, v in node.kwargs.items() if k in ("non_blocking", "copy")}
            node.target = "to"
            node.args = (node.args[0], other.device, other.dtype)
            node.kwargs = kwargs
            changed = True
    if changed:
        graph_changed()


def _default_eps(node) -> bool:
    """An RMS norm call whose eps is left to its default (None): its input dtype's."""
    if node.op != "call_function" or node.target not in _RMS_NORMS or not node.args:
        return False
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    return eps is None


def _cast_like(node) -> torch.fx.Node | None:
    """The tensor whose dtype and device ``x.to(other)`` / ``x.type_as(other)`` takes."""
    if node.op != "call_method" or node.target not in ("to", "type_as") or len(node.args) != 2:
        return None
    other = node.args[1]
    if not isinstance(other, torch.fx.Node) or not isinstance(tensor_value(other), torch.Tensor):
        return None
    if set(node.kwargs) - {"non_blocking", "copy"} or not isinstance(
        tensor_value(node.args[0]), torch.Tensor
    ):
        return None
    return other


def _sdpa_without_batch(node) -> dict | None:
    """The arguments of an SDPA call on 3-D (H, T, D) q, k and v, its mask (if any) a
    tensor of at most 3 dims; else None."""
    if node.op != "call_function" or node.target not in SDPA:
        return None
    from .attention import sdpa_arguments

    args = sdpa_arguments(node)
    if args is None:
        return None
    values = [tensor_value(args[name]) for name in ("query", "key", "value")]
    if any(not isinstance(v, torch.Tensor) or v.dim() != 3 for v in values):
        return None
    mask = args["attn_mask"]
    if mask is None or (isinstance(tensor_value(mask), torch.Tensor) and tensor_value(mask).dim() <= 3):
        return args
    return None


def _add_batch_dim(graph: torch.fx.Graph, node, args: dict) -> None:
    """``sdpa(q, k, v, mask)`` -> ``sdpa(q[None], k[None], v[None], mask[None])[0]``."""
    made = []
    with graph.inserting_before(node):
        for name in ("query", "key", "value", "attn_mask"):
            if name == "attn_mask" and (args[name] is None or tensor_value(args[name]).dim() < 3):
                continue
            args[name] = graph.call_method("unsqueeze", (args[name], 0))
            made.append(args[name])
        call = graph.call_function(node.target, (), args)
        out = graph.call_method("squeeze", (call, 0))
    made += [call, out]
    propagate_fake(graph, made)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
