"""The CCGQA q/k prologue, recognised by what it computes (../shared/design/ccgqa.md, steps
3 to 6): from the projections q_pre, k_pre to the q and k an attention reads,

    q = rope(L2norm(conv2(conv1(q_pre)) + m_q) * s),  k = rope(L2norm(...) * s * beta),

with causal depthwise conv1 and per-head conv2 (biases optional), the qk-mean coupling
m_q / m_k or none, norm scale s, beta a per-kv-head (or shared) temperature or none, and
full, partial, rotate-half or pairwise RoPE or none.

It starts from an attention site's q and k (``attention.Site``) and looks for 1-D
convolutions among their ancestors: two per stream, or Zyphra's two shared by q and k
concatenated. The tensors those convolutions read (through pads, concatenations and
layout ops) are q_pre and k_pre; everything between them and the site is the region. The
op's arguments come from the convolutions (weights, biases, kernel sizes; the halves of a
shared one), the norm scale and temperature from output norms on probes, RoPE's tables from
the region's remaining inputs; each choice (qk-mean or not, conv1's bias applied before
the padding of conv2 or not, which input is the temperature, which table layout, which
eps) is decided on probes, and the whole candidate must agree with the region in float64:
random inputs, weights and tables, inputs scaled down to where eps decides, and every size
assignment a dynamic graph may run at. Near misses (convs that see later tokens, a mean over
other heads, another normalisation) agree with no candidate and stay as written.
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
from .._inductor_compat import specialize
from .attention import Site, layer_convolutions, new_keys, unrepeated
from .common import GraphContext, float_literals, forward_closure, is_training_graph
from .evaluate import Evaluator, NotEvaluable, Probes, agree, constant_value, real_tensors
from .fx_util import (
    PAD,
    ancestors,
    arg,
    computation_context,
    descendants,
    is_add,
    is_basic_index,
    is_cast,
    is_function,
    is_layout,
    is_method,
    is_size_value,
    is_zero_fill,
    node_inputs,
    requires_grad,
    runtime_inputs_of,
    same_computation,
    same_size,
    static_int,
    tensor_value,
    topo_order,
    view_chain,
)
from .region import Region, Rejected, emit, erase_unused, propagate_fake, stable_sort
from .rope import _table_options, lift_table_slices

FUSION = "ccgqa_prologue"


@dataclass
class Conv:
    node: Node
    weight: Node
    bias: Node | None
    groups: int
    kernel: int


@dataclass
class Plan:
    """Everything the op call needs, as graph nodes and constants."""

    q_pre: Node
    k_pre: Node
    heads: int
    kv_heads: int
    d: int
    # per stream (conv1, conv2); a shared conv appears in both, with ``q_first``
    q_convs: tuple[Conv, Conv]
    k_convs: tuple[Conv, Conv]
    shared: bool = False
    q_first: bool = True
    fold_bias: bool = False
    qk_mean: bool = True
    temp: Node | None = None
    # beta = temp / temp_scale: a temperature folded into k's norm scale
    # (``normalize(k) * (sqrt(d) * exp(t))``) reads sqrt(d) * beta
    temp_scale: float = 1.0
    norm_scale: float = 1.0
    eps: float = 1e-12
    eps_mode: str = "clamp"  # max(|x|, eps), |x| + eps or sqrt(|x|^2 + eps)
    # (name, tables, build, rotary_dim, interleaved[, first rotated dim])
    rope: tuple | None = None
    # "stock" or "seed": the original project's variant (per-head conv1, dense conv2, a
    # mean over all heads, no norm scale, one scalar temperature, full RoPE); the op
    # computes both, the seed's with qk_mean="all"
    kind: str = "stock"
    # a decode step: the convs run over each stream's cached columns (the conv state, for a
    # shared conv one tensor of both streams' channels) followed by the new ones, and the
    # op runs on that longer sequence; its last T positions are the step's q and k
    states: tuple = ()
    state_btc: bool = False  # the states laid out (B, S, C); else (B, C, S)
    state_len: int = 0
    state_q_first: bool = True  # one state of both streams: q's channels first
    # q_pre and k_pre laid out tokens first, (T, B, C) or (T, B, H, D): sequence-first code
    # (vLLM's and SGLang's token-flat hidden states unsqueezed to (T, 1, E))
    tokens_first: bool = False
    # q_pre and k_pre with no batch dim at all, (T, C) or (T, H, D): one sequence of
    # token-flat hidden states (serving code's ``forward(positions, hidden_states)``); the
    # op reads them as a batch of one
    no_batch: bool = False
    # k repeated to more heads before the norm (figliola's CCGQA repeats each kv head to
    # its G query heads first): the op's k, repeat_interleave'd this many times per head
    k_repeat: int = 1
    # the region scales q and k apart by factors whose product per kv-head group is the
    # op's (a temperature on q, a norm scale on one stream only): only the attention reads
    # q and k, through q @ k^T, so the op's q and k are proven by their products instead
    scores_only: bool = False
    # the op's temperature is ``temp`` to this power: a per-kv-head factor on both q and k
    # (sqrt(beta) on each) gives the scores its square
    temp_power: int = 1
    # a second factor of the temperature, where only q @ k^T is read: a 0-d logit scale
    # held in a buffer (moved from the scores onto q) times the per-kv-head temperature
    temp2: Node | None = None
    # a float known only when the program runs (``dynamic=True`` lifts a float attribute,
    # HF ZAYA's ``head_dim ** 0.5``, to a graph input) that q and k are both proportional
    # to: the op's outputs are multiplied by it (its value cannot be baked into the op)
    runtime_scale: Node | None = None

    def inputs(self) -> list[Any]:
        leaves: list[Any] = [self.q_pre, self.k_pre, *self.states]
        convs = [*self.q_convs] if self.shared else [*self.q_convs, *self.k_convs]
        for conv in convs:
            leaves += [conv.weight, conv.bias]
        leaves.append(self.temp)
        if self.temp2 is not None:
            leaves.append(self.temp2)
        if self.rope is not None:
            leaves += list(self.rope[1])
        if self.runtime_scale is not None:
            leaves.append(self.runtime_scale)
        return leaves


def _conv_of(node: Node) -> Conv | None:
    weight = arg(node, 1, "weight")
    bias = arg(node, 2, "bias")
    stride, padding, dilation = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1)
    groups = arg(node, 6, "groups", 1)
    if not isinstance(weight, Node) or not isinstance(groups, int):
        return None
    if _ints(stride) != (1,) or _ints(dilation) != (1,) or isinstance(padding, str):
        return None
    w = tensor_value(weight)
    if w is None or w.dim() != 3 or not isinstance(w.shape[-1], int):
        return None
    return Conv(node, weight, bias if isinstance(bias, Node) else None, groups, w.shape[-1])


def _ints(x) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _chain_heads(convs: list[Node]) -> list[Node]:
    """The convolutions of ``convs`` no other one feeds: each chain's first."""
    return [c for c in convs if not any(o in ancestors([c.args[0]]) for o in convs if o is not c)]


def _conv_sources(conv: Node, b=None, t=None) -> list[Node]:
    """The tensors a conv reads through pads, concatenations (zeros made in the graph are
    padding), casts and layout ops; with
    the batch and length ``b``, ``t``: a (B, T, ...) view of tokens flattened (B*T, C) (a
    projection computed as a 2-D matmul, ``addmm(bias, x.view(B*T, E), W.t()).view(B, T,
    C)``) is the source, not the flat tensor."""
    out, todo, seen = [], [conv.args[0]], set()
    while todo:
        node = todo.pop(0)
        if not isinstance(node, Node) or node in seen:
            continue
        seen.add(node)
        if b is not None and _views_flat_tokens(node, b, t):
            out.append(node)
        elif is_function(node, *PAD) or is_layout(node) or is_cast(node) or _adds_axes(node):
            todo.append(node.args[0])
        elif (window := _split_part(node)) is not None:  # a stream's channels of both's
            todo.append(window)
        elif is_function(node, torch.cat):
            # zeros the graph makes are padding, as a pad's are (a run-time state is not)
            todo.extend(p for p in node.args[0] if isinstance(p, Node) and not is_zero_fill(p))
        else:
            out.append(node)
    return out


