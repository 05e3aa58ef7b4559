"""Normal form: functions that are other names of one op, called by the name the
recognizers read.

``torch.concatenate`` and ``torch.concat`` (NumPy's and the array API's names, ``axis=``
for ``dim=``) are ``torch.cat``: a JAX port concatenating q and k before one
convolution spells it so. The rewrite changes the name of the call, never what it
computes, so it stays whether or not anything fuses.
"""

from __future__ import annotations

import torch

from .common import GraphContext
from .fx_util import graph_changed

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
    if changed:
        graph_changed()
