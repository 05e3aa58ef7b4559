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

Then V's two halves, ``cat((linear(x, W_now), pad(linear(x, W_prev))[:, :T]), -1)``,
project the same x, and become one matmul with ``cat((W_now, W_prev))`` split in two
(``_merge_with_sibling_projection``): x is read once forward and backward, and dx is one
matmul instead of two summed. The report's idiom then ends in ``_one_v_matmul``.

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

from .._inductor_compat import stable_topological_sort, statically_known_true
from .common import GraphContext

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


def run(ctx: GraphContext) -> int:
    """Move every qualifying shift past its linear; returns how many were moved."""
    graph = ctx.graph
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
            ctx.rejected(
                FUSION, "pad_slice_linear", node,
                "the linear has a bias: the padded rows would become the bias, not zero",
            )  # fmt: skip
            continue
        x, shift, stop = shifted
        sliced = node.args[0]
        with graph.inserting_before(node):
            projected = graph.call_function(node.target, (x, node.args[1], None))
            padded = graph.call_function(torch._C._nn.pad, (projected, (0, 0, shift, 0)))
            out = graph.call_function(operator.getitem, (padded, (slice(None), slice(None, stop))))
        projected.meta.update(node.meta)
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if not sliced.users:
            pad_node = sliced.args[0]
            graph.erase_node(sliced)
            if not pad_node.users:
                graph.erase_node(pad_node)
        merged = _merge_with_sibling_projection(graph, projected, out)
        idiom = f"pad_slice_linear_shift_{shift}" + ("_one_v_matmul" if merged else "")
        ctx.fused(FUSION, idiom)
        moved += 1
    if moved:
        from .fx_util import graph_changed

        graph_changed()
        stable_topological_sort(graph)  # the merged matmul sits after its first reader
    return moved


def _weight_shape(node: Any) -> tuple[int, int] | None:
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    if not all(isinstance(n, int) for n in val.shape):
        return None
    return tuple(val.shape)


def _merge_with_sibling_projection(
    graph: torch.fx.Graph, projected: torch.fx.Node, shifted: torch.fx.Node
) -> bool:
    """V's other half: ``cat((linear(x, W_now), shifted), -1)`` with ``shifted`` now
    ``pad(linear(x, W_prev))[:, :T]``. Both halves project the same x, so one matmul with
    ``cat((W_now, W_prev))`` computes both (each output column is the same dot product)
    and reads x once, forward and backward (one dx matmul, no sum of two). Merged only
    for exactly that: a bias-free linear of the same x, same weight width and dtype, and
    a ``cat`` on the last dim taking the sibling's and the shifted half."""
    x, w_prev = projected.args[0], projected.args[1]
    prev_shape = _weight_shape(w_prev)
    cats = [
        u
        for u in shifted.users
        if u.target is torch.cat
        and u.kwargs.get("dim", u.args[1] if len(u.args) > 1 else 0) in (-1, 2)
        and isinstance(u.args[0], (tuple, list))
    ]
    if prev_shape is None or len(cats) != 1:
        return False
    for sibling in x.users:
        if sibling is projected or sibling.target not in _LINEAR or sibling.kwargs:
            continue
        if len(sibling.args) not in (2, 3) or (len(sibling.args) == 3 and sibling.args[2]):
            continue
        if sibling.args[0] is not x or sibling not in cats[0].args[0]:
            continue
        w_now = sibling.args[1]
        now_shape = _weight_shape(w_now)
        if now_shape is None or now_shape[1] != prev_shape[1]:
            continue
        if _val(w_now).dtype != _val(w_prev).dtype:
            continue
        with graph.inserting_before(projected):
            weight = graph.call_function(torch.cat, ((w_now, w_prev),), {"dim": 0})
            both = graph.call_function(projected.target, (x, weight, None))
            now = graph.call_function(torch.narrow, (both, -1, 0, now_shape[0]))
            prev = graph.call_function(torch.narrow, (both, -1, now_shape[0], prev_shape[0]))
        now.meta.update(sibling.meta)
        prev.meta.update(projected.meta)
        sibling.replace_all_uses_with(now)
        projected.replace_all_uses_with(prev)
        graph.erase_node(sibling)
        graph.erase_node(projected)
        return True
    return False
