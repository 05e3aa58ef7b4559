"""Normal form: functions that are other names of one op, called by the name the
recognizers read.

``torch.concatenate`` and ``torch.concat`` (NumPy's and the array API's names, ``axis=``
for ``dim=``) are ``torch.cat``: a JAX port concatenating q and k before one
convolution spells it so.

``x.to(other)`` and ``x.type_as(other)`` read only ``other``'s dtype and device, which a
compiled graph knows (Dynamo guards on them): they become ``x.to(device, dtype)``, so a
causal mask cast to the scores' type (fairseq's ``mask.to(attn_weights)``) stays a
constant rather than a value computed from the scores.

The rewrites change how a call is spelled, never what it computes, so they stay whether
or not anything fuses.
"""

from __future__ import annotations

import torch

from .common import GraphContext
from .fx_util import graph_changed, tensor_value

_CAT_ALIASES = {torch.concatenate, torch.concat}


def run(ctx: GraphContext) -> None:
    changed = False
    for node in ctx.graph.nodes:
        if node.op == "call_function" and node.target in _CAT_ALIASES:
            kwargs = dict(node.kwargs)
            if "axis" in kwargs:
                kwargs["dim"] = kwargs.pop("axis")
            node.target = torch.cat
            node.kwargs = kwargs
            changed = True
        elif _cast_like(node) is not None:
            other = tensor_value(_cast_like(node))
            kwargs = {k: v for k, v in node.kwargs.items() if k in ("non_blocking", "copy")}
            node.target = "to"
            node.args = (node.args[0], other.device, other.dtype)
            node.kwargs = kwargs
            changed = True
    if changed:
        graph_changed()


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
