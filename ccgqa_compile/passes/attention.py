"""Causal grouped-query attention, recognised by what it computes:
o = softmax(scale * q k^T + causal mask) v, query head h reading kv head h // (Hq / Hkv).

Two kinds of sites:

- ``F.scaled_dot_product_attention``: one call whose arguments say what it computes. It is
  taken when it is causal (``is_causal=True``, or a mask that is causal: evaluated when it
  is built from sizes alone, checked at run time by ``gqa_attention_masked`` when it is
  built from a user input such as HF's padding mask), without dropout, with equal query
  and key lengths. K and V repeated for GQA by any spelling (``repeat_kv``,
  ``repeat_interleave``, einops) are traced back to the un-repeated tensors, which are
  proven on probes to be what the repeat spreads over the query heads.
- hand-written: a ``softmax`` over the last dim whose input is a chain of element-wise
  ops (scale, mask, casts) on a product of two tensors (``matmul``, ``@``, ``bmm``,
  ``einsum``), and whose output weights a third in another product. The q, k and v the op
  takes are looked for on the three operand paths (layouts, GQA repeats, casts), the scale
  is read off the probes, and the candidate must agree with the region on every query
  row, evaluated in blocks of rows so the T x T scores never exist whole.

Every site found (fused or kept on SDPA by policy) is returned: a CCGQA prologue ends at
its q and k.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

from .. import config
from .common import GraphContext, float_literals, is_elementwise, is_training_graph, snap
from .evaluate import Evaluator, NotEvaluable, Probes, agree, concrete, real_tensors
from .fx_util import (
    CONV1D,
    SDPA,
    SOFTMAXES,
    ancestors,
    arg,
    autocast_stacks,
    call_name,
    depends_on_tensor_input,
    einsum_letters,
    is_basic_index,
    is_cast,
    is_exp,
    is_function,
    is_layout,
    is_method,
    is_mutating,
    is_product,
    is_softmax,
    node_inputs,
    requires_grad,
    runtime_inputs_of,
    same_shape,
    same_size,
    storage_base,
    tensor_value,
    topo_order,
    value,
)
from .region import (
    Region,
    Rejected,
    emit,
    erase_unused,
    propagate_fake,
    reads_dtype_only,
    stable_sort,
    verify,
)
from .score_factors import SCALED_QUERY, scaling

FUSION = "gqa_attention"
DECODE_FUSION = "gqa_decode_attention"


@dataclass
class Site:
    """An attention a CCGQA prologue may end at: q, k, v as (B, H, T, D) nodes, k and v not
    repeated. ``causal``: the attention is causal GQA (fused, or kept on SDPA by policy);
    a whole CCGQA block is counted only then. ``core``: whose kernels run it, ours
    ("ccgqa") or SDPA's ("sdpa": an SDPA call kept by policy, or hand-written attention
    fused onto SDPA by ``config.HANDWRITTEN_ATTENTION_CORE``)."""

    kind: str
    q: Node
    k: Node
    v: Node
    fused: bool
    anchor: Node
    causal: bool = True
    prologue: bool = False
    core: str = "ccgqa"


# ---------------------------------------------------------------------------------------
# GQA repeats and layouts on an operand's path
# ---------------------------------------------------------------------------------------

_EMPTY = object()


def _path_step(node: Node) -> Node | None:
    """The tensor a single-input view/copy/cast/repeat reads, or a constant factor
    multiplies, or None."""
    if is_layout(node) or is_cast(node) or is_basic_index(node):
        src = node.args[0]
        return src if isinstance(src, Node) else None
    scaled = _scaled_by_number(node)
    if scaled is not None:
        return scaled
    if is_function(node, torch.cat):
        # HF's DynamicCache: cat([empty, k]) is k
        parts = [p for p in node.args[0] if isinstance(p, Node)]
        live = [p for p in parts if not _is_empty_constant(p)]
        if len(live) == 1 and len(parts) == len(node.args[0]):
            return live[0]
    if node.op == "call_function" and "einops" in getattr(node.target, "__module__", ""):
        src = node.args[0]
        return src if isinstance(src, Node) else None
    return None


def _scaled_by_number(node: Node) -> Node | None:
    """x for ``x * c``, ``c * x`` or ``x / c`` with c a Python number (fairseq scales q by
    1/sqrt(d) before the product, after viewing the heads (B*H, T, D)). Stepping over it
    is safe: the scale is inferred on probes from the whole region between the operands
    found and the output, so the factor is part of it, and an operand it does not belong
    to (v) fails verification."""
    for x in node.args[:2]:
        found = scaling(node, x) if isinstance(x, Node) else None
        if found is None:
            continue
        c = found[1]
        if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0:
            return x
    return None


def _is_empty_constant(node: Node) -> bool:
    v = tensor_value(node)
    return v is not None and v.numel() == 0 and not depends_on_tensor_input(node)


def path_nodes(node: Node, limit: int = 16) -> list[Node]:
    """``node`` and the tensors it is a view/copy/cast/repeat of, nearest first."""
    out = [node]
    for _ in range(limit):
        src = _path_step(out[-1])
        if src is None:
            break
        out.append(src)
    return out


def _heads_layouts(node: Node, b, t, d) -> list[tuple[str, int]]:
    """How a 4-D node is (B, H, T, D): ("bhtd", H), ("bthd", H) or, tokens first
    (Megatron's (T, B, H, D)), ("tbhd", H); how a 5-D one holds the query heads grouped by
    kv head, (B, T, Hkv, G, D) ("bthgd") or (B, Hkv, G, T, D) ("bhgtd"), query head
    h = j * G + g reading kv head j (code that keeps q grouped to skip repeating K/V)."""
    v = tensor_value(node)
    if v is None or v.dim() not in (4, 5) or not v.dtype.is_floating_point:
        return []
    s = tuple(v.shape)
    out = []
    if v.dim() == 5:
        if not (same_size(s[0], b) and same_size(s[4], d)):
            return []
        if same_size(s[1], t) and isinstance(s[2], int) and isinstance(s[3], int):
            out.append(("bthgd", s[2] * s[3]))
        if same_size(s[3], t) and isinstance(s[1], int) and isinstance(s[2], int):
            out.append(("bhgtd", s[1] * s[2]))
        return out
    if same_size(s[0], b) and same_size(s[2], t) and same_size(s[3], d) and isinstance(s[1], int):
        out.append(("bhtd", s[1]))
    if same_size(s[0], b) and same_size(s[1], t) and same_size(s[3], d) and isinstance(s[2], int):
        out.append(("bthd", s[2]))
    if same_size(s[0], t) and same_size(s[1], b) and same_size(s[3], d) and isinstance(s[2], int):
        out.append(("tbhd", s[2]))
    return out


def _to_bhtd(x, layout: str):
    if layout == "tbhd":
        return x.permute(1, 2, 0, 3)
    if layout == "bthgd":
        return x.flatten(2, 3).transpose(1, 2)
    if layout == "bhgtd":
        return x.flatten(1, 2)
    return x if layout == "bhtd" else x.transpose(1, 2)


def unrepeated(ctx: GraphContext, node: Node, groups: int) -> Node | None:
    """The (B, H / groups, T, D) tensor whose heads ``node`` repeats ``groups`` times each
    (``repeat_interleave`` on the head dim), proven on probes; ``node`` itself when
    ``groups`` is 1."""
    if groups == 1:
        return node
    v = tensor_value(node)
    b, h, t, d = v.shape
    for cand in path_nodes(node)[1:]:
        if ("bhtd", h // groups) not in _heads_layouts(cand, b, t, d):
            continue

        def repeat(x, out_dtypes, g=groups):
            return (x.repeat_interleave(g, dim=1),)

        try:
            region = Region.between([cand], [node])
        except Rejected:
            continue
        if [n for n in region.float_leaves() if n is not cand]:
            continue
        if _too_big_for_probes(node, ctx.sizes):
            if _repeats_byte_codes(ctx, region, cand, node, groups):
                return cand
        elif verify(region, repeat, [cand], ctx.sizes, [{"seed": 5}]) is None:
            return cand
    return None


def _too_big_for_probes(node: Node, sizes_list) -> bool:
    v = tensor_value(node)
    return any(
        math.prod(concrete(tuple(v.shape), sizes)) > config.PROBE_MAX_ELEMENTS
        for sizes in sizes_list
    )


def _repeats_byte_codes(ctx: GraphContext, region: Region, cand: Node, node: Node, groups) -> bool:
    """The repeat check for tensors too large for float64 probes (a decode step's KV cache
    at a large batch): a region that only moves data (views, expands, reshapes, casts)
    computes the same on random one-byte codes, exactly and at an eighth of the memory."""
    movers = (is_layout, is_cast, is_basic_index)
    if not all(any(f(n) for f in movers) or _is_repeat_call(n) for n in region.nodes):
        return False
    try:
        with real_tensors():
            for sizes in ctx.sizes:
                shape = concrete(tuple(tensor_value(cand).shape), sizes)
                gen = torch.Generator(device=region.device()).manual_seed(5)
                codes = torch.randint(
                    0, 256, shape, dtype=torch.uint8, device=region.device(), generator=gen
                )
                (out,) = Evaluator(ctx.graph, sizes).run([node], {cand: codes})
                want = codes.repeat_interleave(groups, dim=1)
                same = out.shape == want.shape and torch.equal(out.to(torch.uint8), want)
                del out, want, codes
                if not same:
                    return False
    except (RuntimeError, ValueError, TypeError, IndexError, NotEvaluable):
        return False
    return True


def _is_repeat_call(node: Node) -> bool:
    return is_function(node, torch.repeat_interleave) or is_method(node, "repeat_interleave", "repeat")


# ---------------------------------------------------------------------------------------
# SDPA
# ---------------------------------------------------------------------------------------

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}  # fmt: skip


def sdpa_arguments(node: Node) -> dict[str, Any] | None:
    if len(node.args) > len(_SDPA_PARAMS):
        return None
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    for name, v in node.kwargs.items():
        if name not in _SDPA_PARAMS:
            return None
        args[name] = v
    return args if all(n in args for n in ("query", "key", "value")) else None


def _mask_kind(ctx: GraphContext, mask: Node, t_q, t_k) -> str:
    """"causal" for a mask proven causal (built from sizes alone); "runtime" for one that
    is a graph input (built in an earlier graph) or built from user inputs and causal when
    those are all ones (HF's padding mask): checked at run time. Else raises Rejected."""
    from ..ops.gqa_attention import causal_mask_problem

    runtime = runtime_inputs_of(mask)
    if runtime and path_nodes(mask)[-1].op == "placeholder":
        mv = tensor_value(mask)
        if mv.dim() < 2 or not (same_size(mv.shape[-2], t_q) and same_size(mv.shape[-1], t_k)):
            raise Rejected(f"mask {tuple(mv.shape)} is not a (T, T) mask")
        return "runtime"
    for node in runtime:
        if value(node).dtype.is_floating_point or value(node).dtype.is_complex:
            raise Rejected(f"the mask depends on the float input {node.name}")
    try:
        with real_tensors():
            for sizes in ctx.sizes:
                tq, tk = sizes_of(t_q, sizes), sizes_of(t_k, sizes)
                problem = None
                # user inputs all ones (a padding mask of real tokens), then user inputs
                # that are (T, T) masks themselves given the causal pattern
                for fill in ("ones", "causal")[: 2 if runtime else 1]:
                    feeds = {n: _user_mask_probe(n, sizes, fill, tq, tk) for n in runtime}
                    m = Evaluator(ctx.graph, sizes).run([mask], feeds)[0]
                    problem = causal_mask_problem(m, tq, tk)
                    if problem is None:
                        break
                if problem is not None:
                    raise Rejected(problem + (" (its user inputs all ones, or causal)" if runtime else ""))
    except Rejected:
        raise
    except Exception as why:  # noqa: BLE001 - any failure means: not provably causal
        raise Rejected(f"the mask could not be evaluated ({type(why).__name__})") from None
    return "runtime" if runtime else "causal"


def _user_mask_probe(node: Node, sizes, fill: str, t_q: int, t_k: int):
    """A value for a user input a mask is built from: all ones, or, for ``fill`` "causal"
    and an input whose last two dims are (T, T), the causal pattern in its dtype (True /
    1 where a query sees a key)."""
    v = value(node)
    shape = Probes(sizes, v.device).shape(node)
    ones = torch.ones(shape, dtype=v.dtype, device=v.device)
    if fill == "ones" or len(shape) < 2 or tuple(shape[-2:]) != (t_q, t_k):
        return ones
    keep = torch.ones(t_q, t_k, dtype=torch.bool, device=v.device).tril()
    return ones * keep.to(v.dtype) if v.dtype != torch.bool else ones & keep


def sizes_of(x, sizes):
    from .evaluate import concrete

    return concrete(x, sizes)


def _autocast_dtype(graph: torch.fx.Graph, node: Node) -> torch.dtype | None:
    """The autocast dtype in force at ``node`` for its tensors' device: the innermost
    region of that device type opened in the graph (a CPU autocast leaves CUDA tensors
    alone), else the state the graph is compiled under (an autocast around the compiled
    call: Dynamo keeps no enter/exit for it, and guards the graph on it)."""
    device = next(
        (v.device.type for v in map(tensor_value, node_inputs(node)) if v is not None), "cpu"
    )
    for enter in reversed(autocast_stacks(graph)[node]):
        device_type = arg(enter, 0, "device_type", None)
        if device_type not in (None, device):
            continue
        if not arg(enter, 2, "enabled", True):
            return None
        dtype = arg(enter, 1, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.get_autocast_dtype(device)
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _sdpa_operands(
    ctx: GraphContext, args: dict[str, Any], node: Node
) -> tuple[Node, Node, Node]:
    """q, and k and v before any GQA repeat; raises Rejected when they are not (B, H, T, D)."""
    q, k, v = args["query"], args["key"], args["value"]
    qv, kv, vv = (tensor_value(x) for x in (q, k, v))
    if qv is None or kv is None or vv is None:
        raise Rejected("q, k, v have no example values")
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise Rejected("q, k, v must be 4-D (B, H, T, D)")
    dtypes = {qv.dtype, kv.dtype, vv.dtype}
    # under autocast SDPA casts q, k and v to the autocast dtype (float64 excepted), as the
    # op we emit there does: fp32 q/k from fp32 RoPE tables beside a bf16 v are no mismatch
    cast = _autocast_dtype(ctx.graph, node) is not None and torch.float64 not in dtypes
    if len(dtypes) > 1 and not cast:
        raise Rejected("q, k, v dtypes differ")
    h_q, h_k = qv.shape[1], kv.shape[1]
    if not (isinstance(h_q, int) and isinstance(h_k, int)):
        raise Rejected("head counts are symbolic")
    if tuple(kv.shape) != tuple(vv.shape) or not same_size(kv.shape[3], qv.shape[3]):
        raise Rejected(f"k {tuple(kv.shape)} and v {tuple(vv.shape)} do not pair with q")
    if h_q != h_k and args["enable_gqa"] is not True:
        raise Rejected("fewer kv heads than query heads without enable_gqa")
    if h_q % h_k:
        raise Rejected(f"{h_q} query heads are not a multiple of {h_k} kv heads")
    if h_q == h_k:
        # K/V may be repeats of fewer heads (repeat_kv before SDPA)
        for groups in _divisors_desc(h_q):
            k1, v1 = unrepeated(ctx, k, groups), unrepeated(ctx, v, groups)
            if k1 is not None and v1 is not None:
                return q, k1, v1
    return q, k, v


def _dropout_or_scale_problem(args: dict[str, Any]) -> str | None:
    dropout, scale = args["dropout_p"], args["scale"]
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        return f"dropout_p={dropout} (attention dropout is not fused)"
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale is not a constant"
    return None


def _sdpa_semantics(ctx: GraphContext, args: dict[str, Any]) -> str | None:
    """None for a causal SDPA without dropout over equal lengths (mask kind in
    ``args["_mask_kind"]``), else why not."""
    qv, kv = tensor_value(args["query"]), tensor_value(args["key"])
    problem = _dropout_or_scale_problem(args)
    if problem is not None:
        return problem
    t, t_k = qv.shape[2], kv.shape[2]  # equal: unequal lengths went to _sdpa_decode
    mask = args["attn_mask"]
    args["_mask_kind"] = None
    if mask is not None:
        if not isinstance(mask, Node):
            return "attn_mask is not a tensor"
        if args["is_causal"] is True:
            return "both attn_mask and is_causal"
        if requires_grad(mask):
            return "attn_mask requires grad (a learned bias)"
        try:
            args["_mask_kind"] = _mask_kind(ctx, mask, t, t_k)
        except Rejected as why:
            return f"attn_mask: {why}"
    elif args["is_causal"] is not True:
        return "not causal (is_causal is not True and no mask)"
    if not isinstance(qv.shape[3], int):
        return "head dim is symbolic"
    return None


def _sdpa(ctx: GraphContext, node: Node, fuse: bool = True) -> Site | None:
    args = sdpa_arguments(node)
    if args is None:
        ctx.rejected(FUSION, "sdpa", node, "unrecognised SDPA arguments")
        return None
    try:
        q, k0, v0 = _sdpa_operands(ctx, args, node)
    except Rejected as why:
        ctx.rejected(FUSION, "sdpa", node, str(why))
        return None
    if _is_decode(q, k0):
        return _sdpa_decode(ctx, node, q, k0, v0, args)
    site = Site("sdpa", q, k0, v0, False, node, causal=False, core="sdpa")
    reason = _sdpa_semantics(ctx, args)
    if reason is not None:
        ctx.rejected(FUSION, "sdpa", node, reason)
        return site
    site.causal = True
    if not fuse:
        return site
    qv = tensor_value(q)
    d, t = qv.shape[3], qv.shape[2]
    scale = 1.0 / math.sqrt(d) if args["scale"] is None else float(args["scale"])
    policy = _sdpa_policy(qv, d, t)
    if policy is not None:
        ctx.rejected(FUSION, "sdpa", node, policy)
        return site
    mask_kind = args["_mask_kind"]
    mask = args["attn_mask"] if mask_kind == "runtime" else None
    autocast = _autocast_dtype(ctx.graph, node)
    site.anchor = _emit_sdpa(ctx, node, q, k0, v0, mask, scale, autocast)
    site.fused = True
    site.core = "ccgqa"
    idiom = "sdpa" + ("_runtime_mask" if mask_kind == "runtime" else "_mask" if mask_kind else "")
    ctx.fused(FUSION, idiom)
    return site


def _is_decode(q: Node, k: Node) -> bool:
    """New query tokens over a longer key sequence (a KV cache): the query length is not
    the key length."""
    t_q, t_k = tensor_value(q).shape[2], tensor_value(k).shape[2]
    return not same_size(t_q, t_k)


def _decode_problem(ctx: GraphContext, q: Node, k: Node, args: dict[str, Any]) -> str | None:
    """None when a decode-step SDPA may become our op (its function is SDPA's, no
    causality to prove), else why not."""
    problem = _dropout_or_scale_problem(args)
    if problem is not None:
        return problem
    qv = tensor_value(q)
    t_q, d = qv.shape[2], qv.shape[3]
    if args["is_causal"] is True:
        t_k = tensor_value(k).shape[2]
        relation = "!=" if isinstance(t_q, int) and isinstance(t_k, int) else "not known to equal"
        return (f"is_causal with query length {t_q} {relation} key length {t_k}: SDPA aligns "
                "that mask top-left, not at a cache's end; left to SDPA")  # fmt: skip
    problem = _decode_step_problem(ctx, t_q, "SDPA")
    if problem is not None:
        return problem
    if not isinstance(d, int):
        return "head dim is symbolic"
    if qv.device.type == "cuda":
        from ..ops.gqa_decode import KERNEL_HEAD_DIMS

        if d not in KERNEL_HEAD_DIMS:
            return f"head dim {d} has no decode kernel; left to SDPA"
    mask = args["attn_mask"]
    if mask is not None:
        if not isinstance(mask, Node):
            return "attn_mask is not a tensor"
        if requires_grad(mask):
            return "attn_mask requires grad (a learned bias)"
        mv = tensor_value(mask)
        if mv is None or mv.dim() > 4:
            return "attn_mask is not a tensor of at most 4 dims"
    return None


def _sdpa_decode(ctx: GraphContext, node: Node, q: Node, k: Node, v: Node, args) -> Site | None:
    """An SDPA call of a decode step (query length != key length) -> gqa_decode_attention,
    which computes the same function without repeating K/V. The site: the step's new q and
    k, where a CCGQA prologue of one step may end."""
    reason = _decode_problem(ctx, q, k, args)
    if reason is not None and config.PREFILL_OVER_CACHE and _prefill_over_cache(ctx, q, args):
        return _sdpa_prefill_over_cache(ctx, node, q, k, v, args)
    if reason is not None:
        ctx.rejected(DECODE_FUSION, "sdpa", node, reason)
        return None
    d, scale = tensor_value(q).shape[3], args["scale"]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = args["attn_mask"]
    k_new = new_keys(k, tensor_value(q).shape[2], node)
    op = _emit_sdpa(ctx, node, q, k, v, mask, scale, _autocast_dtype(ctx.graph, node), decode=True)
    ctx.fused(DECODE_FUSION, "sdpa" + ("_mask" if mask is not None else ""))
    return _decode_site(ctx, op, q, k_new)


def _prefill_over_cache(ctx: GraphContext, q: Node, args) -> bool:
    """A prefill over a static cache longer than the prompt (gpt-fast): more query tokens
    than a decode step, a mask passed in (rows of a causal table at the tokens'
    positions), inference, nothing else that keeps SDPA."""
    t_q = tensor_value(q).shape[2]
    mask = args["attn_mask"]
    if not ctx.decode or is_training_graph(ctx.graph) or not isinstance(mask, Node):
        return False
    if isinstance(t_q, int) and t_q <= config.DECODE_MAX_QUERY_LEN:
        return False
    mv = tensor_value(mask)
    if mv is None or mv.dim() > 4 or requires_grad(mask) or args["is_causal"] is True:
        return False
    if _dropout_or_scale_problem(args) is not None or not isinstance(tensor_value(q).shape[3], int):
        return False
    d = tensor_value(q).shape[3]
    if tensor_value(q).device.type == "cuda":
        from ..ops.gqa_attention import KERNEL_HEAD_DIMS

        return d in KERNEL_HEAD_DIMS
    return True


def _sdpa_prefill_over_cache(ctx: GraphContext, node: Node, q, k, v, args) -> Site | None:
    """-> gqa_attention_masked, which runs our causal op over the first T keys when the mask
    turns out causal there and blocks the rest (a prefill at position 0), else the SDPA
    call as written."""
    d, scale = tensor_value(q).shape[3], args["scale"]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    k_new = new_keys(k, tensor_value(q).shape[2], node)
    autocast = _autocast_dtype(ctx.graph, node)
    op = _emit_sdpa(ctx, node, q, k, v, args["attn_mask"], scale, autocast)
    ctx.fused(FUSION, "sdpa_prefill_over_cache")
    return _decode_site(ctx, op, q, k_new)


def _decode_site(ctx: GraphContext, op: Node, q: Node, k_new: Node | None) -> Site | None:
    if not isinstance(q, Node):
        return None
    if k_new is None:
        if layer_convolutions([q]):
            ctx.unfused("ccgqa_block", op, "decode attention fused, but the step's new keys "
                        "were not found behind the cache it reads (written by index_copy_, "
                        "slice assignment, index_put_ or copy_ as (B, Hkv, T, D) keys, or "
                        "joined by cat): its q/k prologue is not tried")  # fmt: skip
        return None
    return Site("decode", q, k_new, op.args[2], True, op, causal=False)


def new_keys(k: Node, t_new, reader: Node) -> Node | None:
    """The step's new keys (B, Hkv, t_new, D) behind the cache ``k`` an attention reads: the
    tensor written into a static cache (``index_copy_``, slice assignment, ``index_put_``,
    ``copy_`` into a slice) before it is read (in the attention's layout, or the tensor
    that is in it behind the layout ops that lay it out as the cache is), or the part of a ``cat`` of past and new keys
    (HF's dynamic cache). None when not found."""
    kv = tensor_value(k)
    want = (kv.shape[0], kv.shape[1], t_new, kv.shape[3]) if kv is not None and kv.dim() == 4 else None
    node = k
    while is_cast(node):
        node = node.args[0]
    if is_function(node, torch.cat):
        parts = [p for p in node.args[0] if isinstance(p, Node) and depends_on_tensor_input(p)]
        fresh = [p for p in parts if p.op != "placeholder" and _shape_is(p, want)]
        return fresh[-1] if len(fresh) == 1 else None
    order = topo_order(node.graph)
    base = storage_base(node)  # the cache, where the read is a slice of it (cache[:, :, :n])
    written = []
    for n in node.graph.nodes:
        if order[n] >= order[reader] or not is_mutating(n) or not n.args:
            continue
        if storage_base(n.args[0]) is not base:
            continue
        src = {"index_copy_": 3, "index_put_": 2, "copy_": 1}.get(str(n.target), None)
        if n.target is operator.setitem:
            src = 2
        if src is None or len(n.args) <= src:
            continue
        # a cache laid out otherwise: ``k.transpose(1, 2)`` into (B, S, Hkv, D), vLLM's
        # ``k.transpose(1, 2).reshape(B * T, Hkv, D)`` into (slots, Hkv, D) at slot indices
        value = n.args[src]
        while not _shape_is(value, want) and is_layout(value):
            value = value.args[0]
        if _shape_is(value, want):
            written.append(value)
    return written[-1] if len(written) == 1 else None


def _shape_is(node: Any, shape) -> bool:
    v = tensor_value(node)
    return shape is not None and v is not None and v.dim() == 4 and all(
        same_size(a, b) for a, b in zip(v.shape, shape)
    )


def _divisors_desc(n: int) -> list[int]:
    return [g for g in range(n, 1, -1) if n % g == 0]


def _handwritten_core(qv) -> str:
    """Whose kernels run a causal hand-written attention without a runtime mask: "sdpa"
    where an SDPA call would be left to SDPA (``_sdpa_policy``: its cuDNN / flash kernels
    beat ours there), else ours. ``config.HANDWRITTEN_ATTENTION_CORE`` overrides."""
    chosen = config.HANDWRITTEN_ATTENTION_CORE
    if chosen != "auto":
        return chosen
    if qv.device.type != "cuda":
        return "ccgqa"
    return "sdpa" if _sdpa_policy(qv, qv.shape[-1], None) is not None else "ccgqa"


def _sdpa_policy(qv, d: int, t) -> str | None:
    if isinstance(t, int) and t == 1:
        return "a single token: the attention output is v; left to Inductor"
    if d > config.SDPA_MAX_HEAD_DIM:
        return (f"head dim {d} > {config.SDPA_MAX_HEAD_DIM}: SDPA's own kernel is faster there "
                "(config.SDPA_MAX_HEAD_DIM); left to SDPA")  # fmt: skip
    if qv.device.type == "cuda":
        from ..ops.gqa_attention import KERNEL_HEAD_DIMS

        if d not in KERNEL_HEAD_DIMS:
            return f"head dim {d} has no Triton kernel: SDPA is faster; left to SDPA"
    return None


def _emit_sdpa(ctx, node, q, k, v, mask, scale, autocast, decode: bool = False) -> Node:
    """Replace the SDPA call ``node`` by our op on (q, k, v); its old K/V repeats go."""
    graph = ctx.graph
    old_k, old_v = node.args[1] if len(node.args) > 1 else node.kwargs["key"], (
        node.args[2] if len(node.args) > 2 else node.kwargs["value"]
    )
    new: list[Node] = []
    with graph.inserting_before(node):
        ins = [q, k, v]
        if autocast is not None:
            ins = [graph.call_method("to", (x, autocast)) for x in ins]
            for x in ins:
                x.meta["ccgqa_autocast"] = True
            new.extend(ins)
        if decode:  # one output: no logsumexp is kept for a backward
            op = out = graph.call_function(
                torch.ops.ccgqa.gqa_decode_attention.default, (*ins, mask, scale)
            )
            new.append(op)
        else:
            if mask is None:
                op = graph.call_function(torch.ops.ccgqa.gqa_attention.default, (*ins, scale))
            else:
                op = graph.call_function(
                    torch.ops.ccgqa.gqa_attention_masked.default, (*ins, mask, scale)
                )
            out = graph.call_function(operator.getitem, (op, 0))
            new.extend([op, out])
    propagate_fake(graph, new)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    erase_unused(graph, [n for n in (old_k, old_v) if isinstance(n, Node)])
    stable_sort(graph)
    return op


# ---------------------------------------------------------------------------------------
# hand-written attention
# ---------------------------------------------------------------------------------------


def _softmax_dim_ok(node: Node) -> bool:
    dim = arg(node, 1, "dim")
    nd = tensor_value(node).dim()
    return dim == -1 or dim == nd - 1


def _product_operands(node: Node) -> list[Node]:
    if is_function(node, torch.einsum):
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        return list(ops)
    return [node.args[0], node.args[1]]


_DROPOUT = {F.dropout, torch.dropout, torch.nn.functional.dropout}


def _chain_op(node: Node) -> bool:
    """Ops that act on every score the same way wherever it is (so rows can be evaluated
    apart): element-wise arithmetic, masking with a leaf mask, casts, row softmax, and
    views of the leading dims (Megatron's and BLOOM's ``bmm`` scores viewed (B, H, T, T))."""
    return (
        is_elementwise(node)
        or is_cast(node)
        or is_function(node, torch.where, torch.masked_fill, *_DROPOUT)
        or is_method(node, "masked_fill", "softmax")
        or is_function(node, *SOFTMAXES)
        or _leading_view(node)
    )


def _leading_view(node: Any) -> bool:
    """A view or reshape that regroups the leading dims and keeps the last two (query rows
    and keys) as they are: ``(B*H, T, T) -> (B, H, T, T)`` and back."""
    if not (is_method(node, "view", "reshape") or is_function(node, torch.reshape)):
        return False
    x, y = tensor_value(node.args[0]), tensor_value(node)
    return (
        x is not None and y is not None and x.dim() >= 3 and y.dim() >= 3
        and same_shape(tuple(x.shape[-2:]), tuple(y.shape[-2:]))
    )  # fmt: skip


class _RowsEvaluator(Evaluator):
    """Runs a chain on a block of query rows: a leading view regroups the leading dims of
    what it gets (its own sizes name all the rows)."""

    def execute(self, node: Node, env: dict[Node, Any]) -> Any:
        if _leading_view(node):
            x = env[node.args[0]]
            lead = concrete(tuple(tensor_value(node).shape[:-2]), self.sizes)
            return x.reshape(*lead, *x.shape[-2:])
        return super().execute(node, env)


def _reaches_product(node: Node, hops: int = 16) -> bool:
    """Whether the scores' product lies behind ``node`` through chain ops."""
    for _ in range(hops):
        if is_product(node):
            return True
        if not _chain_op(node):
            return False
        live = [i for i in node_inputs(node) if depends_on_tensor_input(i)]
        ahead = [i for i in live if _reaches_product(i, hops - 1)] if len(live) > 1 else live
        if len(ahead) != 1:
            return False
        node = ahead[0]
    return False


def _score_input(node: Node) -> tuple[Node | None, list[Node]]:
    """Of a chain op's inputs, the one carrying the scores, and the other runtime inputs
    (a mask passed in)."""
    live = [i for i in node_inputs(node) if depends_on_tensor_input(i)]
    if len(live) == 1:
        return live[0], []
    scores = [i for i in live if _reaches_product(i)]
    if len(scores) != 1:
        return None, []
    return scores[0], [i for i in live if i is not scores[0]]


# how a run-time mask may enter the scores: added (an additive bias, -inf where blocked),
# or selecting where the scores are replaced (masked_fill, where). A tensor multiplying or
# dividing them is a scale known only when the program runs, which the ops do not take.
_MASKING_CALLS = {"add", "sub", "masked_fill", "where", "__add__", "__sub__", "__radd__", "__rsub__"}


def _masks_scores(node: Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _MASKING_CALLS
    return is_function(node, operator.add, operator.sub, torch.add, torch.sub, torch.where,
                       torch.masked_fill)  # fmt: skip


@dataclass
class _Handwritten:
    softmax: Node
    scores: Node  # the product q k^T
    product: Node  # probabilities times values
    chain: list[Node]  # scores -> ... -> the product's probability operand
    mask: Node | None = None  # a mask the chain reads that is a run-time input
    manual: bool = False  # a softmax written out: ``softmax`` is then the probabilities


def _parse(anchor: Node) -> _Handwritten | str:
    if not _softmax_dim_ok(anchor):
        return "softmax over another dim than the last"
    node = anchor.args[0]
    chain = []
    masks: list[Node] = []
    for _ in range(16):
        if not isinstance(node, Node):
            return "the softmax input is not a tensor"
        if is_product(node):
            break
        if not _chain_op(node):
            return f"{node.name} ({node.target}) between the scores and the softmax"
        chain.append(node)
        nxt, others = _score_input(node)
        if nxt is None:
            return f"{node.name} combines two runtime tensors"
        if others and not _masks_scores(node):
            return (f"{others[0].name}, a run-time tensor, enters the scores at {node.name} "
                    f"({call_name(node)}), not as a mask (added, filled or selected)")  # fmt: skip
        masks += others
        node = nxt
    else:
        return "no product of q and k before the softmax"
    if len(set(masks)) > 1:
        return "the scores combine several run-time tensors"
    mask = masks[0] if masks else None
    if mask is not None and node in ancestors([mask]):
        return f"{mask.name} is computed from the scores by an op that is not row-wise"
    if mask is not None and any(_leading_view(n) for n in chain):
        return f"{mask.name}, a run-time mask, meets scores whose leading dims are viewed"
    return _with_product(anchor, node, list(reversed(chain)) + [anchor], mask)


def _with_product(anchor: Node, scores: Node, chain: list[Node], mask: Node | None, manual=False):
    """The parse completed forward: casts and identity dropouts from the probabilities to
    the product with v (other readers of the probabilities, such as HF's returned
    attention weights, keep their own copy)."""
    node = anchor
    for _ in range(6):
        nexts = [u for u in node.users if is_product(u) and _product_operands(u)[0] is node]
        nexts += [u for u in node.users if is_function(u, torch.einsum) and node in _product_operands(u)]
        if nexts:
            return _Handwritten(anchor, scores, nexts[0], chain, mask, manual)
        steps = [u for u in node.users if is_cast(u) or is_function(u, *_DROPOUT) or _leading_view(u)]
        if len(steps) != 1:
            return "no product with v after the softmax"
        chain.append(steps[0])
        node = steps[0]
    return "no product with v after the softmax"


# a softmax written out (``exp(s - max) / sum``, ``exp2``, ``exp(s - logsumexp)``...): the
# probabilities are recognised as the output of row-wise ops on the scores (element-wise
# ops and reductions over the key axis that keep it), then proven on probes like any
# other spelling
_ROW_REDUCTIONS = (torch.amax, torch.max, torch.sum, torch.logsumexp)
_ROW_REDUCTION_METHODS = ("amax", "max", "sum", "logsumexp")


def _row_reduction(node: Any) -> bool:
    """A reduction over the last dim that keeps it (so it broadcasts back along the row)."""
    if not (is_function(node, *_ROW_REDUCTIONS) or is_method(node, *_ROW_REDUCTION_METHODS)):
        return False
    x = tensor_value(node.args[0]) if node.args else None
    dim = arg(node, 1, "dim")
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else None
    return x is not None and arg(node, 2, "keepdim", False) is True and dim in (-1, x.dim() - 1)


def _row_max_values(node: Any) -> bool:
    """``max(..., keepdim=True)[0]`` / ``.values``."""
    return (
        is_function(node, operator.getitem)
        and node.args[1] == 0
        and _row_reduction(node.args[0])
        and call_name(node.args[0]) == "max"
    )


def _detached_row_max(node: Any) -> bool:
    """A detached row max: the shift of a stable softmax, which moves no gradient (the
    softmax is shift-invariant). A detach anywhere else would change the gradient with
    the same values, which probes cannot see: not allowed."""
    if not is_method(node, "detach"):
        return False
    x = node.args[0]
    return _row_max_values(x) or (_row_reduction(x) and call_name(x) == "amax")


def _row_op(node: Any) -> bool:
    return (
        _chain_op(node)
        or is_function(node, torch.exp2)
        or is_method(node, "exp2")
        or _row_reduction(node)
        or _row_max_values(node)
        or _detached_row_max(node)
    )


def _row_reaches_product(node: Node, memo: dict[Node, bool], hops: int = 24) -> bool:
    if node in memo:
        return memo[node]
    memo[node] = False  # no cycles in a graph; this bounds revisits
    if is_product(node):
        memo[node] = True
    elif hops > 0 and _row_op(node):
        live = [i for i in node_inputs(node) if depends_on_tensor_input(i)]
        memo[node] = any(_row_reaches_product(i, memo, hops - 1) for i in live)
    return memo[node]


def _parse_manual(anchor: Node) -> _Handwritten | str:
    """Probabilities computed by row-wise ops from one product of q and k."""
    memo: dict[Node, bool] = {}
    region: set[Node] = set()
    scores: set[Node] = set()
    masks: set[Node] = set()
    stack = [anchor]
    while stack:
        node = stack.pop()
        if node in region or node in scores:
            continue
        if is_product(node):
            scores.add(node)
            continue
        if not _row_op(node):
            return f"{node.name} ({call_name(node)}) between the scores and the probabilities"
        region.add(node)
        if len(region) > 32:
            return "too many ops between the scores and the probabilities"
        for i in node_inputs(node):
            if not depends_on_tensor_input(i):
                continue
            if _row_reaches_product(i, memo):
                stack.append(i)
            else:
                masks.add(i)
    if len(scores) != 1:
        return "the probabilities read several products"
    if len(masks) > 1:
        return "the scores combine several run-time tensors"
    product, mask = scores.pop(), next(iter(masks), None)
    if mask is not None and product in ancestors([mask]):  # such as a detached row sum
        return f"{mask.name} is computed from the scores by an op that is not row-wise"
    order = topo_order(anchor.graph)
    chain = sorted(region, key=order.__getitem__)
    return _with_product(anchor, product, chain, mask, manual=True)


def _manual_anchors(graph: torch.fx.Graph) -> list[Node]:
    """The probability operand of every product of a softmax written out: row-wise ops on
    another product with an exponential and a row reduction among them, and no softmax
    call (those are anchors of their own)."""
    found = []
    for node in graph.nodes:
        if not is_product(node):
            continue
        ops = _product_operands(node)
        for p in ops if is_function(node, torch.einsum) else ops[:1]:
            while is_cast(p) or is_function(p, *_DROPOUT):
                p = p.args[0]
            if not isinstance(p, Node) or p in found or is_product(p) or not _row_op(p):
                continue
            if p.meta.get(SCALED_QUERY):
                continue
            hw = _parse_manual(p)
            if not isinstance(hw, _Handwritten):
                if _exp_within(p, 3):  # looks like one: its rejection goes in the report
                    found.append(p)
                continue
            chain = hw.chain
            if (
                any(is_exp(n) for n in chain)
                and any(_row_reduction(n) for n in chain)
                and not any(is_softmax(n) for n in chain)
            ):  # fmt: skip
                found.append(p)
    return found


def _row_dims(product: Node, prob_or_q: Node) -> tuple[int, int] | None:
    """(row dim in the operand ``prob_or_q``, row dim in the product's output)."""
    if is_function(product, torch.einsum):
        ins, out = einsum_letters(product.args[0])
        if "." in product.args[0]:
            return None
        ops = _product_operands(product)
        idx = ops.index(prob_or_q)
        row_letter = out[-2]
        if row_letter not in ins[idx]:
            return None
        return ins[idx].index(row_letter), out.index(row_letter)
    ops = _product_operands(product)
    if ops[0] is not prob_or_q:
        return None
    return tensor_value(prob_or_q).dim() - 2, tensor_value(product).dim() - 2


class _RowEvaluator:
    """Evaluates the hand-written region on blocks of query rows."""

    def __init__(self, ctx: GraphContext, hw: _Handwritten, sources: list[Node]):
        self.ctx, self.hw = ctx, hw
        self.sources = sources
        s_ops = _product_operands(hw.scores)
        self.a, self.bm = s_ops
        self.p_operand = hw.chain[-1]
        p_ops = _product_operands(hw.product)
        self.vp = p_ops[1] if p_ops[0] is self.p_operand else p_ops[0]
        rows_s = _row_dims(hw.scores, self.a)
        rows_o = _row_dims(hw.product, self.p_operand)
        if rows_s is None or rows_o is None:
            raise Rejected("the products' row dims could not be read")
        self.a_row, self.s_row = rows_s
        self.p_row, self.o_row = rows_o
        sv = tensor_value(hw.scores)
        if self.s_row != sv.dim() - 2:
            raise Rejected("the scores' rows are not their second to last dim")

    def operands(self, feeds, sizes):
        return Evaluator(self.ctx.graph, sizes).run([self.a, self.bm, self.vp], feeds)

    def rows(self, feeds, sizes, a, bm, vp, r0: int, r1: int, upto: Node | None = None):
        hw = self.hw
        a_rows = a.narrow(self.a_row, r0, r1 - r0)
        s_args = [a_rows if x is self.a else bm for x in _product_operands(hw.scores)]
        s_rows = _call_product(hw.scores, s_args)
        chain_feeds = {hw.scores: s_rows}
        evaluator = _RowsEvaluator(self.ctx.graph, sizes)
        chain_set = set(hw.chain)
        for node in hw.chain:
            for leaf in node_inputs(node):
                if leaf in chain_set or leaf is hw.scores or leaf in chain_feeds:
                    continue
                full = feeds[leaf] if leaf in feeds else evaluator.run([leaf], feeds)[0]
                if reads_dtype_only(node, leaf):  # (``p.type_as(v)``: v is no mask)
                    chain_feeds[leaf] = full
                    continue
                chain_feeds[leaf] = _slice_rows(full, tensor_value(hw.scores), r0, r1)
        target = upto or self.p_operand
        if target is hw.scores:
            return s_rows
        (p_rows,) = evaluator.run([target], {**feeds, **chain_feeds})
        if upto is not None:
            return p_rows
        o_args = [p_rows if x is self.p_operand else vp for x in _product_operands(hw.product)]
        return _call_product(hw.product, o_args)


def _call_product(node: Node, operands: list[Any]) -> Any:
    if is_function(node, torch.einsum):
        return torch.einsum(node.args[0], *operands)
    if node.op == "call_method":
        return getattr(operands[0], str(node.target))(operands[1])
    return node.target(*operands)


def _slice_rows(t: Any, scores_val, r0: int, r1: int) -> Any:
    """A leaf broadcast against (..., T, T) scores, cut to rows [r0, r1)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return t
    if t.shape[-2] == 1:
        return t
    return t.narrow(-2, r0, r1 - r0)


def _reference_rows(
    q, k, v, scale, r0, r1, mask=None, mask_mode=None, causal=True, mask_layout=None,
    empty="nan",
):  # fmt: skip
    """GQA attention of rows [r0, r1), float64, (B, Hq, R, D): causal, or with ``mask``
    (rows already cut) instead when one is given, or over every key (``causal`` False).
    A row whose mask blocks every key is ``empty`` (``_EMPTY_ROWS``)."""
    g = q.shape[1] // k.shape[1]
    mask = _mask_for_layout(mask, mask_layout)
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q[:, :, r0:r1] @ kr.transpose(-1, -2) * scale
    if mask is None and causal:
        t_k = k.shape[2]
        rows = torch.arange(r0, r1, device=q.device)[:, None]
        cols = torch.arange(t_k, device=q.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    elif mask is not None and mask_mode == "add":
        s = s + mask
    elif mask is not None:
        s = s.masked_fill(~_op_mask(mask, mask_mode), float("-inf"))
    out = torch.softmax(s, dim=-1) @ vr
    if mask is None or empty == "nan":
        return out
    blocked = torch.isneginf(s).all(-1, keepdim=True)
    fill = vr.mean(-2, keepdim=True) if empty == "uniform" else torch.zeros_like(out)
    return torch.where(blocked, fill, out)


# What attention computes on a row whose mask blocks every key: NaN (a softmax over -inf
# scores, as written by hand), the mean of every value (the blocked scores filled with a
# finite minimum: all equal), or zeros (SDPA's). Tried in this order on a probe with such
# a row; the op's rows are zeros, the emitted code writes the other two.
_EMPTY_ROWS = ("nan", "uniform", "zero")


def _empty_rows_as(o, v, keep, mask_mode: str, empty: str | None):
    """``o`` (B, Hq, R, D) with the rows ``keep`` (the op's mask: bool, True where seen;
    or additive, ``mask_mode`` "add") lets see no key set as ``empty`` says."""
    if empty is None or empty == "zero":
        return o
    seen = (keep > float("-inf") if mask_mode == "add" else keep).any(-1, keepdim=True)
    if empty == "nan":
        return o.masked_fill(seen.logical_not(), float("nan"))
    groups = o.shape[1] // v.shape[1]
    mean = v.mean(-2, keepdim=True).repeat_interleave(groups, dim=1).to(o.dtype)
    return torch.where(seen, o, mean)


def _block_rows(numel_per_row: int) -> int:
    return max(1, min(4096, (1 << 22) // max(numel_per_row, 1)))


def _handwritten(ctx: GraphContext, anchor: Node, fuse: bool = True) -> Site | None:
    hw = _parse(anchor) if is_softmax(anchor) else _parse_manual(anchor)
    if isinstance(hw, str):
        ctx.rejected(FUSION, "handwritten", anchor, hw)
        return None
    try:
        site = _match_handwritten(ctx, hw, fuse)
    except Rejected as why:
        ctx.rejected(FUSION, "handwritten", anchor, str(why))
        return None
    return site


def _match_handwritten(ctx: GraphContext, hw: _Handwritten, fuse: bool = True) -> Site:
    sv = tensor_value(hw.scores)
    t_q, t_k = sv.shape[-2], sv.shape[-1]
    decode = not same_size(t_q, t_k)
    if decode:  # a few new tokens over a KV cache: the mask alone says what each sees
        problem = _decode_step_problem(ctx, t_q, "the code as written")
        if problem is not None:
            raise Rejected(problem)
        if not fuse:
            raise Rejected("a decode step: no CCGQA prologue ends here")
        if hw.mask is None:
            table = _decode_mask_table(hw)
            if isinstance(table, str):
                raise Rejected(table)
            hw = replace(hw, mask=table)
    a, bm = _product_operands(hw.scores)
    p_ops = _product_operands(hw.product)
    vp = p_ops[1] if p_ops[0] is hw.chain[-1] else p_ops[0]
    ov = tensor_value(hw.product)
    d = ov.shape[-1] if not is_function(hw.product, torch.einsum) else None
    # q candidates: 4-D tensors on A's path laid out (B, H, T, D) or (B, T, H, D)
    choices = []
    for q in reversed(path_nodes(a)):
        qv = tensor_value(q)
        if qv is None or qv.dim() not in (4, 5):
            continue
        dq = qv.shape[-1]
        # the batch leads, or follows the tokens
        batches = [qv.shape[0]] + ([qv.shape[1]] if same_size(qv.shape[0], t_q) else [])
        q_layouts = [(lay, h, b) for b in batches for lay, h in _heads_layouts(q, b, t_q, dq)]
        for q_layout, h_q, b in q_layouts:
            for k in reversed(path_nodes(bm)):
                for k_layout, h_k in _heads_layouts(k, b, t_k, dq):
                    if h_q % h_k:
                        continue
                    for v in reversed(path_nodes(vp)):
                        for v_layout, h_v in _heads_layouts(v, b, t_k, dq):
                            if h_v == h_k:
                                choices.append((q, q_layout, k, k_layout, v, v_layout, h_q, dq))
    if not fuse:  # a site for the prologue: q, k, v must be nodes laid out (B, H, T, D)
        choices = [c for c in choices if (c[1], c[3], c[5]) == ("bhtd",) * 3]
    if not choices:
        raise Rejected("no (B, H, T, D) q, k, v found on the products' operand paths")
    del d
    out_layouts = _output_layouts(hw.product)
    reason = "no q, k, v on the operand paths compute this attention"
    for q, ql, k, kl, v, vl, h_q, _d in choices[:16]:
        try:
            region = Region.between([q, k, v], [hw.product])
        except Rejected as why:
            reason = str(why)
            continue
        extra = [
            n for n in region.float_leaves()
            if n not in (q, k, v, hw.mask) and depends_on_tensor_input(n)
        ]  # fmt: skip
        if extra:
            reason = f"the scores depend on another runtime tensor ({extra[0].name})"
            continue
        try:
            mask_layout = _mask_layout(hw.mask, hw.scores, h_q)
        except Rejected as why:
            reason = str(why)
            continue
        for mask_mode in _mask_modes(hw.mask):
            try:
                rows = _RowEvaluator(ctx, hw, [q, k, v])
                scale = _infer_scale(ctx, hw, rows, region, q, ql, k, kl, mask_mode, decode)
            except Rejected as why:
                reason = str(why)
                continue
            except NotEvaluable as why:  # a value only the running program has
                reason = f"cannot be evaluated: {why}"
                continue
            empties = _EMPTY_ROWS if mask_mode is not None else (None,)
            for out_layout, empty in itertools.product(out_layouts, empties):
                why = _verify_rows(
                    ctx, hw, rows, region, (q, ql), (k, kl), (v, vl), scale, out_layout,
                    mask_mode, decode, mask_layout, empty,
                )  # fmt: skip
                if why is None and not fuse:
                    return Site("handwritten", q, k, v, False, hw.softmax)
                if why is None:
                    autocast = _autocast_dtype(ctx.graph, hw.scores)
                    core = "ccgqa"
                    if hw.mask is None and not decode:
                        core = _handwritten_core(tensor_value(q))
                    mask_dim = tensor_value(hw.mask).dim() if hw.mask is not None else 4
                    cand = _candidate(
                        ql, kl, vl, scale, out_layout, autocast, mask_mode, decode, core,
                        mask_layout, empty, mask_dim,
                    )
                    inputs = [q, k, v] + ([hw.mask] if hw.mask is not None else [])
                    (out,) = emit(region, cand, inputs)
                    if core == "sdpa":
                        ctx.fused(FUSION, "handwritten_sdpa_core")
                        op = _op_above(out, lambda n: is_function(n, *SDPA))
                        return Site("handwritten", *op.args[:3], True, op, core="sdpa")
                    if decode:
                        ctx.fused(DECODE_FUSION, "handwritten" + ("_mask" if hw.mask else ""))
                        op = _op_above(out)
                        q_op, k_op, _ = _op_inputs(op)
                        return _decode_site(ctx, op, q_op, new_keys(k, t_q, op))
                    ctx.fused(FUSION, "handwritten" + ("_runtime_mask" if hw.mask else ""))
                    op = _op_above(out)
                    return Site("handwritten", *_op_inputs(op), True, op)
                reason = why
    raise Rejected(reason)


def _decode_step_problem(ctx: GraphContext, t_q, kept: str) -> str | None:
    """Why an attention of ``t_q`` queries over a longer key sequence (SDPA or written out)
    is not a decode step we fuse (None: it may be); ``kept``: what runs it instead."""
    if not ctx.decode:
        return "gqa_decode_attention is disabled"
    if is_training_graph(ctx.graph):
        return f"a query length != key length in a training graph: left to {kept}"
    # a symbolic length (Dynamo's automatic dynamic shapes after a prompt, then a few
    # speculated tokens) is judged by the length being compiled for: the op itself runs
    # SDPA on longer chunks
    hint = t_q if isinstance(t_q, int) else concrete(t_q, ctx.sizes[0])
    if hint > config.DECODE_MAX_QUERY_LEN:
        return (f"{t_q} query tokens over a cache: more than config.DECODE_MAX_QUERY_LEN="
                f"{config.DECODE_MAX_QUERY_LEN}, a prefill rather than a decode step; left to {kept}")  # fmt: skip
    return None


def _decode_mask_table(hw: _Handwritten) -> Node | str | None:
    """A decode step's mask built from sizes (a bool or additive table over the cache):
    the op takes it as its mask, and the probes draw it at random like a run-time one, so
    whatever it holds, the function is proven. None: no table; a reason: several."""
    tables = {
        leaf for node in hw.chain for leaf in node_inputs(node)
        if leaf not in hw.chain and leaf is not hw.scores
        and tensor_value(leaf) is not None and tensor_value(leaf).dim() >= 2
        and not reads_dtype_only(node, leaf)
    }  # fmt: skip
    if len(tables) > 1:
        return "a decode step masked by several tables"
    return next(iter(tables), None)


MaskLayout = tuple  # ("grouped", Hkv, G, shared by every head) or ("flat", Hq)


def _mask_layout(mask: Node | None, scores: Node, heads: int) -> MaskLayout | None:
    """How a run-time mask written in the scores' layout maps to the op's (B, Hq, R, S):
    None when it already broadcasts so; ("grouped", Hkv, G, shared) for a 5-D mask on
    grouped scores; ("flat", Hq) for a 3-D mask over (B*Hq, R, S) rows (bmm scores)."""
    mv = None if mask is None else tensor_value(mask)
    if mv is None:
        return None
    if mv.dim() == 5:
        sv = tensor_value(scores)
        if sv.dim() != 5:
            raise Rejected("a 5-D mask on scores that are not grouped (B, Hkv, G, T, T)")
        if not all(isinstance(n, int) for n in (*sv.shape[1:3], *mv.shape[1:3])):
            raise Rejected("grouped scores with a symbolic head count")
        return ("grouped", int(sv.shape[1]), int(sv.shape[2]), mv.shape[1] == mv.shape[2] == 1)
    if mv.dim() == 3 and not same_size(mv.shape[0], 1):
        return ("flat", heads)
    return None


def _mask_for_layout(mask, layout: MaskLayout | None):
    """The mask as the op reads it, (B, Hq, R, S) up to broadcasting: query head
    h = j * G + g of grouped scores; rows b * Hq + h of flattened ones. Kept a view
    where every head shares it."""
    if mask is None or layout is None:
        return mask
    if layout[0] == "flat":
        return mask.unflatten(0, (-1, layout[1]))
    _, kv_heads, group, shared = layout
    if shared:
        return mask.squeeze(2)
    return mask.expand(-1, kv_heads, group, -1, -1).flatten(1, 2)


def _mask_modes(mask: Node | None) -> list[str | None]:
    """How a mask passed in at run time may act: added to the scores (float), or a bool
    mask of allowed ("keep") or of blocked ("drop") positions."""
    if mask is None:
        return [None]
    v = tensor_value(mask)
    return ["add"] if v.dtype.is_floating_point else ["keep", "drop"]


def _random_mask(
    node: Node, mode: str, sizes, seed: int, neutral: bool = False, empty_row: bool = False
):
    """A mask for the probes: random (a quarter of the positions blocked), or one that
    blocks nothing (``neutral``). ``empty_row``: the first row blocks every key (what
    such a row computes differs between spellings: ``_EMPTY_ROWS``)."""
    v = tensor_value(node)
    shape = Probes(sizes, v.device).shape(node)
    gen = torch.Generator(device=v.device).manual_seed(seed)
    blocked = torch.rand(shape, generator=gen, device=v.device) < (0.0 if neutral else 0.25)
    if empty_row:
        blocked[(0,) * (blocked.dim() - 1)] = True
    elif blocked.numel() and blocked.all():  # a one-element mask: one probe shows values
        blocked.view(-1)[0] = False
    if mode == "add":
        values = torch.randn(shape, generator=gen, dtype=torch.float64, device=v.device)
        values = values * (0 if neutral else 2)
        return values.masked_fill(blocked, float("-inf"))
    return ~blocked if mode == "keep" else blocked


def _op_mask(mask, mode):
    """The mask as the op reads it: additive, or bool with True where allowed."""
    return mask.logical_not() if mode == "drop" else mask


def is_attention_op(node: Any) -> bool:
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", target)
    return packet in (
        torch.ops.ccgqa.gqa_attention,
        torch.ops.ccgqa.gqa_attention_masked,
        torch.ops.ccgqa.gqa_decode_attention,
    )


def layer_ancestors(nodes: list[Node]) -> set[Node]:
    """The nodes ``nodes`` depend on within their layer: not past another attention (an
    earlier layer's convolutions are behind its attention)."""
    graph = nodes[0].graph
    stop = set(anchors(graph)) | {n for n in graph.nodes if is_attention_op(n)}
    return ancestors(nodes, stop=stop - set(nodes))


def layer_convolutions(nodes: list[Node]) -> list[Node]:
    """The 1-D convolutions ``nodes`` depend on within their layer (a CCGQA prologue's)."""
    return [n for n in layer_ancestors(nodes) if is_function(n, *CONV1D)]


def _op_above(node: Node, is_op=is_attention_op) -> Node:
    """The attention op nearest above ``node`` (the emitted output reads it through views
    only; an earlier layer's op is further up, past its residual)."""
    frontier, seen = [node], {node}
    while frontier:
        for n in frontier:
            if is_op(n):
                return n
        frontier = [i for n in frontier for i in node_inputs(n) if i not in seen]
        seen.update(frontier)
    raise Rejected(f"no attention op above {node.name}")


def _op_inputs(op: Node) -> tuple[Node, Node, Node]:
    """The op's q, k, v before any autocast cast the rewrite inserted."""
    out = []
    for x in op.args[:3]:
        if is_method(x, "to") and x.meta.get("ccgqa_autocast"):
            x = x.args[0]
        out.append(x)
    return tuple(out)


def _output_layouts(product: Node) -> list[str]:
    """The layouts the attention's output may have: (B*H, T, D), (B, H, T, D), (B, T, H, D),
    or grouped, (B, Hkv, G, T, D) or (B, T, Hkv, G, D) (q viewed per kv-head group against
    unrepeated k)."""
    nd = tensor_value(product).dim()
    return {3: ["flat"], 4: ["bhtd", "bthd"], 5: ["grouped", "grouped_tokens_first"]}.get(nd, [])


def _adapt_out(o, layout, kv_heads: int):
    """o (B, H, T, D) in the output's layout."""
    if layout == "flat":
        return o.flatten(0, 1)
    if layout == "bthd":
        return o.transpose(1, 2)
    if layout.startswith("grouped"):
        o = o.unflatten(1, (kv_heads, o.shape[1] // kv_heads))
        return o.permute(0, 3, 1, 2, 4) if layout == "grouped_tokens_first" else o
    return o


def _opaque_call(fn, x):
    """``fn(x)`` as one graph node when tracing (``fn`` is an autograd.Function's wrapper,
    whose backward would be lost by tracing through its forward)."""
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy("call_function", fn, (x,), {})
    return fn(x)


def _candidate(
    ql, kl, vl, scale, out_layout, autocast, mask_mode=None, decode=False, core="ccgqa",
    mask_layout=None, empty=None, mask_dim=4,
):  # fmt: skip
    """``mask_layout``: how the run-time mask maps to the op's (``_mask_layout``);
    ``empty``: what a row whose mask blocks every key computes (``_EMPTY_ROWS``);
    ``mask_dim``: the mask's dims as written (fewer than 4: leading unit dims added)."""

    def attention(q, k, v, *mask, out_dtypes):
        ins = [_to_bhtd(q, ql), _to_bhtd(k, kl), _to_bhtd(v, vl)]
        mask = tuple(_mask_for_layout(m, mask_layout) for m in mask)
        if mask_layout is None and mask_dim < 4:  # SDPA and the ops read (B, H, R, S)
            mask = tuple(m[(None,) * (4 - mask_dim)] for m in mask)
        if autocast is not None and out_dtypes[0] is not None:
            ins = [x.to(autocast) for x in ins]
        if core == "sdpa":  # causal, no mask (``_handwritten_core``'s callers)
            o = F.scaled_dot_product_attention(*ins, is_causal=True, scale=scale, enable_gqa=True)
            from ..ops.gqa_attention import contiguous_grad

            o = _opaque_call(contiguous_grad, o)
        elif decode:
            m = None if mask_mode is None else _op_mask(mask[0], mask_mode)
            if mask_mode == "add" and out_dtypes[0] is not None:
                m = m.to(ins[0].dtype)
            o = torch.ops.ccgqa.gqa_decode_attention(*ins, m, scale)
            if m is not None:
                o = _empty_rows_as(o, ins[2], m, mask_mode, empty)
        elif mask_mode is None:
            o = torch.ops.ccgqa.gqa_attention(*ins, scale)[0]
        else:
            m = _op_mask(mask[0], mask_mode)
            if mask_mode == "add" and out_dtypes[0] is not None:
                m = m.to(ins[0].dtype)
            o = torch.ops.ccgqa.gqa_attention_masked(*ins, m, scale)[0]
            o = _empty_rows_as(o, ins[2], m, mask_mode, empty)
        return (_adapt_out(o, out_layout, ins[1].shape[1]),)

    return attention


def _infer_scale(ctx, hw, rows: _RowEvaluator, region, q, ql, k, kl, mask_mode=None, decode=False) -> float:
    sizes = ctx.sizes[0]
    with real_tensors():
        given = {}
        if mask_mode is not None:
            given[hw.mask] = _random_mask(hw.mask, mask_mode, sizes, 20, neutral=True)
        feeds = region.feeds(sizes, seed=21, given=given)
        a, bm, vp = rows.operands(feeds, sizes)
        t = sizes_of(tensor_value(hw.scores).shape[-1], sizes)
        r1 = min(sizes_of(tensor_value(hw.scores).shape[-2], sizes), 8)
        upto = hw.softmax if hw.manual else _softmax_input(hw)
        s_in = rows.rows(feeds, sizes, a, bm, vp, 0, r1, upto=upto)
        qq, kk = _to_bhtd(feeds[q], ql), _to_bhtd(feeds[k], kl)
        if not kk.any():
            raise Rejected(
                "the keys are all zero on the probes: zeros built in the graph, filled by "
                "in-place writes the probes do not follow (a KV cache created inside this "
                "graph?); left as written"
            )
        g = qq.shape[1] // kk.shape[1]
        ref = qq[:, :, :r1] @ kk.repeat_interleave(g, dim=1).transpose(-1, -2)
        ref = _match_rows_layout(ref, s_in)
        if ref is None:
            raise Rejected("the scores are not laid out (B, H, T, T)")
        rr = torch.arange(r1, device=ref.device)[:, None]
        cc = torch.arange(t, device=ref.device)[None, :]
        causal = (cc <= rr).expand_as(ref) if not decode else torch.ones_like(ref, dtype=torch.bool)
        fit = _scale_from_probs if hw.manual else _scale_from_scores
        alpha = fit(s_in, ref, causal)
    d = tensor_value(q).shape[-1]
    literals = float_literals(hw.chain) | float_literals([hw.scores])
    derived = {1.0 / math.sqrt(d), 1.0 / d, 1.0}
    for lit in list(literals):
        if lit > 0:
            derived |= {lit, 1.0 / lit, math.sqrt(lit), 1.0 / math.sqrt(lit)}
    return snap(alpha, derived, rel=1e-6)


def _scale_from_scores(s_in, ref, causal) -> float:
    """The factor between the softmax's input and q k^T on the visible entries."""
    keep = causal & torch.isfinite(s_in)
    num = (s_in[keep] * ref[keep]).sum()
    den = (ref[keep] * ref[keep]).sum()
    if den <= 0:
        raise Rejected("degenerate scores")
    return float(num / den)


def _scale_from_probs(p, ref, causal) -> float:
    """The factor from probabilities: log p = scale * q k^T - (a per-row constant) on the
    visible entries, fitted with each row's mean taken out."""
    keep = (causal & (p > 0)).to(ref.dtype)
    logp = torch.where(p > 0, p, 1.0).log()
    n = keep.sum(-1, keepdim=True).clamp_min(1)
    dr = (ref - (ref * keep).sum(-1, keepdim=True) / n) * keep
    dl = (logp - (logp * keep).sum(-1, keepdim=True) / n) * keep
    den = (dr * dr).sum()
    if den <= 0:
        raise Rejected("degenerate scores")
    return float((dr * dl).sum() / den)


def _softmax_input(hw: _Handwritten) -> Node:
    return hw.softmax.args[0]


def _match_rows_layout(ref, s_in):
    """ref (B, H, R, T) in the layout of the region's scores: (B, H, R, T), (B*H, R, T), or
    grouped (B, Hkv, G, R, T) (query head h = j * G + g, the grouped-query convention)."""
    if tuple(ref.shape) == tuple(s_in.shape):
        return ref
    if s_in.dim() == 3 and ref.flatten(0, 1).shape == s_in.shape:
        return ref.flatten(0, 1)
    if s_in.dim() == 5 and s_in.shape[1] * s_in.shape[2] == ref.shape[1]:
        grouped = ref.unflatten(1, tuple(s_in.shape[1:3]))
        return grouped if grouped.shape == s_in.shape else None
    return None


def _verify_rows(
    ctx, hw, rows: _RowEvaluator, region, qs, ks, vs, scale, out_layout, mask_mode=None,
    decode=False, mask_layout=None, empty="nan",
) -> str | None:
    (q, ql), (k, kl), (v, vl) = qs, ks, vs
    try:
        with real_tensors():
            for sizes in ctx.sizes:
                for seed, q_scale in ((31, 1.0), (32, 8.0)):
                    given = {}
                    if mask_mode is not None:
                        given[hw.mask] = _random_mask(
                            hw.mask, mask_mode, sizes, seed, empty_row=seed == 32
                        )
                    feeds = region.feeds(sizes, seed=seed, scale={q: q_scale}, given=given)
                    a, bm, vp = rows.operands(feeds, sizes)
                    qq, kk, vv = (_to_bhtd(feeds[x], lay) for x, lay in ((q, ql), (k, kl), (v, vl)))
                    t = qq.shape[2]
                    b, h = qq.shape[0], qq.shape[1]
                    block = _block_rows(b * h * t)
                    starts = range(0, t, block) if seed == 31 else [0, max(0, t - block)]
                    for r0 in starts:
                        r1 = min(t, r0 + block)
                        got = rows.rows(feeds, sizes, a, bm, vp, r0, r1)
                        mask = None
                        if mask_mode is not None:
                            mask = _slice_rows(feeds[hw.mask], None, r0, r1)
                        ref = _reference_rows(
                            qq, kk, vv, scale, r0, r1, mask, mask_mode, not decode, mask_layout,
                            empty,
                        )  # fmt: skip
                        want = _adapt_out(ref, out_layout, kk.shape[1])
                        if not agree(got, want):
                            return f"it computes another function (rows {r0}..{r1 - 1})"
                        if seed == 31 and not torch.isfinite(got).any():
                            # NaN or infinite everywhere on the probe meant to show values
                            # (a one-element 'mask' drawn blocked) proves nothing
                            return f"the probe shows no finite output (rows {r0}..{r1 - 1})"
    except Rejected as why:
        return str(why)
    except Exception as why:  # noqa: BLE001
        return f"probe evaluation failed: {type(why).__name__}: {str(why).splitlines()[0][:160]}"
    return None


# ---------------------------------------------------------------------------------------


def anchors(graph: torch.fx.Graph) -> list[Node]:
    out = []
    for node in graph.nodes:
        if is_function(node, *SDPA):
            out.append(node)
        elif is_softmax(node):
            if tensor_value(node) is not None and tensor_value(node).dim() >= 2:
                out.append(node)
    if not any(is_exp(n) for n in graph.nodes):
        return out
    order = topo_order(graph)
    return sorted(out + _manual_anchors(graph), key=order.__getitem__)


def _exp_within(node: Node, hops: int) -> bool:
    if is_exp(node):
        return True
    return hops > 0 and any(_exp_within(i, hops - 1) for i in node_inputs(node))


def run(ctx: GraphContext, fuse: bool = True) -> list[Site]:
    """Every attention site; replaced by our op where proven (and ``fuse``)."""
    splits = _split_fused_score_adds(ctx.graph)
    _scalar_fills_in_where(ctx.graph)
    sites = []
    for node in anchors(ctx.graph):
        if not ctx.alive(node):
            continue
        if is_function(node, *SDPA):
            site = _sdpa(ctx, node, fuse)
        else:
            site = _handwritten(ctx, node, fuse)
        if site is not None:
            sites.append(site)
    _undo_unfused_splits(ctx.graph, splits)
    return sites


def _scalar_fills_in_where(graph: torch.fx.Graph) -> None:
    """``torch.where(c, s, torch.full_like(s, v))`` (either branch) becomes
    ``torch.where(c, s, v)``: the same values and dtype for a float ``s``, without an input
    that reads the scores (which the hand-written parse would take for a mask computed from
    them). The full_like stays only for another reader."""
    for node in list(graph.nodes):
        if not is_function(node, torch.where) or len(node.args) != 3 or node.kwargs:
            continue
        args = list(node.args)
        for i, j in ((1, 2), (2, 1)):
            fill, other = args[i], args[j]
            if not (is_function(fill, torch.full_like) and isinstance(fill, Node)):
                continue
            if fill.args[0] is not other or set(fill.kwargs) - {"fill_value"}:
                continue
            v = fill.args[1] if len(fill.args) > 1 else fill.kwargs.get("fill_value")
            ov = tensor_value(other)
            if not isinstance(v, (int, float)) or ov is None or not ov.dtype.is_floating_point:
                continue
            args[i] = float(v)
            node.args = tuple(args)
            if not fill.users:
                graph.erase_node(fill)
            break


def _is_baddbmm(node: Any) -> bool:
    return is_function(node, torch.baddbmm) or is_method(node, "baddbmm")


def _split_fused_score_adds(graph: torch.fx.Graph) -> list[tuple[tuple, Node]]:
    """``baddbmm(mask, q, k^T, beta=b, alpha=a)`` (scores and mask in one call, as Falcon and
    BLOOM write them) read by a softmax, rewritten as ``b * mask + a * (q @ k^T)`` so that the
    hand-written parse sees the product and the mask apart (the same function; with beta 0
    baddbmm does not read the first tensor, ``torch.empty`` in perf code, so neither does
    the rewrite: 0 * NaN would be NaN). The
    baddbmm leaves the graph (so that nothing reads q or k beside the rewrite); returns
    (how it was written, its replacement) for ``_undo_unfused_splits``."""
    splits = []
    for node in list(graph.nodes):
        if not _is_baddbmm(node) or len(node.args) < 3 or node.kwargs.keys() - {"beta", "alpha"}:
            continue
        if any(is_softmax(u) or is_exp(u) for u in _descendants(node, 4)):
            splits.append(_split_baddbmm(graph, node))
    return splits


def _split_baddbmm(graph: torch.fx.Graph, node: Node) -> tuple[tuple, Node]:
    added, batch1, batch2 = node.args[:3]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    new: list[Node] = []

    def call(fn, *args):
        with graph.inserting_after(new[-1] if new else node):
            new.append(graph.call_function(fn, args))
        return new[-1]

    scaled = call(torch.bmm, batch1, batch2)
    if alpha != 1:
        scaled = call(operator.mul, scaled, alpha)
    if isinstance(beta, (int, float)) and beta == 0:
        total = scaled  # beta 0: the added tensor is not read at all (NaN in it included)
    else:
        kept = call(operator.mul, added, beta) if beta != 1 else added
        total = call(operator.add, kept, scaled)
    propagate_fake(graph, new)
    node.replace_all_uses_with(total)
    # erasing a node clears its arguments: keep what restoring it needs
    written = (node.op, node.target, node.args, dict(node.kwargs), node.name, dict(node.meta))
    graph.erase_node(node)
    return written, total


def _undo_unfused_splits(graph: torch.fx.Graph, splits) -> None:
    """Where no fusion consumed a split, the baddbmm comes back as written."""
    for (op, target, args, kwargs, name, meta), total in splits:
        if total.graph is not graph or total not in graph.nodes or not total.users:
            continue
        with graph.inserting_before(total):
            restored = graph.create_node(op, target, args, kwargs, name)
        restored.meta = meta
        total.replace_all_uses_with(restored)
        erase_unused(graph, [total])


def _descendants(node: Node, hops: int) -> list[Node]:
    out, frontier = [], [node]
    for _ in range(hops):
        frontier = [u for n in frontier for u in n.users]
        out += frontier
    return out
