"""The CCGQA value shift, moved from the block's input onto the projected V half.

CCGQA builds half of V from the previous token: ``x_prev = F.pad(x, (0, 0, s, 0))[:, :T]``
then ``v_prev = linear(x_prev, W)`` (../shared/design/ccgqa.md). Compiled as written, the
shift copies the whole (B, T, E) input and its backward adds a padded, sliced (B, T, E)
gradient: on the H100 0.28 ms of a 3.2 ms E2048 block fwd+bwd and 0.09 of 0.99 ms at E512
(``scripts/bench_value_shift.py``, docs/benchmarks). A linear map without bias sends the
zero rows of the padding to zero rows, so

    linear(pad(x, (0, 0, s, 0))[:, :T], W) == pad(linear(x, W), (0, 0, s, 0))[:, :T]

and the rewritten graph shifts the (B, T, E_kv / 2) projection instead; Inductor fuses
that shift into the copy that concatenates V, and the backward needs no padded input
gradient. Measured: the shift's kernels 0.306 -> 0.018 ms, the E2048 block 3.22 -> 3.12 ms
(what remains of the gap to a block without shift is V's two half-width projections). This is our form of "folding the shift into the V load": the attention kernel
still reads one V tensor, which Inductor builds already shifted.

A ``linear`` is rewritten when and only when the identity holds:
- no bias (with one, the padded rows would become the bias, not zero);
- its input is ``pad(x, (0, 0, s, 0))`` (constant mode, value 0 or default, s >= 1: a shift
  along dim -2 only) sliced ``[:, :T]`` (or ``[:, 0:T]``) with T = x.shape[1], x 3-D;
Anything else (a shift on another dim, a right pad, a slice keeping other rows, a bias)
is left as written. Runs as part of the pre-grad pass, on Dynamo's torch-level graph.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from .._inductor_compat import statically_known_true
from .sdpa_attention import record_pre_grad_event

FUSION = "value_shift"

_LINEAR = (torch._C._nn.linear, F.linear)
_PAD = (torch._C._nn.pad, F.pad)


def _val(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def _is_full_slice(s: Any) -> bool:
    return isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1)


def _shifted_input(node: Any) -> tuple[torch.fx.Node, int, Any] | None:
    """(x, s, T) when ``node`` is ``pad(x, (0, 0, s, 0))[:, :T]`` with T = x.shape[1]."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"):
        return None
    if node.target is not operator.getitem or len(node.args) != 2:
        return None
    padded, index = node.args
    if not (isinstance(index, tuple) and len(index) == 2 and _is_full_slice(index[0])):
        return None
    rows = index[1]
    if not (isinstance(rows, slice) and rows.start in (None, 0) and rows.step in (None, 1)):
        return None
    if not (isinstance(padded, torch.fx.Node) and padded.target in _PAD and not padded.kwargs):
        return None
    x, pads, *rest = padded.args
    mode = rest[0] if rest else "constant"
    value = rest[1] if len(rest) > 1 else None
    if mode != "constant" or value not in (None, 0, 0.0):
        return None
    if not (isinstance(pads, (tuple, list)) and len(pads) == 4):
        return None
    if tuple(pads[:2]) != (0, 0) or pads[3] != 0 or not isinstance(pads[2], int) or pads[2] < 1:
        return None
    x_val = _val(x)
    if not isinstance(x_val, torch.Tensor) or x_val.dim() != 3:
        return None
    stop = _val(rows.stop)
    if stop is None or not statically_known_true(stop == x_val.shape[1]):
        return None
    return x, pads[2], rows.stop


def rewrite_value_shift(graph: torch.fx.Graph) -> int:
    """Move every qualifying shift past its linear; returns how many were moved."""
    moved = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR or node.kwargs:
            continue
        if len(node.args) not in (2, 3):
            continue
        bias = node.args[2] if len(node.args) == 3 else None
        shifted = _shifted_input(node.args[0])
        if shifted is None:
            continue
        if bias is not None:
            record_pre_grad_event(
                "rejected", FUSION, "pad_slice_linear", node.name,
                "the linear has a bias: the padded rows would become the bias, not zero",
            )  # fmt: skip
            continue
        x, shift, stop = shifted
        sliced = node.args[0]
        with graph.inserting_before(node):
            projected = graph.call_function(node.target, (x, node.args[1], None))
            padded = graph.call_function(torch._C._nn.pad, (projected, (0, 0, shift, 0)))
            out = graph.call_function(operator.getitem, (padded, (slice(None), slice(None, stop))))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if not sliced.users:
            pad_node = sliced.args[0]
            graph.erase_node(sliced)
            if not pad_node.users:
                graph.erase_node(pad_node)
        record_pre_grad_event("fused", FUSION, f"pad_slice_linear_shift_{shift}")
        moved += 1
    return moved
