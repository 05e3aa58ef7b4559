"""A run-time factor on attention scores, the same for every key of a row, moves onto the
query operand (passes/score_factors.py): the rewritten graph computes what eager does,
values and gradients; factors that vary along the keys, or whose dtype differs, stay; and
``undo_unused`` gives back the graph as written."""

from __future__ import annotations

import pytest
import torch

from ccgqa_compile.passes import score_factors
from ccgqa_compile.passes.common import GraphContext
from ccgqa_compile.passes.evaluate import size_assignments

from ._backends import dynamo_graph
from ._compare import rel_err


def _per_head_matmul(q, k, t):
    s = (q @ k.transpose(-1, -2)) * 0.25 * t.exp().view(1, -1, 1, 1)
    return s.softmax(-1) @ k


def _per_head_einsum_other_layout(q, k, t):
    """q read (B, T, H, D) by the einsum, the factor laid out (1, H, 1, 1) on the output."""
    s = torch.einsum("bqhd,bhkd->bhqk", q.transpose(1, 2), k) / t.view(1, -1, 1, 1)
    return s.softmax(-1) @ k


def _zero_dim_on_the_left(q, k, t):
    s = t[0] * torch.matmul(q, k.transpose(-1, -2))
    return torch.softmax(s, dim=-1) @ k


def _per_row(q, k, t):
    """A factor per query row (..., T, 1): q's rows scaled."""
    s = (q @ k.transpose(-1, -2)) * (1 + t[0] * torch.arange(q.shape[2], dtype=q.dtype)).view(-1, 1)
    return s.softmax(-1) @ k


def _per_key(q, k, t):
    """Stays: a factor per key varies along the row."""
    s = (q @ k.transpose(-1, -2)) * (1 + t[0] * torch.arange(k.shape[2], dtype=q.dtype))
    return s.softmax(-1) @ k


def _other_dtype(q, k, t):
    """Stays: a float64 factor promotes the scores; moved onto q it would promote q."""
    s = (q @ k.transpose(-1, -2)) * t.double().view(1, -1, 1, 1)
    return s.softmax(-1).to(k.dtype) @ k


def _scores_read_twice(q, k, t):
    """Stays: the unscaled scores are read too."""
    s = q @ k.transpose(-1, -2)
    return (s * t.view(1, -1, 1, 1)).softmax(-1) @ k + s.mean()


def _in_graph_order(gm, ins):
    """(q, k, t) in the order of the graph's placeholders (Dynamo's, not the call's)."""
    position = {"L_q_": 0, "L_k_": 1, "L_t_": 2}
    return [ins[position[n.target]] for n in gm.graph.nodes if n.op == "placeholder"]


def _ops(gm) -> list:
    """The graph's calls and what each reads (a factor computed after the product may
    have been moved before it: the order is not compared)."""
    def named(a):
        return (a.op, str(a.target))

    return sorted(
        str((n.op, n.target, torch.fx.node.map_arg((n.args, n.kwargs), named))) for n in gm.graph.nodes
    )


def _scaled_queries(gm) -> int:
    return sum(bool(n.meta.get(score_factors.SCALED_QUERY)) for n in gm.graph.nodes)


@pytest.mark.parametrize(
    ("fn", "moved"),
    [
        (_per_head_matmul, 1),
        (_per_head_einsum_other_layout, 1),
        (_zero_dim_on_the_left, 1),
        (_per_row, 1),
        (_per_key, 0),
        (_other_dtype, 0),
        (_scores_read_twice, 0),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_factor_moved_onto_the_query(fn, moved, training):
    torch.manual_seed(0)
    q, k, t = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), 0.5 + torch.rand(3)
    ins = [x.clone().requires_grad_(training) for x in (q, k, t)]
    ref = [x.double().requires_grad_(training) for x in (q, k, t)]
    want = fn(*ref)
    gm = dynamo_graph(fn, *ins)
    written = _ops(gm)
    ctx = GraphContext(gm.graph, size_assignments(gm.graph), True)
    done = score_factors.run(ctx)
    gm.graph.lint()
    gm.recompile()
    assert len(done) == moved == _scaled_queries(gm), gm.code
    with torch.set_grad_enabled(training):
        out = gm(*_in_graph_order(gm, ins))
    got = out[0] if isinstance(out, (tuple, list)) else out
    assert rel_err(got, want) < 1e-5, gm.code
    if training:
        grads = torch.autograd.grad(got.sum(), ins)
        grads_r = torch.autograd.grad(want.sum(), ref)
        for g, g_r in zip(grads, grads_r):
            assert rel_err(g, g_r) < 1e-5, gm.code
    score_factors.undo_unused(ctx, done)  # nothing fused: the graph as written again
    gm.graph.lint()
    assert _ops(gm) == written, gm.code
