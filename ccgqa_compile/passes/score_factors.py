"""Normal form: a run-time factor on attention scores moved onto the query operand.

``(q @ k^T) * t`` with ``t`` the same for every key of a row (a learned per-head
temperature ``t.view(1, H, 1, 1)``, a 0-d logit scale, a float ``dynamic=True`` lifted to a
run-time scalar) is ``(q * t) @ k^T``: the attention
recognizer then sees q * t as the query, and a CCGQA prologue ending there may take the
factor as its temperature (``prologue.Plan.scores_only``). Only a factor that multiplies
or divides the product itself (through constant scalings, which commute with it) is moved,
only where its dtype is the scores', and only on products that reach a softmax.

A rewrite no fusion consumed is undone (``undo_unused``): the graph a user gets back is
the one they wrote wherever nothing fused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from .common import GraphContext
from .fx_util import (
    ancestors,
    depends_on_tensor_input,
    einsum_pair,
    is_exp,
    is_function,
    is_method,
    is_product,
    is_runtime_scalar,
    is_softmax,
    tensor_value,
)
from .region import propagate_fake, stable_sort

# marks the query operand times a moved factor: not a softmax written out, however near an
# exponential (a temperature exp'd from its log) it is
SCALED_QUERY = "ccgqa_scaled_query"
_MULS = (operator.mul, torch.mul)
_DIVS = (operator.truediv, torch.div)


@dataclass
class Moved:
    product: Node
    operand: Node  # the product's query operand as written
    scaled: list[Node]  # the nodes computing the operand times the factor
    scores: Node  # what the removed scaling read (the product, or it scaled by constants)
    removed: tuple  # the removed node's (op, target, args, kwargs, meta), to put back


def _reaches_softmax(node: Node, hops: int = 8) -> bool:
    """A softmax (or the exponential of one written out) within a few ops of the scores:
    a walk of the users, not of everything after them (a product early in a deep model
    has the whole model after it)."""
    frontier, seen = [node], {node}
    for _ in range(hops):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
        if any(is_softmax(n) or is_exp(n) for n in frontier):
            return True
    return False


def scaling(node: Node, scores: Node) -> tuple[str, Node | float] | None:
    """("mul" | "div", the other operand) where ``node`` multiplies or divides ``scores``
    (divides: scores on the left) by one thing, else None."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if is_function(node, *_MULS) or is_method(node, "mul", "__mul__"):
        other = b if a is scores else a if b is scores else None
        return None if other is None else ("mul", other)
    if (is_function(node, *_DIVS) or is_method(node, "div", "__truediv__")) and a is scores:
        return ("div", b)
    return None


def _row_constant_factor(scores: Node, factor: Node) -> bool:
    """A tensor, not computed from the scores, the same along the key axis (its last dim
    1, or a 0-d tensor), of the scores' dtype; or a 0-d float tensor of another (a logit
    scale buffer left bf16 by ``model.to(bf16)`` on fp32 scores): type promotion lets a
    0-d tensor keep the other operand's dtype, so scores and query multiply by it in the
    same dtype."""
    if is_runtime_scalar(factor):  # the same for every score
        return scores not in ancestors([factor])
    fv, sv = tensor_value(factor), tensor_value(scores)
    if fv is None or sv is None or fv.dim() > sv.dim() or not _multiplies_in_dtype(sv, fv):
        return False
    if fv.dim() > 0 and fv.shape[-1] != 1:
        return False
    return scores not in ancestors([factor]) and depends_on_tensor_input(factor)


def _multiplies_in_dtype(x, factor) -> bool:
    """x times ``factor`` is computed in x's dtype: the same dtype, or a 0-d float factor."""
    if factor.dtype == x.dtype:
        return True
    return factor.dim() == 0 and factor.dtype.is_floating_point and x.dtype.is_floating_point


