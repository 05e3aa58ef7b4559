"""RMSNorm, recognised by what it computes: y = x / sqrt(mean(x^2, -1) + eps) * w.

Anchors: a mean or sum of a square over a dim (``x.pow(2).mean(-1)``, ``torch.mean(x * x)``,
``x.square().sum(-1)``), or written as a contraction (``einsum("...d,...d->...", x, x)``,
the square times a vector, ``x.pow(2) @ ones / d``), a variance (``var(x) + mean(x)**2``
is the mean square), a norm over a dim (``x.norm(dim=-1)``, ``vector_norm``), and
``F.rms_norm`` itself. From the squared tensor x the region grows forward through
elementwise ops, casts and reductions whose other inputs do not depend on x (weights,
constants); every node of x's shape in it is a candidate output, the widest first. The
weight is the product of the region's per-channel inputs (``w``, ``1 + w``, a scalar
gain), eps is read off the probes and matched to the region's literals, and the candidate
``torch.ops.ccgqa.rms_norm(x, w, eps)`` must agree with the region in float64 at inputs of
scale 1, 1e3 and around sqrt(eps), where eps inside or outside the sqrt differ.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Node

from .common import GraphContext, float_literals, forward_closure, is_elementwise, snap
from .evaluate import Evaluator, NotEvaluable, real_tensors
from .fx_util import (
    ancestors,
    arg,
    depends_on_tensor_input,
    is_add,
    is_cast,
    is_function,
    is_method,
    same_shape,
    strip_casts,
    tensor_value,
    value,
)
from .region import Region, Rejected, emit, verify

FUSION = "rms_norm"

_REDUCE_METHODS = {"mean", "sum"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum}
_NORM_FUNCTIONS = {torch.norm, torch.linalg.vector_norm, torch.linalg.norm}


def _squared(node: Node) -> Node | None:
    """x for x*x, x.pow(2), x.square(), x**2 (through casts); None otherwise."""
    node = strip_casts(node)
    if is_method(node, "square") or is_function(node, torch.square):
        return node.args[0]
    if is_method(node, "pow") or is_function(node, torch.pow, operator.pow):
        base = node.args[0]
        if isinstance(base, Node):  # any exponent: the probes reject all but 2
            return base
    if is_function(node, operator.mul, torch.mul) or is_method(node, "mul"):
        a, b = node.args[0], node.args[1]
        if isinstance(a, Node) and isinstance(b, Node) and strip_casts(a) is strip_casts(b):
            return a if a is b else strip_casts(a)
    return None


def _squared_plus_constant(node: Node) -> Node | None:
    """x for ``x*x + c`` (eps inside the mean: the mean of it is mean(x^2) + c)."""
    if not is_add(node):
        return None
    a, b = node.args[0], node.args[1]
    for square, other in ((a, b), (b, a)):
        if isinstance(square, Node) and isinstance(other, (int, float)):
            return _squared(square)
    return None


def _cast_chain(node: Node) -> list[Node]:
    """The tensor a norm reads and the ones it is a cast of, furthest first: the norm may
    start before its casts (it reads the model's dtype once) or, when a cast is also read
    elsewhere (a residual kept in fp32), right after it."""
    chain = [node]
    while is_cast(chain[-1]) and chain[-1].target != "type_as" and isinstance(
        chain[-1].args[0], Node
    ):
        chain.append(chain[-1].args[0])
    return list(reversed(chain))


def _reduced_dim(node: Node) -> object:
    dim = arg(node, 1, "dim")
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return dim


def anchors(graph: torch.fx.Graph) -> list[tuple[Node, Node]]:
    """(anchor, x): reductions of a square, norms, ``F.rms_norm`` calls."""
    found = []
    for node in graph.nodes:
        x = None
        if is_method(node, *_REDUCE_METHODS) or is_function(node, *_REDUCE_FUNCTIONS):
            if isinstance(node.args[0], Node) and _reduced_dim(node) is not None:
                x = _squared(node.args[0]) or _squared_plus_constant(node.args[0])
        elif is_method(node, "norm") or is_function(node, *_NORM_FUNCTIONS):
            if arg(node, 2, "dim") is not None:
                x = node.args[0]
        elif is_function(node, torch.rms_norm, torch.nn.functional.rms_norm):
            x = node.args[0]
        elif _self_contraction(node):
            x = strip_casts(node.args[1])
        elif _square_times_vector(node):
            x = _squared(node.args[0])
        elif is_method(node, "var") or is_function(node, torch.var):
            x = node.args[0]  # var(x) + mean(x)^2; the probes decide what it is
        elif is_function(node, torch.nn.functional.normalize) and _normalises_last_dim(node):
            x = node.args[0]  # x / max(|x|, eps): times sqrt(N), an RMS clamped from below
        if isinstance(x, Node) and tensor_value(x) is not None:
            found.append((node, _cast_chain(x)))
    return found


def _self_contraction(node: Node) -> bool:
    """``einsum(spec, x, x)`` dropping one of x's dims: a sum of squares (or of products of
    other pairs of x's elements: the probes tell)."""
    if not is_function(node, torch.einsum) or len(node.args) != 3:
        return False
    a, b = node.args[1], node.args[2]
    if not isinstance(a, Node) or strip_casts(a) is not strip_casts(b):
        return False
    xv, ov = tensor_value(a), tensor_value(node)
    return xv is not None and ov is not None and ov.dim() == xv.dim() - 1


def _square_times_vector(node: Node) -> bool:
    """``x.pow(2) @ v`` with v (D,) or (D, 1), not computed from x (ones / D: a mean)."""
    if not (is_function(node, torch.matmul, operator.matmul) or is_method(node, "matmul")):
        return False
    sq, vec = node.args[0], node.args[1]
    if not isinstance(sq, Node) or _squared(sq) is None or not isinstance(vec, Node):
        return False
    xv, vv = tensor_value(sq), tensor_value(vec)
    if xv is None or vv is None or vv.dim() not in (1, 2) or (vv.dim() == 2 and vv.shape[1] != 1):
        return False
    return same_shape((vv.shape[0],), (xv.shape[-1],)) and _squared(sq) not in ancestors([vec])


def _normalises_last_dim(node: Node) -> bool:
    """``F.normalize(x, p=2, dim=-1)`` (its default dim is 1)."""
    x = tensor_value(node.args[0]) if node.args else None
    dim, p = arg(node, 2, "dim", 1), arg(node, 1, "p", 2.0)
    return x is not None and p == 2 and isinstance(dim, int) and dim % x.dim() == x.dim() - 1


def _allowed(node: Node) -> bool:
    return (
        is_elementwise(node)
        or is_cast(node)
        or (is_function(node, torch.nn.functional.normalize) and _normalises_last_dim(node))
        or is_method(node, *_REDUCE_METHODS, "norm", "expand_as", "expand", "unsqueeze")
        or is_function(node, torch.unsqueeze)
        or _adds_unit_dim(node)
        or is_function(node, *_REDUCE_FUNCTIONS, *_NORM_FUNCTIONS)
        or is_function(node, torch.rms_norm, torch.nn.functional.rms_norm)
        or _self_contraction(node)
        or _square_times_vector(node)
        or is_method(node, "var")
        or is_function(node, torch.var)
    )


def _adds_unit_dim(node: Node) -> bool:
    """``r[..., None]``: a reduction without keepdim, its dim put back."""
    if not is_function(node, operator.getitem) or not isinstance(node.args[1], tuple):
        return False
    index = node.args[1]
    return None in index and all(i is None or i is Ellipsis or i == slice(None) for i in index)


def _per_channel(node: Node, width) -> bool:
    v = tensor_value(node)
    if v is None:
        return False
    dims = tuple(v.shape)
    if not dims:
        return True
    return all(s == 1 for s in dims[:-1]) and (dims[-1] == 1 or same_shape((dims[-1],), (width,)))


def _candidate(n_weights: int, eps: float, width, runtime_eps: bool = False, clamp: bool = False):
    """With ``runtime_eps``, the last input is a float known when the program runs (a
    SymFloat): the op adds it to eps as a one-value tensor on x's device, made by adding
    the float to a zero: AOTAutograd turns that add (and no other use of a lifted float)
    back into tensor math; else Dynamo recompiles with the float fixed."""

    def rms(x, *inputs, out_dtypes):
        weights, eps_tensor = inputs, None
        if runtime_eps:
            *weights, eps_scalar = inputs
            eps_tensor = x.new_zeros((), dtype=torch.float64) + eps_scalar
        weight = None
        for w in weights:
            w = w.reshape(-1)
            weight = w if weight is None else weight * w
        if weight is not None and n_weights:
            weight = weight.expand(width) if isinstance(width, int) else weight
        out_dtype = out_dtypes[0] or torch.float64
        return (torch.ops.ccgqa.rms_norm(x, weight, eps, 0.0, out_dtype, eps_tensor, clamp)[0],)

    return rms


def _estimate_eps(
    region: Region, x: Node, weights: list[Node], sizes, given: dict[Node, float] | None = None
) -> float:
    """eps from one probe: with unit weights, (x / y)^2 - mean(x^2) per row."""
    with real_tensors():
        feeds = region.feeds(sizes, seed=11, given=given)
        for w in weights:
            feeds[w] = torch.ones_like(feeds[w])
        (y,) = Evaluator(region.graph, sizes).run(region.sinks, feeds)
        xv = feeds[x]
        ms = xv.pow(2).mean(-1, keepdim=True)
        ratio = (xv / y).pow(2) - ms
        est = ratio[torch.isfinite(ratio)]
        return float(est.median()) if est.numel() else float("nan")


# run-time eps values the candidate must agree at (each with rows around its sqrt too)
_PROBE_EPS = (1e-6, 1e-5, 0.25)


def _try_runtime_eps(ctx: GraphContext, region: Region, x: Node, weights: list[Node], leaf: Node):
    """RMSNorm whose eps is the run-time scalar ``leaf``: the probes draw eps as well."""
    try:
        est = _estimate_eps(region, x, weights, ctx.sizes[0], given={leaf: _PROBE_EPS[1]})
    except NotEvaluable as why:
        return f"cannot be evaluated: {why}"
    if not math.isclose(est, _PROBE_EPS[1], rel_tol=1e-3):
        return f"the run-time scalar {leaf.name} is not the norm's eps"
    candidate = _candidate(len(weights), 0.0, tensor_value(x).shape[-1], runtime_eps=True)
    trials = []
    for i, eps in enumerate(_PROBE_EPS):
        trials.append({"seed": 1 + i, "given": {leaf: eps}})
        trials.append({"seed": 5 + i, "given": {leaf: eps}, "scale": {x: math.sqrt(eps)}})
    trials.append({"seed": 9, "given": {leaf: _PROBE_EPS[0]}, "scale": {x: 1e3}})
    reason = verify(region, candidate, [x, *weights, leaf], ctx.sizes, trials)
    if reason is not None:
        return reason
    return ("weighted" if weights else "unweighted", [x, *weights, leaf], 0.0, True, False)


def try_sink(ctx: GraphContext, x: Node, sink: Node) -> tuple[str, list[Node], float, bool, bool] | str:
    """(idiom, op inputs, eps, whether eps is the last input, a float known only when the
    program runs, whether the norm is clamped from below by eps) when ``sink`` is an
    RMSNorm of ``x``, else the reason."""
    try:
        region = Region.between([x], [sink])
    except Rejected as why:
        return str(why)
    if region.escapes():
        return f"{region.escapes()[0].name} is also read outside the norm"
    width = tensor_value(x).shape[-1]
    # a constant built from sizes that is not per-channel (a (D, 1) column of 1/D taking
    # the mean by a matmul) stays in the region: the probes compute it
    weights = [
        n for n in region.float_leaves()
        if n is not x and (depends_on_tensor_input(n) or _per_channel(n, width))
    ]  # fmt: skip
    for w in weights:
        if not _per_channel(w, width):
            return f"{w.name} {tuple(tensor_value(w).shape)} is not a per-channel weight"
    scalars = region.runtime_scalars()
    if len(scalars) > 1:
        return f"{len(scalars)} run-time scalars ({scalars[0].name}, ...): at most one eps is known"
    if scalars:
        return _try_runtime_eps(ctx, region, x, weights, scalars[0])
    try:
        eps = _estimate_eps(region, x, weights, ctx.sizes[0])
    except NotEvaluable as why:
        return f"cannot be evaluated: {why}"
    if not math.isfinite(eps) or eps < -1e-12:
        return "not an RMS normalisation (no eps fits the probes)"
    eps = snap(max(eps, 0.0), float_literals(region.nodes))
    # an estimate at float64 rounding from unit-scale probes may be a norm without eps
    choices = [eps, 0.0] if 0.0 < eps < 1e-9 else [eps]
    reason = "no eps fits"
    for eps in choices:
        candidate = _candidate(len(weights), eps, width)
        small = math.sqrt(eps) if eps > 0 else 1e-6
        trials = [
            {"seed": 1},
            {"seed": 2, "scale": {x: 1e3}},
            {"seed": 3, "scale": {x: small}},
            {"seed": 4, "scale": {x: small * 1e-2}},
            # rows of zeros (padding): 0 / 0 is NaN where the code clamps the norm to 0
            {"seed": 10, "zero_rows": [x]},
        ]
        reason = verify(region, candidate, [x, *weights], ctx.sizes, trials)
        if reason is None:
            return ("weighted" if weights else "unweighted", [x, *weights], eps, False, False)
    clamped = _try_clamped(ctx, region, x, weights, width)
    return clamped if clamped is not None else reason


def _try_clamped(ctx: GraphContext, region: Region, x: Node, weights: list[Node], width):
    """The norm clamped from below instead of eps under the root (``F.normalize(x) *
    sqrt(N)``, ``x / x.norm(...).clamp_min(eps)``): the bound on the rms is a literal over
    sqrt(N) (a bound on the norm), the literal itself or its root (on the mean square);
    proven where the clamp binds and on rows of zeros. None where no bound fits."""
    if not isinstance(width, int):
        return None
    literals = sorted(lit for lit in float_literals(region.nodes) if 0 < lit < 1e-2) + [1e-12]
    bounds = dict.fromkeys(b for lit in literals for b in (lit / math.sqrt(width), lit, math.sqrt(lit)))
    for bound in bounds:
        trials = [
            {"seed": 1},
            {"seed": 2, "scale": {x: 1e3}},
            {"seed": 3, "scale": {x: bound * 0.1}},  # rms below the bound: the clamp binds
            {"seed": 4, "scale": {x: bound * 3.0}},
            {"seed": 10, "zero_rows": [x]},
        ]
        candidate = _candidate(len(weights), bound, width, clamp=True)
        if verify(region, candidate, [x, *weights], ctx.sizes, trials) is None:
            return ("weighted_clamped" if weights else "unweighted_clamped", [x, *weights], bound, False, True)
    return None


def _fuse_from(ctx: GraphContext, x: Node) -> tuple[bool, str, str | None]:
    """Fuse the widest RMSNorm of ``x`` there is: (fused, last reason, widest reason)."""
    xv = tensor_value(x)
    sinks = [
        n
        for n in forward_closure(x, _allowed)
        if tensor_value(n) is not None and same_shape(tuple(value(n).shape), tuple(xv.shape))
    ]
    last_reason = "no output of x's shape follows the reduction"
    widest_reason = None
    for sink in reversed(sinks):
        found = try_sink(ctx, x, sink)
        if isinstance(found, str):
            last_reason = found
            widest_reason = widest_reason or f"{sink.name}: {found}"
            continue
        idiom, inputs, eps, runtime_eps, clamp = found
        n_weights = len(inputs) - 1 - runtime_eps
        region = Region.between([x], [sink])
        try:
            emit(region, _candidate(n_weights, eps, xv.shape[-1], runtime_eps, clamp), inputs)
        except Rejected as why:
            last_reason = str(why)
            continue
        ctx.fused(FUSION, idiom)
        note = f"fused up to {sink.name}, not beyond: {widest_reason}" if widest_reason else None
        return True, last_reason, note
    return False, last_reason, None


def run(ctx: GraphContext) -> None:
    for anchor, sources in anchors(ctx.graph):
        # again while this anchor stands: the norm fused from x may have been another norm
        # of the same x (a parallel block's two norms), not this one
        while ctx.alive(anchor):
            reason = "no source tensor"
            for x in sources:
                if not ctx.alive(x) or not tensor_value(x).dtype.is_floating_point:
                    continue
                fused, reason, note = _fuse_from(ctx, x)
                if fused:
                    if note:
                        ctx.rejected(FUSION, "rms", anchor, note)
                    break
            else:
                ctx.rejected(FUSION, "rms", anchor, reason)
                break