def _views_flat_tokens(node: Node, b, t) -> bool:
    """``node`` is a batch-first (B, T, ...) view of a (B*T, C) tensor."""
    if not is_layout(node) or _as_btc(node, b, t) not in ("btc", "bthd"):
        return False
    src = tensor_value(node.args[0]) if isinstance(node.args[0], Node) else None
    return (
        src is not None and src.dim() == 2 and isinstance(b, int) and b > 1
        and same_size(src.shape[0], b * t)
    )  # fmt: skip


def _adds_axes(node: Node) -> bool:
    """``x[:, :, None]``: a view of all of x with unit axes inserted (a conv2d's input)."""
    if not is_basic_index(node):
        return False
    items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is None or i is Ellipsis or i == slice(None) for i in items)


def _split_part(node: Node) -> Node | None:
    """The window ``node`` is one stream's channels of, or None: ``x.split(...)[i]`` /
    ``torch.chunk(x, ...)[i]`` / ``x[:, :C]`` (a slice along one axis) of a concatenation
    ``x`` (a decode step's window: conv state and new columns of both streams). A part of
    anything else (a fused qkv projection) is a source itself."""
    if not is_function(node, operator.getitem) or not isinstance(node.args[0], Node):
        return None
    src = node.args[0]
    if _slices_one_axis(node):
        window = src
    elif is_method(src, "split", "chunk", "tensor_split") or is_function(
        src, torch.split, torch.chunk, torch.tensor_split
    ):
        window = src.args[0]
    else:
        return None
    whole = window
    while is_layout(whole) or is_cast(whole):
        whole = whole.args[0]
    return window if is_function(whole, torch.cat) else None


def _slices_one_axis(node: Node) -> bool:
    """``x[:, a:b]``: a step-1 slice along one axis, every other axis whole."""
    items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not all(isinstance(i, slice) or i is Ellipsis for i in items):
        return False
    cut = [i for i in items if isinstance(i, slice) and i != slice(None)]
    return len(cut) == 1 and cut[0].step in (None, 1)


def _as_btc(node: Node, b, t) -> str | None:
    """How a source is (B, T, C): "btc" as is, "bthd" flattened, "tbc" / "tbhd" tokens
    first (transposed, then flattened), and where the batch is one, "tc" / "thd" with no
    batch dim (flattened, then a unit batch dim put in front)."""
    v = tensor_value(node)
    if v is None or v.dim() not in (2, 3, 4, 5):
        return None
    if v.dim() == 5:  # (B, T, Hkv, G, D): q heads grouped by kv head, read flattened
        return "bthd" if same_size(v.shape[0], b) and same_size(v.shape[1], t) else None
    if v.dim() > 2 and same_size(v.shape[0], b) and same_size(v.shape[1], t):
        return "btc" if v.dim() == 3 else "bthd"
    if v.dim() > 2 and same_size(v.shape[0], t) and same_size(v.shape[1], b):
        return "tbc" if v.dim() == 3 else "tbhd"
    if isinstance(b, int) and b == 1 and v.dim() < 4 and same_size(v.shape[0], t):
        return "tc" if v.dim() == 2 else "thd"
    return None


_LAYOUT_KINDS = {"btc": "batch_first", "bthd": "batch_first", "tbc": "tokens_first",
                 "tbhd": "tokens_first", "tc": "no_batch", "thd": "no_batch"}  # fmt: skip


def _stream_layout(sources: list[Node], b, t) -> dict[str, bool] | None:
    """The plan's layout flags for sources all batch first, all tokens first or all with
    no batch dim; None when mixed. A (T, T, C) source (B == T) reads batch first; the
    probes reject the wrong reading."""
    kinds = {_LAYOUT_KINDS.get(_as_btc(x, b, t)) for x in sources}
    if len(kinds) != 1 or None in kinds:
        return None
    kind = kinds.pop()
    return {"tokens_first": kind == "tokens_first", "no_batch": kind == "no_batch"}


_BATCH_FIRST = {"tokens_first": False, "no_batch": False}


def _width(node: Node, b, t) -> int:
    """A source's channels (H*D) in the layout ``_as_btc`` reads it."""
    v = tensor_value(node)
    if _as_btc(node, b, t) in ("tc", "thd"):
        return math.prod(v.shape[1:])
    return math.prod(v.shape[2:])


def _site_heads(site: Site) -> tuple[int, int, int] | str:
    """(Hq, Hkv, D) of the site's q and k, or why they are not 4-D with static heads."""
    qv, kv = tensor_value(site.q), tensor_value(site.k)
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
        return "the attention's q and k are not 4-D"
    hq, hkv, d = qv.shape[1], kv.shape[1], qv.shape[3]
    if not all(isinstance(x, int) for x in (hq, hkv, d)):
        return "head counts or head dim are symbolic"
    return hq, hkv, d


def _kv_head_counts(hq: int, hkv: int) -> list[int]:
    """The site's k heads, then fewer whose heads the code may repeat to them before the
    norm (dividing both head counts), most first."""
    return [h for h in range(hkv, 0, -1) if hkv % h == 0 and hq % h == 0]