def _factor_shape_for_operand(product: Node, factor: Node) -> list[int] | None:
    """The shape that lays the factor (right-aligned to the product's output) out along
    the query operand's axes, or None where it has a size on an axis the operand lacks."""
    if is_runtime_scalar(factor):
        return []  # a scalar: no layout
    fv = tensor_value(factor)
    if not is_function(product, torch.einsum):
        return list(fv.shape)  # (..., rows, 1) broadcasts on (..., rows, D) as it is
    letters = einsum_pair(product)
    if letters is None:
        return None
    op_letters, _, out_letters = letters
    sized = {}
    for axis, size in enumerate(fv.shape):
        letter = out_letters[len(out_letters) - fv.dim() + axis]
        if size != 1:
            sized[letter] = size
    if any(letter not in op_letters for letter in sized):
        return None
    order = [c for c in out_letters if c in sized]
    if order != [c for c in op_letters if c in sized]:
        return None  # a permuted layout: not a reshape
    return [sized.get(c, 1) for c in op_letters]


def _query_operand(product: Node) -> tuple[Node, int] | None:
    if is_function(product, torch.einsum):
        if einsum_pair(product) is None:
            return None
        return product.args[1], 1
    return product.args[0], 0


def _move(product: Node, scaling: Node, scores: Node, kind: str, factor: Node) -> Moved | None:
    found = _query_operand(product)
    shape = _factor_shape_for_operand(product, factor)
    if found is None or shape is None:
        return None
    operand, index = found
    ov = tensor_value(operand)
    scalar = is_runtime_scalar(factor)
    if ov is None or ov.dim() < 2 or not (scalar or _multiplies_in_dtype(ov, tensor_value(factor))):
        return None
    graph = product.graph
    new = []
    with graph.inserting_before(product):
        laid = factor
        if not scalar and shape != list(tensor_value(factor).shape):
            laid = graph.call_method("reshape", (factor, tuple(shape)))
            new.append(laid)
        target = operator.mul if kind == "mul" else operator.truediv
        new.append(graph.call_function(target, (operand, laid)))
    new[-1].meta[SCALED_QUERY] = True
    removed = (scaling.op, scaling.target, scaling.args, dict(scaling.kwargs), dict(scaling.meta))
    scaling.replace_all_uses_with(scores)
    graph.erase_node(scaling)
    product.update_arg(index, new[-1])
    stable_sort(graph)  # the factor may be computed after the product
    propagate_fake(graph, new)
    return Moved(product, operand, new, scores, removed)


def run(ctx: GraphContext) -> list[Moved]:
    """Move every such factor; returns what ``undo_unused`` may put back."""
    moved: list[Moved] = []
    for product in [n for n in ctx.graph.nodes if is_product(n)]:
        if not _reaches_softmax(product):
            continue
        scores = product
        for _ in range(8):
            if len(scores.users) != 1:
                break
            (user,) = scores.users
            found = scaling(user, scores)
            if found is None:
                break
            kind, other = found
            if isinstance(other, (int, float)) and not isinstance(other, bool):
                scores = user  # a constant scaling commutes with the factor
                continue
            if not isinstance(other, Node) or not _row_constant_factor(product, other):
                break
            done = _move(product, user, scores, kind, other)
            if done is None:
                break
            moved.append(done)
    return moved


def undo_unused(ctx: GraphContext, moved: list[Moved]) -> None:
    """Put back each factor whose product still reads the scaled operand: no attention or
    prologue fusion took them."""
    graph = ctx.graph
    for m in reversed(moved):
        scaled = m.scaled[-1]
        if not (ctx.alive(m.product) and ctx.alive(scaled) and scaled in m.product.args):
            continue
        op, target, args, kwargs, meta = m.removed
        with graph.inserting_after(m.scores):
            back = graph.create_node(op, target, args, kwargs)
        back.meta.update(meta)
        m.scores.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)
        m.product.replace_input_with(scaled, m.operand)
        for node in reversed(m.scaled):
            if not node.users:
                graph.erase_node(node)
    if moved:
        stable_sort(graph)
