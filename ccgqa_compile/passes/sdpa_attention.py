"""``F.scaled_dot_product_attention`` (causal, GQA) -> ``torch.ops.ccgqa.gqa_attention``.

Why a pre-grad pass and not joint-graph patterns like the hand-written attention: by the
joint graph, SDPA has become a device-specific aten op (cuDNN, flash or efficient
attention on CUDA, ``_scaled_dot_product_flash_attention_for_cpu`` on CPU) with its own
backward op. Before autograd (Inductor's ``pre_grad_custom_pass``, on Dynamo's torch-level
graph) it is one call node whose arguments say exactly what it computes, so the rewrite is
a plain node replacement. AOTAutograd then traces our op with its registered backward.

A call is replaced when and only when our op computes the same function:
- 4-D (B, H, T, D) q, k, v of one dtype, no ``attn_mask``, ``dropout_p == 0``,
  ``is_causal=True`` and T_q == T_k (with T_q != T_k SDPA's causal mask is top-left
  aligned: a different function from what a KV-cache decode step means, never matched);
- query heads a multiple of key/value heads, through ``enable_gqa=True`` or through K/V
  repeated by ``repeat_kv`` (unsqueeze + expand + reshape) or ``repeat_interleave(dim=1)``
  feeding SDPA (then the un-repeated K/V go to our op; nothing is repeated);
- ``scale`` None (1/sqrt(D), as SDPA computes it) or a constant;
- outside autocast (SDPA casts under autocast; our op does not).
Then the policy: head dims above ``MAX_HEAD_DIM`` stay on SDPA, which is faster there.

Every SDPA call that is not replaced is recorded with its reason. The events are kept
until the joint-graph pass opens the fusion report's record of the same graph (it knows
whether the graph is a training or an inference graph; this pass runs before that is
decided) and are then written into it.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .. import reporting as report
from .._inductor_compat import current_compile_id, statically_known_true

FUSION = "gqa_attention"

# Policy. Our Triton kernel beats cuDNN SDPA only for small head dims: measured fwd+bwd on
# the H100 (causal GQA, bf16), ours vs SDPA's default backend: d=16 1.48x, d=32 1.34x,
# d=64 0.94x, d=128 0.82x (docs/benchmarks, 2026-11-24 evening). So only head dims <= 32
# are taken from SDPA; above, SDPA (cuDNN) stays. Hand-written attention is always fused: it is far slower than either.
MAX_HEAD_DIM = 32

_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
_SDPA_DEFAULTS = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}
_AUTOCAST_ENTERS = {torch.amp.autocast_mode._enter_autocast}

# views that only insert size-1 dims (x[:, :, None], x.unsqueeze(2))
_UNSQUEEZE_METHODS = {"unsqueeze"}
_RESHAPE_METHODS = {"reshape", "view", "flatten"}


# ---- pending report events: (compile id, kind, args) ----
_pending: list[tuple[str, str, tuple[Any, ...]]] = []


def record_pre_grad_event(kind: str, *args: Any) -> None:
    """Keep a pre-grad pass's fused/rejected event until the graph's report opens."""
    _pending.append((current_compile_id(), kind, args))


def flush_pending_reports() -> None:
    """Write this graph's SDPA events into the report record just opened for it.

    Called by the joint-graph pass right after it starts the graph's record. Events of
    another compilation (one served from the AOTAutograd cache, whose joint pass never
    ran) are dropped.
    """
    compile_id = current_compile_id()
    events = [e for e in _pending if e[0] == compile_id]
    _pending.clear()
    for _cid, kind, args in events:
        if kind == "fused":
            report.record_fusion(*args)
        else:
            report.record_rejection(*args)


# ---- reading the graph ----
def _val(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def _same(a: Any, b: Any) -> bool:
    """a == b, decided without adding a guard (False when it depends on a symbol)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def _same_shape(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _is_sdpa(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is _SDPA


def sdpa_arguments(node: torch.fx.Node) -> dict[str, Any] | None:
    """The SDPA call's arguments by name (defaults filled in), or None if unreadable."""
    if len(node.args) > len(_SDPA_PARAMS):
        return None
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    for name, value in node.kwargs.items():
        if name not in _SDPA_PARAMS:
            return None
        args[name] = value
    if not all(name in args for name in ("query", "key", "value")):
        return None
    return args


def _call_name(node: torch.fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


def _unrepeat_interleave(node: torch.fx.Node) -> torch.fx.Node | None:
    """x.repeat_interleave(G, dim=1) -> x (head h of the result is head h // G of x)."""
    is_method = node.op == "call_method" and node.target == "repeat_interleave"
    if not is_method and not (
        node.op == "call_function" and node.target is torch.repeat_interleave
    ):
        return None
    params = ("input", "repeats", "dim")
    args = dict(zip(params, node.args))
    args.update(node.kwargs)
    src, repeats, dim = args.get("input"), args.get("repeats"), args.get("dim")
    if not isinstance(src, torch.fx.Node) or not isinstance(repeats, int) or dim not in (1, -3):
        return None
    x, out = _val(src), _val(node)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not isinstance(out, torch.Tensor):
        return None
    b, h, t, d = x.shape
    if not _same_shape(tuple(out.shape), (b, h * repeats, t, d)):
        return None
    return src


def _is_singleton_insertion(node: torch.fx.Node) -> bool:
    """x[:, :, None] style indexing or unsqueeze: a view that only inserts size-1 dims."""
    if node.op == "call_method" and node.target in _UNSQUEEZE_METHODS:
        return True
    if node.op == "call_function" and node.target is torch.unsqueeze:
        return True
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1] if len(node.args) == 2 else None
        if not isinstance(index, tuple):
            index = (index,)
        return all(i is None or i is Ellipsis or i == slice(None) for i in index)
    return False


def _unrepeat_kv(node: torch.fx.Node) -> torch.fx.Node | None:
    """HF ``repeat_kv``: x[:, :, None].expand(B, H, G, T, D).reshape(B, H * G, T, D) -> x.

    Checked by the shapes of every step: inserting a size-1 dim, expanding only it, and a
    reshape from (B, H, G, T, D) to (B, H*G, T, D) (which, by row-major order, makes head
    h of the result head h // G of x) are each the only view between those shapes.
    """
    is_reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in (torch.reshape, torch.flatten)
    )
    if not is_reshape or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    expand = node.args[0]
    if expand.op != "call_method" or expand.target != "expand":
        return None
    unsqueezed = expand.args[0]
    if not isinstance(unsqueezed, torch.fx.Node) or not _is_singleton_insertion(unsqueezed):
        return None
    src = unsqueezed.args[0]
    if not isinstance(src, torch.fx.Node):
        return None
    x, u, e, out = (_val(n) for n in (src, unsqueezed, expand, node))
    if not all(isinstance(t, torch.Tensor) for t in (x, u, e, out)) or x.dim() != 4:
        return None
    b, h, t, d = x.shape
    g = e.shape[2] if e.dim() == 5 else None
    if g is None:
        return None
    if not (
        _same_shape(tuple(u.shape), (b, h, 1, t, d))
        and _same_shape(tuple(e.shape), (b, h, g, t, d))
        and _same_shape(tuple(out.shape), (b, h * g, t, d))
    ):
        return None
    return src


def _unrepeat(node: Any) -> tuple[Any, str | None]:
    if not isinstance(node, torch.fx.Node):
        return node, None
    src = _unrepeat_kv(node)
    if src is not None:
        return src, "sdpa_repeat_kv"
    src = _unrepeat_interleave(node)
    if src is not None:
        return src, "sdpa_repeat_interleave"
    return node, None


def _kv_pair(k: Any, v: Any) -> tuple[Any, Any, str | None]:
    """Take K/V from before a GQA repeat when both were repeated to the same heads."""
    k_src, k_idiom = _unrepeat(k)
    v_src, v_idiom = _unrepeat(v)
    if k_idiom and v_idiom:
        ks, vs = _val(k_src), _val(v_src)
        if _same_shape(tuple(ks.shape), tuple(vs.shape)):
            return k_src, v_src, k_idiom if k_idiom == v_idiom else "sdpa_repeat_mixed"
    return k, v, None


def _reject_reason_of_args(args: dict[str, Any]) -> str | None:
    if args["attn_mask"] is not None:
        return "attn_mask is given (only is_causal=True without a mask is fused)"
    dropout = args["dropout_p"]
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        return f"dropout_p={dropout} (attention dropout is not fused)"
    if args["is_causal"] is not True:
        return "not causal (is_causal is not True)"
    scale = args["scale"]
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale is not a constant"
    return None


def plan(node: torch.fx.Node, device_ok: bool) -> tuple[Any, ...] | str | None:
    """(q, k, v, scale, idiom) to replace ``node`` with, the reason not to, or None to skip
    silently (a CPU graph left to Inductor)."""
    args = sdpa_arguments(node)
    if args is None:
        return "unrecognised SDPA arguments"
    q_val = _val(args["query"])
    if isinstance(q_val, torch.Tensor) and q_val.device.type != "cuda" and not device_ok:
        return None
    reason = _reject_reason_of_args(args)
    if reason is not None:
        return reason
    if torch.is_autocast_enabled(q_val.device.type if isinstance(q_val, torch.Tensor) else "cpu"):
        return "autocast is on (SDPA casts its inputs; our op does not)"
    q, k, v = args["query"], args["key"], args["value"]
    vals = [_val(x) for x in (q, k, v)]
    if not all(isinstance(t, torch.Tensor) for t in vals):
        return "q, k, v have no example values"
    qv, kv, vv = vals
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        return "q, k, v must be 4-D (B, H, T, D)"
    if not qv.dtype == kv.dtype == vv.dtype:
        return "q, k, v dtypes differ"
    if not _same(qv.shape[2], kv.shape[2]):
        # no guard is added to make them equal: a graph compiled for T_q == T_k only
        # would be wrong for a decode step reusing it
        relation = "!=" if isinstance(qv.shape[2], int) else "not known to equal"
        return (
            f"query length {qv.shape[2]} {relation} key length {kv.shape[2]} (SDPA's "
            "is_causal is then top-left aligned)"
        )
    k, v, idiom = _kv_pair(k, v)
    kv, vv = _val(k), _val(v)
    b, h_q, t, d = qv.shape
    if not _same_shape(tuple(kv.shape), tuple(vv.shape)):
        return f"k {tuple(kv.shape)} and v {tuple(vv.shape)} differ"
    if not (_same(kv.shape[0], b) and _same(kv.shape[2], t) and _same(kv.shape[3], d)):
        return f"q {tuple(qv.shape)} and k {tuple(kv.shape)} do not pair"
    h_kv = kv.shape[1]
    if not (isinstance(h_q, int) and isinstance(h_kv, int) and h_q % h_kv == 0):
        return f"{h_q} query heads are not a (static) multiple of {h_kv} kv heads"
    if idiom is None:
        if h_q != h_kv and args["enable_gqa"] is not True:
            return "fewer kv heads than query heads without enable_gqa"
        idiom = "sdpa_enable_gqa" if h_q != h_kv else "sdpa_is_causal"
    if not isinstance(d, int):
        return "head dim is symbolic"
    scale = args["scale"]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if isinstance(t, int) and t == 1:
        # one key per query: the output is v itself and the gradients of q and k are zero;
        # nothing to gain from the op (whose backward would round them to tiny non-zeros)
        return "a single token: the attention output is v; left to Inductor"
    if d > MAX_HEAD_DIM:
        return f"head dim {d}: SDPA (cuDNN) is faster; left to Inductor"
    if qv.device.type == "cuda":
        from ..ops.gqa_attention import KERNEL_HEAD_DIMS

        if d not in KERNEL_HEAD_DIMS:
            return f"head dim {d} has no Triton kernel: SDPA is faster; left to Inductor"
    return q, k, v, scale, idiom


def _erase_dead_repeats(graph: torch.fx.Graph, heads: tuple[Any, ...]) -> None:
    """Drop the repeat chains that fed a replaced SDPA when nothing else uses them.

    Only the repeat's own view/copy nodes are erased (they have no side effects); a
    general dead-code pass is not safe on this non-functional graph.
    """
    for node in heads:
        while (
            isinstance(node, torch.fx.Node)
            and node in set(graph.nodes)
            and not node.users
            and (_call_name(node) in ("repeat_interleave", "expand") or _is_reshape_like(node))
        ):
            src = node.args[0]
            graph.erase_node(node)
            node = src


def _is_reshape_like(node: torch.fx.Node) -> bool:
    if node.op == "call_method" and node.target in _RESHAPE_METHODS | _UNSQUEEZE_METHODS:
        return True
    if node.op == "call_function" and node.target in (torch.reshape, torch.flatten):
        return True
    return _is_singleton_insertion(node)


def rewrite_sdpa(graph: torch.fx.Graph, device_ok: bool) -> int:
    """Replace every qualifying SDPA call in ``graph``; returns how many were replaced."""
    has_autocast = any(
        n.op == "call_function" and n.target in _AUTOCAST_ENTERS for n in graph.nodes
    )
    replaced = 0
    for node in list(graph.nodes):
        if not _is_sdpa(node):
            continue
        result = plan(node, device_ok)
        if result is None:
            continue
        if isinstance(result, tuple) and has_autocast:
            result = "inside an autocast region (SDPA casts its inputs; our op does not)"
        if isinstance(result, str):
            record_pre_grad_event("rejected", FUSION, "sdpa", node.name, result)
            continue
        q, k, v, scale, idiom = result
        args = sdpa_arguments(node)
        with graph.inserting_before(node):
            op = graph.call_function(torch.ops.ccgqa.gqa_attention.default, (q, k, v, scale))
            out = graph.call_function(operator.getitem, (op, 0))
        op.meta.update(node.meta)
        op.meta["example_value"] = _op_value(node, _val(q))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        _erase_dead_repeats(graph, (args["key"], args["value"]))
        record_pre_grad_event("fused", FUSION, idiom)
        replaced += 1
    return replaced


def _op_value(node: torch.fx.Node, q: torch.Tensor) -> Any:
    """Example value of the op's (output, logsumexp) pair, for the node's meta."""
    out = _val(node)
    try:
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    except Exception:  # meta is informative only; AOTAutograd re-traces the graph
        return None
    return (out, lse)


class SdpaAttentionPass(CustomGraphPass):
    """Inductor ``pre_grad_custom_pass``: SDPA calls -> ``torch.ops.ccgqa.gqa_attention``.

    ``uuid`` hashes this package's pass, op and kernel sources plus the switches, so
    the FX graph and AOTAutograd caches (torch 2.13 runs a pre-grad pass with a uuid after
    the cache lookup, and keys the cache on it) never serve a graph rewritten differently.
    """

    def __init__(self, fuse_on_cpu: bool | None = None) -> None:
        from .. import config

        self.fuse_on_cpu = config.fuse_on_cpu() if fuse_on_cpu is None else fuse_on_cpu

    def __call__(self, graph: torch.fx.Graph) -> None:
        from .. import ops  # noqa: F401  (registers torch.ops.ccgqa.*)

        rewrite_sdpa(graph, self.fuse_on_cpu)

    def uuid(self) -> Any:
        from . import _source_files

        extra = f"sdpa|{torch.__version__}|max_d={MAX_HEAD_DIM}|cpu={self.fuse_on_cpu}"
        return get_hash_for_files(_source_files(), extra)