def _plans(site: Site) -> list[Plan] | str:
    """The plans for the site's k heads; failing those, for fewer kv heads whose k the
    code repeats to the site's heads before the norm (then the attention reads repeats)."""
    heads = _site_heads(site)
    if isinstance(heads, str):
        return heads
    hq, hkv, _ = heads
    first = None
    for real in _kv_head_counts(hq, hkv):
        plans = _plans_for(site, real)
        if isinstance(plans, list):
            return [replace(p, k_repeat=hkv // real) for p in plans]
        first = first or plans
    return first


def _plans_for(site: Site, hkv: int) -> list[Plan] | str:
    qv = tensor_value(site.q)
    b, hq, t, d = qv.shape
    convs = layer_convolutions([site.q, site.k])
    parsed = [_conv_of(n) for n in convs]
    if not convs:
        return "no convolution feeds q and k"
    if any(c is None for c in parsed):
        return "a convolution with stride, dilation or string padding"
    heads = _chain_heads(convs)
    firsts = [c for c in parsed if c.node in heads]
    chains = []
    for c1 in firsts:
        seconds = [c for c in parsed if c is not c1 and c1.node in ancestors([c.node.args[0]])]
        if len(seconds) != 1:
            return f"{c1.node.name} does not feed exactly one second convolution"
        chains.append((c1, seconds[0]))
    if len(chains) * 2 != len(parsed):
        return f"{len(parsed)} convolutions do not pair into conv1 -> conv2 chains"
    cq, ckv = hq * d, hkv * d
    plans = []
    if len(chains) == 1:
        c1, c2 = chains[0]
        sources = _conv_sources(c1.node, b, t)
        if len(sources) not in (2, 3):
            return f"the shared convolution reads {len(sources)} tensors, not q_pre and k_pre"
        for first, second in [(x, y) for x in sources for y in sources if x is not y]:
            if _as_btc(first, b, t) is None or _as_btc(second, b, t) is None:
                continue
            if _width(first, b, t) != cq or _width(second, b, t) != ckv:
                continue
            rest = [x for x in sources if x is not first and x is not second]
            state = _state_form(rest, b, cq + ckv)
            layout = _stream_layout([first, second], b, t)
            if state is None or layout is None or (state and layout != _BATCH_FIRST):
                continue
            q_first = sources.index(first) < sources.index(second)
            plans.append(Plan(first, second, hq, hkv, d, (c1, c2), (c1, c2), shared=True,
                              q_first=q_first, state_q_first=q_first, **layout, **state))  # fmt: skip
    elif len(chains) == 2:
        for qc, kc in (chains, chains[::-1]):
            if qc[1].node not in ancestors([site.q]) or kc[1].node not in ancestors([site.k]):
                continue
            if _out_channels(qc[1]) != cq or _out_channels(kc[1]) != ckv:
                continue  # (both feed q and k where one tensor of both is split after)
            qs, ks = _conv_sources(qc[0].node, b, t), _conv_sources(kc[0].node, b, t)
            q_pre = [x for x in qs if _as_btc(x, b, t) is not None and _width(x, b, t) == cq]
            k_pre = [x for x in ks if _as_btc(x, b, t) is not None and _width(x, b, t) == ckv]
            if len(q_pre) != 1 or len(k_pre) != 1:
                continue
            pres = (q_pre[0], k_pre[0])
            q_rest = [x for x in qs if x not in pres]
            k_rest = [x for x in ks if x not in pres]
            layout = _stream_layout(list(pres), b, t)
            if layout is None or (layout != _BATCH_FIRST and (q_rest or k_rest)):
                continue  # mixed layouts; a tokens-first decode step's states: not taken
            base = Plan(q_pre[0], k_pre[0], hq, hkv, d, qc, kc, **layout)
            if q_rest and q_rest == k_rest:  # one state of both streams, split by channels
                state = _state_form(q_rest, b, cq + ckv)
                if state is not None:
                    plans += [replace(base, state_q_first=f, **state) for f in (True, False)]
                continue
            q_state, k_state = _state_form(q_rest, b, cq), _state_form(k_rest, b, ckv)
            if q_state is None or k_state is None or bool(q_state) != bool(k_state):
                continue
            if q_state and (q_state["state_btc"], q_state["state_len"]) != (
                k_state["state_btc"], k_state["state_len"]
            ):
                continue
            state = {**q_state, "states": q_state.get("states", ()) + k_state.get("states", ())}
            plans.append(replace(base, **(state if q_state else {})))
    else:
        return f"{len(parsed)} convolutions: not two per stream or two shared"
    if not plans:
        return "the convolutions' inputs are not q_pre (B, T, Hq*D) and k_pre (B, T, Hkv*D)"
    out = []
    for plan in plans:
        if not plan.shared and not plan.states and _seed_shapes(plan):
            out.append(replace(plan, kind="seed"))
            continue
        problem = _conv_shapes_problem(plan)
        if problem is not None:
            return problem
        biased = plan.q_convs[0].bias is not None or plan.k_convs[0].bias is not None
        for fold in ((False, True) if biased else (False,)):
            for qk_mean in (True, False):
                out.append(replace(plan, fold_bias=fold, qk_mean=qk_mean))
    return out


def _out_channels(conv: Conv):
    return tensor_value(conv.weight).shape[0]


def _state_form(rest: list[Node], b, channels: int) -> dict | None:
    """Of a conv's inputs other than the new columns: nothing ({}), or one conv state of
    shape (B, C, S) or (B, S, C) (the cached columns of a decode step) as Plan fields;
    None when they are something else."""
    if not rest:
        return {}
    if len(rest) != 1:
        return None
    v = tensor_value(rest[0])
    # one state for every sequence (a zero buffer (1, C, S) expanded: causal padding kept
    # as a state) broadcasts over the batch
    if v is None or v.dim() != 3 or not (same_size(v.shape[0], b) or same_size(v.shape[0], 1)):
        return None
    # (sizes Dynamo fixed to numbers, dynamic=True's 0/1 specialisation among them, are
    # SymInts still: ``static_int``)
    dims = [static_int(n) for n in v.shape]
    if dims[1] == channels and isinstance(dims[2], int):
        return {"states": (rest[0],), "state_btc": False, "state_len": dims[2]}
    if dims[2] == channels and isinstance(dims[1], int):
        return {"states": (rest[0],), "state_btc": True, "state_len": dims[1]}
    return None


def _extended(plan: Plan, states: list[Any], q_pre, k_pre):
    """q_pre and k_pre (B, T, C) with each stream's cached columns in front (B, S + T, C)."""
    batch = q_pre.shape[0]
    cols = [(x if plan.state_btc else x.transpose(1, 2)).expand(batch, -1, -1) for x in states]
    if len(cols) == 1:  # both streams' channels
        cq, ckv = plan.heads * plan.d, plan.kv_heads * plan.d
        (both,) = cols
        first = plan.state_q_first
        q_cols, k_cols = (both[..., :cq], both[..., cq:]) if first else (both[..., ckv:], both[..., :ckv])
    else:
        q_cols, k_cols = cols
    return torch.cat([q_cols.to(q_pre.dtype), q_pre], 1), torch.cat([k_cols.to(k_pre.dtype), k_pre], 1)


def _rows_in_front(table, n: int):
    """A RoPE table (..., T, r) with n rows of zeros in front: the cached positions, whose
    outputs are dropped."""
    if table is None or n == 0:
        return table
    return F.pad(table, (0, 0, n, 0))  # traced with proxies too: no shape arithmetic


def _seed_shapes(plan: Plan) -> bool:
    """Per-head conv1 (C, D, K1) and dense conv2 (C, C, K2), no biases: the seed's convs."""
    for (c1, c2), heads in ((plan.q_convs, plan.heads), (plan.k_convs, plan.kv_heads)):
        channels = heads * plan.d
        w1, w2 = tensor_value(c1.weight), tensor_value(c2.weight)
        if tuple(w1.shape) != (channels, plan.d, c1.kernel) or c1.groups != heads:
            return False
        if tuple(w2.shape) != (channels, channels, c2.kernel) or c2.groups != 1:
            return False
        if c1.bias is not None or c2.bias is not None:
            return False
    return True


def _conv_shapes_problem(plan: Plan) -> str | None:
    c_total = (plan.heads + plan.kv_heads) * plan.d if plan.shared else None
    for name, (c1, c2), width, heads in (
        ("q", plan.q_convs, plan.heads * plan.d, plan.heads),
        ("k", plan.k_convs, plan.kv_heads * plan.d, plan.kv_heads),
    ):
        channels = c_total or width
        w1, w2 = tensor_value(c1.weight), tensor_value(c2.weight)
        if tuple(w1.shape) != (channels, 1, c1.kernel) or c1.groups != channels:
            return f"{name} conv1 is not depthwise (weight {tuple(w1.shape)}, groups {c1.groups})"
        groups2 = (plan.heads + plan.kv_heads) if plan.shared else heads
        if tuple(w2.shape) != (channels, plan.d, c2.kernel) or c2.groups != groups2:
            return f"{name} conv2 is not grouped per head (weight {tuple(w2.shape)}, groups {c2.groups})"
    return None


# ---------------------------------------------------------------------------------------
# the candidate
# ---------------------------------------------------------------------------------------


def _flat(x, source: Node, plan: Plan):
    """A (B, T, H, D) source as (B, T, H*D), a tokens-first one transposed first, one with
    no batch dim flattened and given a unit batch dim; decided on the graph node (x may be
    a proxy)."""
    if plan.no_batch:
        x = x.flatten(1) if tensor_value(source).dim() == 3 else x
        return x.unsqueeze(0)
    x = x.transpose(0, 1) if plan.tokens_first else x
    return x.flatten(2) if tensor_value(source).dim() >= 4 else x


def _flat_streams(plan: Plan, q_pre, k_pre):
    """The plan's q_pre and k_pre values as the op reads them, (B, T, C) each."""
    return _flat(q_pre, plan.q_pre, plan), _flat(k_pre, plan.k_pre, plan)


def _bias_folded(plan: Plan, chain: list[Any]) -> list[Any]:
    """A conv chain's (w1, b1, w2, b2) with conv1's bias folded into conv2's where the
    plan says the sequence is padded once, in front of conv1 (its bias then reaches
    conv2's padding too)."""
    w1, b1, w2, b2 = chain
    if not plan.fold_bias or b1 is None:
        return chain
    folded = _fold(w2, b1, plan.d)
    return [w1, None, w2, folded if b2 is None else b2 + folded]


def _fold(w2, b1, d):
    """conv2's response to conv1's bias held constant: what Zyphra's single padding adds."""
    channels = w2.shape[0]
    b1g = b1.view(channels // d, d).repeat_interleave(d, dim=0)
    return (w2.sum(-1) * b1g).sum(-1)


def _half(x, plan: Plan, stream: str):
    """q's or k's channels of a weight or bias shared by the concatenated streams."""
    if x is None:
        return None
    cq, ckv = plan.heads * plan.d, plan.kv_heads * plan.d
    if stream == "q":
        return x[:cq] if plan.q_first else x[ckv:]
    return x[cq:] if plan.q_first else x[:ckv]


# where the conv biases sit in the plan's inputs after q_pre, k_pre and the states (a bias
# added apart may be laid out (H, D) or (C, 1): the op reads it flat)
_BIAS_POSITIONS = {True: (1, 3), False: (1, 3, 5, 7)}


def op_arguments(plan: Plan, values: list[Any]) -> list[Any]:
    """The op's positional arguments from the plan's inputs (graph proxies or tensors)."""
    if plan.runtime_scale is not None:  # applied to the op's outputs (``candidate``)
        values = values[:-1]
    q_pre, k_pre, *rest = values
    q_x, k_x = _flat_streams(plan, q_pre, k_pre)
    if plan.states:
        q_x, k_x = _extended(plan, rest[: len(plan.states)], q_x, k_x)
        rest = rest[len(plan.states) :]
    rest = [x.reshape(-1) if i in _BIAS_POSITIONS[plan.shared] and x is not None else x for i, x in enumerate(rest)]
    if plan.shared:
        chain = _bias_folded(plan, rest[:4])
        rest = rest[4:]
        q_args = [_half(x, plan, "q") for x in chain]
        k_args = [_half(x, plan, "k") for x in chain]
    else:
        q_args, k_args = _bias_folded(plan, rest[:4]), _bias_folded(plan, rest[4:8])
        rest = rest[8:]
    temp, tables = rest[0], rest[1:]
    if plan.temp2 is not None:
        temp, tables = temp.reshape(-1) * tables[0].reshape(-1), tables[1:]
    cos = sin = None
    rotary_dim, interleaved, rotary_start = 0, False, 0
    if plan.rope is not None:
        cos, sin = plan.rope[2](*tables)
        cos, sin = _rows_in_front(cos, plan.state_len), _rows_in_front(sin, plan.state_len)
        rotary_dim, interleaved, rotary_start = plan.rope[3], plan.rope[4], _rotary_start(plan)
    if temp is not None:
        temp = temp.reshape(-1)
        if plan.temp_power == 2:
            temp = temp * temp
        if plan.temp_scale != 1.0:
            temp = temp / plan.temp_scale
    return [
        q_x, k_x, *q_args, *k_args, temp, cos, sin,
        plan.heads, plan.kv_heads, _qk_mean(plan), "raw" if temp is not None else "none",
        plan.norm_scale, plan.eps, rotary_dim, interleaved, plan.eps_mode, rotary_start,
    ]  # fmt: skip


def _rotary_start(plan: Plan) -> int:
    return plan.rope[5] if plan.rope is not None and len(plan.rope) > 5 else 0


def _qk_mean(plan: Plan) -> str:
    """The op's qk_mean for the plan: the seed's is over all heads."""
    if plan.kind == "seed":
        return "all"
    return "group" if plan.qk_mean else "none"


def candidate(plan: Plan):
    def prologue(*values, out_dtypes):
        q, k = torch.ops.ccgqa.ccgqa_prologue(*op_arguments(plan, list(values)))
        if plan.states:  # the step's own positions
            q, k = q[:, :, plan.state_len :], k[:, :, plan.state_len :]
        if plan.k_repeat > 1:
            k = k.repeat_interleave(plan.k_repeat, dim=1)
        if plan.runtime_scale is not None:
            q, k = q * values[-1], k * values[-1]
        return q, k

    return prologue


# ---------------------------------------------------------------------------------------
# deciding the choices on probes
# ---------------------------------------------------------------------------------------


class _Probe:
    """The region's outputs on one set of inputs, cached for every candidate."""

    def __init__(self, ctx, region: Region, sizes, seed: int, given=None, scale=None, tables=None):
        """``tables``: draws the RoPE tables (a seed -> {table: value}), else they are
        random like every other input."""
        given = {**(tables(sizes, seed) if tables is not None else {}), **(given or {})}
        given = {**_runtime_scalar_values(region, seed), **given}
        self.feeds = region.feeds(sizes, seed=seed, given=given, scale=scale)
        self.expected = region.evaluate(self.feeds, sizes)

    def matches(self, plan: Plan, rtol=1e-8) -> bool:
        values = [self.feeds[n] if isinstance(n, Node) else n for n in plan.inputs()]
        try:
            actual = candidate(plan)(*values, out_dtypes=[None, None])
        except (RuntimeError, ValueError, IndexError):
            return False
        if plan.scores_only:
            return agree(_scores(*actual), _scores(*self.expected), rtol)
        return all(agree(a, e, rtol) for a, e in zip(actual, self.expected))


def _runtime_scalar_values(region: Region, seed: int) -> dict[Node, float]:
    """Each probe draws the run-time scalars anew (a different value per seed): a
    candidate that read one draw's value as a constant fails the next probe."""
    return {n: 0.5 + 0.3 * ((seed + i) % 7) for i, n in enumerate(region.runtime_scalars())}


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q @ k^T per query head, (B, Hq, T, S), k's heads each serving a group of q's."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q @ k.transpose(-2, -1)


def _per_head_norms(x: torch.Tensor) -> torch.Tensor:
    """The median vector norm of each head of a (B, H, T, D) tensor."""
    return x.norm(dim=-1).transpose(0, 1).reshape(x.shape[1], -1).median(dim=1).values


def _norm_scale_choices(plan: Plan, q_out, k_out, bilinear: bool, literals) -> list[tuple]:
    """(norm scale, per-kv-head temperature beta, scores_only) readings of the probe's
    output norms: q's norm is the norm scale and k's over it beta; where only the
    attention reads q and k, also any split of each group's product of q's and k's norms
    into norm scale squared times beta."""
    kv_heads = plan.kv_heads
    norm_scale = float(q_out.norm(dim=-1).median())
    kn = (k_out.norm(dim=-1) / norm_scale).transpose(0, 1).reshape(kv_heads, -1)
    choices = [(_snap_scale(norm_scale, plan.d, literals), kn.median(dim=1).values, False)]
    if not bilinear:
        return choices
    q_heads, k_heads = _per_head_norms(q_out), _per_head_norms(k_out)
    groups = q_heads.numel() // k_heads.numel()
    product = (q_heads * k_heads.repeat_interleave(groups)).view(kv_heads, -1)
    if not torch.allclose(product, product[:, :1].expand_as(product), rtol=1e-6, atol=0):
        return choices  # q's scale differs within a kv head's group: no op's
    product = product[:, 0]
    observed = (float(q_heads.median()), float(k_heads.median()), math.sqrt(float(product.median())))
    scales = [math.sqrt(plan.d), 1.0, *(_snap_scale(x, plan.d, literals) for x in observed)]
    for scale in dict.fromkeys(x for x in scales if x > 0):
        choices.append((scale, product / scale**2, True))
    return choices


def _table_leaves(region: Region, plan: Plan) -> list[Node]:
    used = {plan.q_pre, plan.k_pre, *plan.states}
    for conv in (*plan.q_convs, *plan.k_convs):
        used |= {conv.weight, conv.bias}
    return [n for n in region.float_leaves() if n not in used]


def _runtime(node: Node) -> bool:
    from .fx_util import depends_on_tensor_input

    return depends_on_tensor_input(node)


def _constant_tables(tables: list[Node], sizes, one: int = 0) -> dict[Node, torch.Tensor]:
    """Tables that make any RoPE layout a rotation by 0 or 90 degrees (norm-preserving):
    table ``one`` (slot ``one`` of a pairs table) all ones, the others zeros."""
    out = {}
    for i, node in enumerate(tables):
        shape = Probes(sizes, tensor_value(node).device).shape(node)
        v = tensor_value(node)
        if v.dtype.is_complex:
            out[node] = torch.ones(shape, dtype=torch.complex128, device=v.device)
        elif _pairs_table(tables):  # (..., 2): cos and sin side by side
            out[node] = torch.zeros(shape, dtype=torch.float64, device=v.device)
            out[node][..., one] = 1.0
        else:
            out[node] = torch.full(shape, 1.0 if i == one else 0.0, dtype=torch.float64, device=v.device)
    return out


def _pairs_table(tables: list[Node]) -> bool:
    """One real table holding cos and sin along its last axis (gpt-fast, torchtune)."""
    if len(tables) != 1:
        return False
    v = tensor_value(tables[0])
    return not v.dtype.is_complex and v.dim() >= 2 and v.shape[-1] == 2


def _constant_assignments(tables: list[Node]) -> int:
    """How many ways the ones may be placed: in each table, or in each slot of a pairs table."""
    return 2 if _pairs_table(tables) else max(len(tables), 1)


def _distinct_constant_tables(graph, tables: list[Node], sizes):
    """Tables computed apart with equal values (cos/sin built once for q, once for k) are
    one table: (the distinct ones, {duplicate: the one it equals}). Constants (built from
    sizes) by value; tables read from the program's inputs (buffers sliced once per call
    of a RoPE helper) by the computation that reads them."""
    distinct: list[Node] = []
    values: dict[Node, torch.Tensor] = {}
    same_as: dict[Node, Node] = {}
    context = computation_context(graph)
    for node in tables:
        if _runtime(node):
            rep = next((r for r in distinct if same_computation(node, r, context)), None)
            if rep is None:
                distinct.append(node)
            else:
                same_as[node] = rep
            continue
        v = constant_value(graph, node, sizes)
        rep = next(
            (r for r in distinct if r in values and values[r].shape == v.shape
             and torch.equal(values[r], v)), None,
        )  # fmt: skip
        if rep is None:
            distinct.append(node)
            values[node] = v
        else:
            same_as[node] = rep
    return distinct, same_as


def _unscaled_reason(q_out, k_out, products: bool) -> str:
    """Why no norm scale and temperature read q's and k's norms: rows of q (or of one kv
    head of k) of different norms are no L2 norm over each head's dims times a scale;
    else k's scale per kv head is no temperature input's."""
    if not products:
        for name, x in (("q", q_out), ("k", k_out)):
            norms = x.norm(dim=-1).transpose(0, 1).reshape(x.shape[1], -1)
            spread = (norms.amax(dim=1) - norms.amin(dim=1)) / norms.amax(dim=1).clamp_min(1e-300)
            if bool((spread > 1e-6).any()):
                return (f"{name}'s rows are not of one norm per head: no L2 norm over each "
                        "head's dims times a scale")  # fmt: skip
    return "k's scale matches no per-kv-head input (temperature)"


def _phase_a(base: Plan, plans: list[Plan], probes, temps, tables, literals, products: bool) -> Plan | str:
    """Phase A of ``_decide`` on one assignment of constant tables: the norm scale and
    temperature from the output norms (``products``: from q's and k's products only),
    then the first plan, temperature and table form both probes agree with; else why not."""
    probe_a, again = probes
    kv_heads = base.kv_heads
    outputs = probe_a.expected
    if base.runtime_scale is not None:  # the norms read without the run-time factor
        outputs = [x / probe_a.feeds[base.runtime_scale] for x in outputs]
    size = {n: probe_a.feeds[n].reshape(-1).abs().expand(kv_heads) for n in temps}
    temp_choices: list[tuple[Node | None, float, int, float, bool]] = []
    for norm_scale, beta, scores_only in _norm_scale_choices(base, *outputs, products, literals):
        if scores_only != products:
            continue
        for n in temps:
            t = size[n]
            for power in (1, 2) if scores_only else (1,):
                for scale in dict.fromkeys((1.0, norm_scale)):
                    if torch.allclose(t**power / scale, beta, rtol=1e-6, atol=0):
                        temp_choices.append((n, scale, power, norm_scale, scores_only))
        if torch.allclose(beta, torch.ones_like(beta), rtol=1e-6, atol=0):
            temp_choices.append((None, 1.0, 1, norm_scale, scores_only))
        if scores_only:  # two factors, one on each side (a logit scale buffer and beta)
            for a, b in itertools.combinations(temps, 2):
                t = size[a] * size[b]
                for scale in dict.fromkeys((1.0, norm_scale)):
                    if torch.allclose(t / scale, beta, rtol=1e-6, atol=0):
                        temp_choices.append(((a, b), scale, 1, norm_scale, scores_only))
    if not temp_choices:
        return _unscaled_reason(*outputs, products)
    for plan in plans:
        for temp, temp_scale, power, norm_scale, scores_only in temp_choices:
            if plan.kind == "seed" and (temp_scale != 1.0 or scores_only):
                continue  # the seed op reads its temperature as it is
            temp, temp2 = temp if isinstance(temp, tuple) else (temp, None)
            cand = replace(
                plan, temp=temp, temp2=temp2, temp_scale=temp_scale, temp_power=power,
                norm_scale=norm_scale, eps=1e-12, scores_only=scores_only,
            )  # fmt: skip
            for with_rope in _with_identity_rope(cand, tables):
                if probe_a.matches(with_rope, rtol=1e-7) and again.matches(with_rope, rtol=1e-7):
                    return with_rope
    return "no conv / qk-mean / temperature choice agrees with the region"


def _decide(
    ctx: GraphContext, region: Region, plans: list[Plan], bilinear: bool, draw_tables=None
) -> Plan | str:
    """The first plan whose choices the probes prove; ``bilinear``: only the attention
    reads q and k (then their products may prove it, ``Plan.scores_only``);
    ``draw_tables``: how the probes draw the RoPE tables (``_rotation_tables``), else at
    random."""
    sizes = ctx.sizes[0]
    scalars = region.runtime_scalars()
    if len(scalars) > 1:
        return f"{len(scalars)} run-time scalars ({scalars[0].name}, ...): at most one scale is known"
    if scalars:
        plans = [replace(p, runtime_scale=scalars[0]) for p in plans]
    base = plans[0]
    tables_and_temps = _table_leaves(region, base)
    kv_heads = base.kv_heads
    temps = [
        n for n in tables_and_temps
        if _runtime(n) and tensor_value(n).numel() in (1, kv_heads)
        and not _has_time_dim(n, region)
    ]  # fmt: skip
    with real_tensors():
        # phase A: tables constant (RoPE is then a rotation by 0 or 90 degrees): norms give
        # the norm scale and the temperature; the rest of the choices are checked there
        tables = [n for n in tables_and_temps if n not in temps and _has_time_dim(n, region)]
        _specialize_table_widths(tables, region)
        others = [n for n in tables_and_temps if n not in temps + tables and _runtime(n)]
        if others:
            plans = _with_added_biases(region, plans, others)
            if isinstance(plans, str):
                return plans
        learned = [n for n in tables if requires_grad(n)]
        if learned:
            return f"the RoPE table {learned[0].name} requires grad (the op gives tables none)"
        tables, same_as = _distinct_constant_tables(region.graph, tables, sizes)
        if len(tables) > 3:  # the op reads one RoPE for both streams: 1 to 3 table inputs
            names = ", ".join(n.name for n in tables)
            return f"q and k are rotated by different tables ({names}): the op takes one set"
        # inputs scaled up, so that no eps (wherever it sits in the normalisation) moves
        # the norms; phase C decides the eps on inputs scaled down to where it does
        big = _scaled(base, _STRUCTURE_SCALE)
        literals = float_literals(region.nodes)
        found, reason = None, ""
        # the table holding ones is the cosine (no turn) in one assignment: read q and k
        # apart in every assignment first, their products (scores_only) only then
        for products in (False, True) if bilinear else (False,):
            for one in range(_constant_assignments(tables)):
                fixed = _constant_tables(tables, sizes, one)
                fixed.update({dup: fixed[rep] for dup, rep in same_as.items()})
                probe_a = _Probe(ctx, region, sizes, seed=41, given=fixed, scale=big)
                # a second draw: a constant read off one draw of a run-time input (the
                # norm scale times a logit scale buffer's probe value) fails it
                again = _Probe(ctx, region, sizes, seed=46, given=fixed, scale=big)
                attempt = _phase_a(base, plans, (probe_a, again), temps, tables, literals, products)
                if not isinstance(attempt, str):
                    found = attempt
                    break
                if not reason or "temperature" in reason:  # the furthest a reading got
                    reason = attempt
            if found is not None:
                break
        if found is None:
            return reason
        # phase B: RoPE layout and tables, on random tables
        probe_b = _Probe(ctx, region, sizes, seed=42, scale=big, tables=draw_tables)
        width = base.d
        options = _prologue_table_options(tables, width) if tables else []
        if base.kind == "seed":
            options = [o for o in options if o[3] == width]
        chosen = None
        if not tables and base.kind == "seed":
            return "the original project's variant without RoPE has no fused op"
        if not tables:
            chosen = replace(found, rope=None)
            if not probe_b.matches(chosen, rtol=1e-7):
                return "the candidate without RoPE does not agree"
        else:
            for option in options:
                cand = replace(found, rope=option)
                if probe_b.matches(cand, rtol=1e-7):
                    chosen = cand
                    break
            if chosen is None:
                return f"no RoPE layout fits the tables ({len(tables)} table inputs)"
        # phase C: eps, where it decides: inputs and biases scaled down to norms near eps
        eps_choices = _eps_choices(region, literals)
        raw_norm = _raw_norm(ctx, region, chosen)
        modes = ("clamp", "add", "sqrt") if chosen.kind == "stock" else ("clamp",)
        for eps_mode in modes:
            # under the root, an eps added to the MEAN square (``F.rms_norm`` over a head,
            # ``rsqrt(mean(x * x) + eps)``) is d times that eps added to the sum
            widened = [chosen.d * e for e in eps_choices if e > 0] if eps_mode == "sqrt" else []
            for eps in [*eps_choices, *widened]:
                cand = replace(chosen, eps=eps, eps_mode=eps_mode)
                # the norm where eps decides: eps itself, or sqrt(eps) under the root
                deciding = math.sqrt(eps) if eps_mode == "sqrt" else eps
                ok = True
                for seed, factor in ((43, 10.0), (44, 0.1)):
                    scale = _tiny_scale(raw_norm, cand, deciding * factor)
                    probe = _Probe(ctx, region, sizes, seed=seed, scale=scale, tables=draw_tables)
                    if not probe.matches(cand, rtol=1e-6):
                        ok = False
                        break
                if ok:
                    return cand
        return "the normalisation's eps or its placement matches no candidate"


def _with_added_biases(region: Region, plans: list[Plan], leaves: list[Node]) -> list[Plan] | str:
    """The plans with each of ``leaves`` as the bias of the convolution whose output it is
    added to (``conv1d(x, w) + b``, or after the output's layout ops: a bias written
    apart), where that convolution has none; else why a leaf is none of the op's
    inputs. The probes decide whether it is added as a bias is."""
    out = []
    for plan in plans:
        # a shared conv appears in both chains: once here
        convs = list({id(c): c for c in (*plan.q_convs, *plan.k_convs)}.values())
        biases: dict[int, Node] = {}
        for leaf in leaves:
            slot = _biased_conv(region, leaf, convs)
            if slot is None or slot in biases:
                return f"{leaf.name} is neither a temperature, a RoPE table nor a convolution's bias"
            biases[slot] = leaf
        with_bias = {id(c): replace(c, bias=biases[i]) if i in biases else c for i, c in enumerate(convs)}
        biased = replace(
            plan,
            q_convs=tuple(with_bias[id(c)] for c in plan.q_convs),
            k_convs=tuple(with_bias[id(c)] for c in plan.k_convs),
        )
        out.append(biased)
        if plan.shared and plan.q_convs[0].bias is None and biased.q_convs[0].bias is not None:
            # padded once for both stages (Zyphra): conv1's bias reaches conv2's padding
            out.append(replace(biased, fold_bias=True))
    return out


def _biased_conv(region: Region, leaf: Node, convs: list[Conv]) -> int | None:
    """Which of ``convs`` (without a bias, with as many output channels as ``leaf`` has
    elements) the region adds ``leaf`` to: the last one before the add."""
    node = leaf
    while len(node.users) == 1 and (is_layout(next(iter(node.users))) or is_cast(next(iter(node.users)))):
        node = next(iter(node.users))
    adds = [u for u in node.users if u in region.nodes and is_add(u)]
    if len(adds) != 1:
        return None
    before = ancestors([adds[0]])
    found = [i for i, c in enumerate(convs) if c.node in before]
    if not found:
        return None
    last = max(found, key=lambda i: len(ancestors([convs[i].node])))
    conv = convs[last]
    channels = tensor_value(conv.weight).shape[0]
    if conv.bias is not None or tensor_value(leaf).numel() != channels:
        return None
    return last


def _specialize_table_widths(tables: list[Node], region: Region) -> None:
    """RoPE tables handed in by the caller (HF's ``position_embeddings``) have a symbolic
    width under ``dynamic=True``, yet the rotary width is the op's compile-time constant:
    fix it to the traced value, guarded (a call with another width recompiles). Only a
    width whose symbols no other axis of the table or the region's outputs has: never the
    sequence length."""
    sink_symbols = set().union(*(_size_symbols(tensor_value(n).shape) for n in region.sinks))
    for table in tables:
        shape = tensor_value(table).shape
        width = static_int(shape[-1])
        if not isinstance(width, torch.SymInt):
            continue
        symbols = width.node.expr.free_symbols
        if symbols & (_size_symbols(shape[:-1]) | sink_symbols):
            continue
        specialize(width)


def _size_symbols(sizes) -> set:
    return set().union(*(s.node.expr.free_symbols for s in sizes if isinstance(s, torch.SymInt)))


def _has_time_dim(node: Node, region: Region) -> bool:
    t = static_int(tensor_value(region.sinks[0]).shape[2])
    v = tensor_value(node)
    if v is None:  # (an unbind's tuple: its parts are the tables)
        return False
    if isinstance(t, int) and t == 1:  # one token (a decode step): a table's rows are 1 wide
        # (a width symbolic under dynamic=True is fixed later, ``_specialize_table_widths``)
        if v.dim() < 2:
            return False
        width = static_int(v.shape[-1])
        return not isinstance(width, int) or width > 1
    # rows of positions, each of the rotary width: (..., T, r); a temperature viewed
    # (1, Hkv, 1, 1) with as many kv heads as tokens is none
    if v.dim() < 2 or same_size(v.shape[-1], 1):
        return False
    return any(same_size(s, t) for s in v.shape[:-1])


def _prologue_table_options(tables: list[Node], width):
    """RoPE's table options, the tables as the op reads them: (..., T, r). Tables shaped
    for q and k in (B, T, H, D) ((T, 1, r): a unit head axis) lose that axis, tables
    shaped for (T, B, H, D) ((T, 1, 1, r)) both unit axes."""

    def dropping_unit_axes(build, count):
        def built(*ts):  # traced with proxies too: no shape tests (squeeze keeps a non-1 axis)
            out = build(*ts)
            for _ in range(count):
                out = tuple(t.squeeze(-2) for t in out)
            return out

        return built

    options = _table_options(tables, width)
    # (T, 1, r) for (B, T, H, D); (T, 1, 1, r) for tokens-first (T, B, H, D) (Megatron)
    options = [
        *options,
        *[(f"{n}{form}", ins, dropping_unit_axes(b, count), r, i)
          for form, count in (("_heads_axis", 1), ("_tokens_first_axes", 2))
          for n, ins, b, r, i in options],
    ]  # fmt: skip
    # partial RoPE on a head's last dims (DeepSeek's q = cat(q_nope, rope(q_pe)) layout)
    tails = [(f"{n}_tail", ins, b, r, i, width - r) for n, ins, b, r, i in options if r < width]
    return options + tails


def _with_identity_rope(plan: Plan, tables: list[Node]) -> list[Plan]:
    """For phase A: tables constant, every layout is some rotation; one plan per way the
    tables may be read (the first that agrees is kept)."""
    if not tables:
        return [replace(plan, rope=None)] if plan.kind == "stock" else []
    options = _prologue_table_options(tables, plan.d)
    if plan.kind == "seed":
        options = [o for o in options if o[3] == plan.d]
    seen, out = set(), []
    for option in options:  # one per table form and order: the table of ones read as the
        # cosine makes every layout the identity (the sine's turns it by 90 degrees, which
        # changes q and k apart but not their products)
        form = next((f for f in ("_heads_axis", "_tokens_first_axes") if f in option[0]), "")
        key = (form, tuple(option[1]))
        if key not in seen:
            seen.add(key)
            out.append(replace(plan, rope=option))
    return out


def _snap_scale(estimate: float, d: int, literals: set[float]) -> float:
    for c in (math.sqrt(d), 1.0, *literals):
        if c > 0 and abs(c - estimate) <= 1e-6 * c:
            return c
    return estimate


def _eps_choices(region: Region, literals: set[float]) -> list[float]:
    from_normalize = []
    for node in region.nodes:
        if is_function(node, F.normalize):
            eps = arg(node, 3, "eps", 1e-12)
            if isinstance(eps, float):
                from_normalize.append(eps)
    defaults = [1e-12, *(torch.finfo(t).eps for t in (torch.float32, torch.bfloat16, torch.float16)),
                1e-6, 1e-8, 1e-5]  # fmt: skip
    small = sorted(x for x in literals if 0 < x < 1e-2)
    seen, out = set(), []
    for eps in [*from_normalize, *small, *defaults, 0.0]:
        if eps not in seen:
            seen.add(eps)
            out.append(eps)
    return out


def _raw_norm(ctx, region: Region, plan: Plan) -> float:
    """The median norm of the pre-normalisation vectors on a unit-scale probe."""
    from ..ops.ccgqa_prologue import _raw

    sizes = ctx.sizes[0]
    feeds = region.feeds(sizes, seed=45, given=_runtime_scalar_values(region, 45))
    values = [feeds[n] if isinstance(n, Node) else n for n in plan.inputs()]
    args = op_arguments(plan, values)
    q_raw, k_raw, _ = _raw(*args[:10], plan.heads, plan.kv_heads, _qk_mean(plan), torch.float64)
    return float(torch.cat([q_raw.norm(dim=-1).flatten(), k_raw.norm(dim=-1).flatten()]).median())


# phases A and B probe at inputs this many times their unit scale: pre-norm norms ~1e4,
# where an eps up to ~1e-4 (added to the norm or under its root) is below the tolerance
_STRUCTURE_SCALE = 1e4


def _scaled(plan: Plan, s: float) -> dict[Node, float]:
    """Scale q_pre, k_pre and every bias by ``s``: the pre-norm vectors scale with them
    (they are linear in those jointly)."""
    out = {plan.q_pre: s, plan.k_pre: s, **dict.fromkeys(plan.states, s)}
    for conv in (*plan.q_convs, *plan.k_convs):
        if conv.bias is not None:
            out[conv.bias] = s
    return out


def _tiny_scale(raw_norm: float, plan: Plan, target_norm: float) -> dict[Node, float]:
    """The scale (``_scaled``) that brings the pre-norm vectors' norms near
    ``target_norm``."""
    if target_norm <= 0:
        target_norm = 1e-20
    return _scaled(plan, target_norm / max(raw_norm, 1e-300))


def _final_check(ctx: GraphContext, region: Region, plan: Plan, draw_tables=None) -> str | None:
    with real_tensors():
        for sizes in ctx.sizes:
            for seed in (51, 52):
                scale = {plan.q_pre: 3.0} if seed == 52 else None
                probe = _Probe(ctx, region, sizes, seed=seed, scale=scale, tables=draw_tables)
                if not probe.matches(plan):
                    return "the chosen candidate disagrees on a second probe"
    return None


def recognise(ctx: GraphContext, site: Site) -> None:
    read_keys = site.k
    written = _keys_written_into_the_cache(site)
    if written is not None:
        site.k = written
    plans = _plans(site)
    undo = None
    if isinstance(plans, str) and "not q_pre" in plans:
        undo = _split_joint_source(site)
        plans = _plans(site) if undo is not None else plans
    fused = _recognise(ctx, site, plans)
    if not fused and undo is not None:
        undo()
    if not fused and written is not None:
        site.k = read_keys


def _keys_written_into_the_cache(site: Site) -> Node | None:
    """A prefill into a static cache (HF's ``StaticCache``, gpt-fast's): the attention
    reads k from the cache, into which this step's keys were written in place just before
    (``index_copy_`` at the cache positions). The prologue computes those keys; the
    attention keeps reading the cache, so what it reads there is whatever the write put
    there, as written. None where the attention's k itself comes from the convs, or no
    such write is found."""
    if site.kind == "decode" or layer_convolutions([site.k]) or not layer_convolutions([site.q]):
        return None
    t = tensor_value(site.q).shape[2]
    written = new_keys(site.k, t, site.anchor)
    if written is None or not layer_convolutions([written]):
        return None
    return written


def _split_joint_source(site: Site):
    """One convolution chain reading one (B, T, Hq*D + Hkv*D) tensor (a fused q|k
    projection): its read is rewritten as ``cat(x[..., :Hq*D], x[..., Hq*D:])``, the same
    tensor, whose two parts are then the prologue's q_pre and k_pre (a qk-mean's own
    slices of x are the same computations: one probe value each). Returns what undoes
    the rewrite, or None where there is no such tensor."""
    heads = _site_heads(site)
    if isinstance(heads, str):
        return None
    hq, hkv, d = heads
    b, t = tensor_value(site.q).shape[0], tensor_value(site.q).shape[2]
    cq = hq * d
    # k's width: the site's heads, or fewer the code repeats to them before the norm
    kv_widths = {cq + h * d: h * d for h in _kv_head_counts(hq, hkv)}
    firsts = _chain_heads(layer_convolutions([site.q, site.k]))
    if len(firsts) != 1:
        return None
    joint = [
        x for x in _conv_sources(firsts[0])
        if _as_btc(x, b, t) == "btc" and _width(x, b, t) in kv_widths
    ]  # fmt: skip
    if len(joint) != 1:
        return None
    x = joint[0]
    ckv = kv_widths[_width(x, b, t)]
    readers = [u for u in x.users if u is firsts[0] or firsts[0] in descendants([u])]
    if len(readers) != 1:
        return None
    # x may itself be the q|k channels of a wider projection (qkv[..., :Cq + Ckv]): the
    # parts are then cut from that, where the code's own slices (a qk-mean's) may be them
    root, start = x, 0
    cut = _last_dim_slice(x)
    if cut is not None:
        root, start = cut[0], cut[1]
    graph = x.graph
    new = []
    parts = []
    for lo, hi in ((start, start + cq), (start + cq, start + cq + ckv)):
        part = _find_last_dim_slice(root, lo, hi)
        if part is None:
            with graph.inserting_after(root):
                part = graph.call_function(operator.getitem, (root, (Ellipsis, slice(lo, hi))))
            new.append(part)
        parts.append(part)
    anchor = max(parts + [x], key=topo_order(graph).__getitem__)
    with graph.inserting_after(anchor):
        joined = graph.call_function(torch.cat, (parts,), {"dim": -1})
    new.append(joined)
    propagate_fake(graph, new)
    readers[0].replace_input_with(x, joined)
    stable_sort(graph)

    def undo():
        for user in list(joined.users):
            user.replace_input_with(joined, x)
        for node in reversed(new):
            if not node.users:
                graph.erase_node(node)
        stable_sort(graph)

    return undo


def _last_dim_slice(node: Node) -> tuple[Node, int, int] | None:
    """(x, lo, hi) for ``x[..., lo:hi]`` (a unit step, constant bounds), else None."""
    if not is_function(node, operator.getitem) or not isinstance(node.args[0], Node):
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) != 2 or index[0] is not Ellipsis:
        return None
    cut = index[1]
    if not isinstance(cut, slice) or cut.step not in (None, 1):
        return None
    v = tensor_value(node.args[0])
    width = v.shape[-1] if v is not None else None
    bounds_known = all(isinstance(b, (int, type(None))) for b in (cut.start, cut.stop))
    if not isinstance(width, int) or not bounds_known:
        return None
    lo, hi, _ = cut.indices(width)
    return node.args[0], lo, hi


def _find_last_dim_slice(root: Node, lo: int, hi: int) -> Node | None:
    for user in root.users:
        found = _last_dim_slice(user)
        if found is not None and found[1:] == (lo, hi):
            return user
    return None


def _recognise(ctx: GraphContext, site: Site, plans: list[Plan] | str) -> bool:
    """Fuse the site's prologue by the first plan the probes prove; False (reported)
    where none is."""
    if isinstance(plans, str):
        if "no convolution" not in plans:
            ctx.rejected(FUSION, "prologue", site.anchor, plans)
        return False
    base = plans[0]
    try:
        region = Region.between([base.q_pre, base.k_pre, *base.states], [site.q, site.k])
        repeated = _repeated_temperatures(region, base)
        if repeated:
            region = Region.between([base.q_pre, base.k_pre, *base.states, *repeated], [site.q, site.k])
        # RoPE reading each table in halves: the table (T positions, not a whole buffer
        # of them, whose rows the region slices) is the input
        # (never the conv weights: one shared conv's weight sliced for q and for k)
        conv_params = {
            n for c in (*base.q_convs, *base.k_convs) for w in (c.weight, c.bias)
            if w is not None for n in view_chain(w)
        }  # fmt: skip
        region = lift_table_slices(
            region, base.q_pre,
            keep=lambda table: _has_time_dim(table, region) and table not in conv_params,
        )  # fmt: skip
    except Rejected as why:
        ctx.rejected(FUSION, "prologue", site.anchor, str(why))
        return False
    escapes = [n for n in region.escapes() if not _moves_data_only(region, n)]
    if escapes:
        ctx.rejected(FUSION, "prologue", site.anchor, f"{escapes[0].name} is also read outside the prologue")
        return False
    try:
        bilinear = _attended_only(site)
        chosen = _decide(ctx, region, plans, bilinear)
        draw_tables = _rotation_tables(region, base) if isinstance(chosen, str) else None
        if draw_tables is not None:  # the order of RoPE and the norm holds for rotations only
            chosen = _decide(ctx, region, plans, bilinear, draw_tables)
        if isinstance(chosen, Plan):
            problem = _final_check(ctx, region, chosen, draw_tables)
            chosen = problem if problem is not None else chosen
    except Rejected as why:
        chosen = str(why)
    except (RuntimeError, ValueError, IndexError, TypeError, NotEvaluable) as why:
        chosen = f"probe evaluation failed: {type(why).__name__}: {str(why).splitlines()[0][:160]}"
    if isinstance(chosen, str):
        ctx.rejected(FUSION, "prologue", site.anchor, chosen)
        return False
    if chosen.kind == "seed" and is_training_graph(ctx.graph) and not config.SEED_PROLOGUE_IN_TRAINING:
        ctx.rejected(FUSION, "seed", site.anchor, "the original project's variant in a training "
                     "graph: left to Inductor (policy config.SEED_PROLOGUE_IN_TRAINING: its "
                     "backward kernels are slower than Inductor's)")  # fmt: skip
        return False
    try:
        q_new, k_new = emit(region, candidate(chosen), chosen.inputs())
    except Rejected as why:
        ctx.rejected(FUSION, "prologue", site.anchor, str(why))
        return False
    ctx.fused(FUSION, _idiom(chosen))
    site.q, site.k = q_new, k_new
    site.prologue = True
    if chosen.k_repeat > 1 and site.fused:
        _attend_unrepeated(ctx, site, chosen.k_repeat)
    return True


def _rotation_tables(region: Region, plan: Plan):
    """Where the region's two RoPE tables are the cosine and sine the graph computes of
    one angle tensor (through casts, views and slices), what draws them as such (a random
    angle, the tables computed from it as written), else None. RoPE then rotates: it keeps
    norms, so code applying it before the L2 norm computes what the op does, which random
    tables would not show."""
    tables = [
        n for n in _table_leaves(region, plan)
        if _runtime(n) and _has_time_dim(n, region) and tensor_value(n).dtype.is_floating_point
    ]  # fmt: skip
    if len(tables) != 2:
        return None
    angles = {}
    for table in tables:
        node = table
        while is_layout(node) or is_cast(node) or is_basic_index(node):
            node = node.args[0]
        kind = "cos" if _calls(node, "cos") else "sin" if _calls(node, "sin") else None
        if kind is None or kind in angles or not isinstance(node.args[0], Node):
            return None
        angles[kind] = node.args[0]
    if len(angles) != 2 or angles["cos"] is not angles["sin"]:
        return None
    # the angle as the graph computes it, from random values of what it reads (an angle
    # drawn itself would not hold the structure rotate-half needs: both halves' equal)
    inputs = runtime_inputs_of(angles["cos"])
    if not inputs:
        return None
    try:
        source = Region.between(inputs, tables)
    except Rejected:
        return None

    def draw(sizes, seed):
        probes = Probes(sizes, source.device(), seed + 1000)
        given = {
            n: torch.randint(0, 64, probes.shape(n), generator=probes.gen, device=probes.device)
            for n in inputs if not tensor_value(n).dtype.is_floating_point
        }  # fmt: skip
        values = source.evaluate(source.feeds(sizes, seed=seed + 1000, given=given), sizes)
        return dict(zip(tables, values))

    return draw


def _calls(node: Node, name: str) -> bool:
    return is_function(node, getattr(torch, name)) or is_method(node, name)


def _repeated_temperatures(region: Region, plan: Plan) -> list[Node]:
    """Per-kv-head (or shared) tensors the region reads repeated to more heads (a
    temperature on q, ``beta.repeat_interleave(G)``, or on a k repeated before the norm):
    made region sources, the probes then draw the per-kv-head values and the repeat is
    computed as written, so an input that only looks repeated (a per-query-head
    parameter) stays the region's own input and proves nothing."""
    found = []
    for leaf in _table_leaves(region, plan):  # not the streams, states or conv weights
        if leaf in region.sources or not _runtime(leaf) or _has_time_dim(leaf, region):
            continue
        node = leaf
        for _ in range(8):  # a short chain of views, repeats, gathers, casts, pointwise ops
            if tensor_value(node).numel() in (1, plan.kv_heads):
                break
            # one run-time tensor read (an index built from sizes, ``beta[arange(Hq) // G]``,
            # is computed as written)
            inputs = [n for n in node_inputs(node) if isinstance(tensor_value(n), torch.Tensor) and _runtime(n)]
            if node.op not in ("call_function", "call_method") or len(inputs) != 1:
                node = None
                break
            node = inputs[0]
        else:
            node = None
        if node is not None and node is not leaf:
            found.append(node)
    return list(dict.fromkeys(found))


def _attended_only(site: Site) -> bool:
    """Whether the site's q and k are read only by its attention (through views, casts and
    repeats), never kept, cached or returned: the attention then sees them only through
    their products q @ k^T."""
    if site.kind == "handwritten" and not site.fused:
        return False  # the anchor is the softmax: the scores' other readers are unchecked
    for stream in (site.q, site.k):
        reached = [stream, *forward_closure(stream, lambda n: is_layout(n) or is_cast(n))]
        for node in reached:
            if any(u is not site.anchor and u not in reached and not is_size_value(u) for u in node.users):
                return False
    return True


def _attend_unrepeated(ctx: GraphContext, site: Site, groups: int) -> None:
    """Our attention op over K and V the code repeated to every query head reads them
    unrepeated (the op is grouped-query attention): K now comes out of the prologue op
    repeated, and V is repeated as written."""
    op = site.anchor
    if not is_function(op, torch.ops.ccgqa.gqa_attention, torch.ops.ccgqa.gqa_attention.default):
        return
    k, v = op.args[1], op.args[2]
    if is_cast(k) or is_cast(v):
        return
    k1, v1 = unrepeated(ctx, k, groups), unrepeated(ctx, v, groups)
    if k1 is None or v1 is None or tensor_value(k1).dtype != tensor_value(v1).dtype:
        return
    op.update_arg(1, k1)
    op.update_arg(2, v1)
    site.k, site.v = k1, v1
    erase_unused(ctx.graph, [k, v])


def _moves_data_only(region: Region, node: Node) -> bool:
    """Whether ``node`` only rearranges the region's inputs (views, casts, slices, cat,
    pad): read outside the prologue, as HF's cached generation reads the padded q/k columns
    to keep a conv state, it is left in the graph at the cost of a copy, not a second
    convolution."""
    inside = region.nodes
    for n in ancestors([node], stop=set(region.sources)):
        if n not in inside or n in region.sources:
            continue
        if not (is_layout(n) or is_cast(n) or is_basic_index(n) or is_function(n, torch.cat, *PAD)):
            return False
    return True


def _idiom(plan: Plan) -> str:
    if plan.kind == "seed":
        return "seed_variant"
    parts = ["shared_conv" if plan.shared else "separate_convs"]
    parts.append("qk_mean" if plan.qk_mean else "no_mean")
    parts.append("temperature" if plan.temp is not None else "no_temperature")
    if plan.rope is not None:
        r, inter = plan.rope[3], plan.rope[4]
        parts.append(("interleaved" if inter else "rotate_half") + (f"_r{r}" if r != plan.d else ""))
        if _rotary_start(plan):
            parts.append("rope_on_last_dims")
        if "_negative" in plan.rope[0]:  # (before a table-form suffix)
            parts.append("negative_angles")
    if plan.eps_mode != "clamp":  # the norm's eps added to it, or under its root
        parts.append(f"eps_{plan.eps_mode}")
    if plan.k_repeat > 1:
        parts.append(f"k_repeated_{plan.k_repeat}")
    if plan.scores_only:  # the region's scales of q and k differ from the op's, not q @ k^T
        parts.append("scales_moved_between_q_and_k")
    return ",".join(parts)


def run(ctx: GraphContext, sites: list[Site]) -> None:
    for site in sites:
        if ctx.alive(site.q) and ctx.alive(site.k):
            recognise(ctx, site)


__all__ = ["run", "recognise", "Evaluator"]
