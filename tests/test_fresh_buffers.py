"""Writes into a freshly made tensor become functional scatters (passes/fresh_buffers.py):
the rewritten graph computes what eager does, values and gradients, and writes it cannot
prove private to the buffer are left as they are."""

from __future__ import annotations

import operator

import pytest
import torch

from ccgqa_compile.passes import fresh_buffers
from ccgqa_compile.passes.common import GraphContext
from ccgqa_compile.passes.evaluate import size_assignments

from ._backends import dynamo_graph
from ._compare import rel_err


def _writes_every_form(x, y):
    """ints, slices with steps and negative bounds, Ellipsis, a scalar, a broadcast row, a
    cast (y is float64), then reads of the filled buffer."""
    b = torch.empty(3, 5, 8)
    b[0] = x[0]
    b[1:, :, ::2] = x[1:, :, 1::2] * 2
    b[1:, :, 1::2] = 7.0
    b[-1, -2:] = y[:8]
    b[..., 0] = x[..., 3].sin()
    return b.flatten(1) @ torch.ones(40, 2) + b.sum()


def _zeros_partly_written(x, y):
    z = x.new_zeros(3, 5, 8)
    z[:, 1:] = x[:, :-1]
    return z * y[:8]


def _rope_pairs_written(x, y):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = y[:4].cos(), y[:4].sin()
    out = torch.empty_like(x.unflatten(-1, (-1, 2)))
    out[..., 0] = x1 * c - x2 * s
    out[..., 1] = x1 * s + x2 * c
    return out.flatten(-2)


def _read_between_writes(x, y):
    """Left as written: a read between the writes sees the first only."""
    b = torch.zeros(3, 5, 8)
    b[0] = x[0]
    first = b.sum()
    b[1] = x[1] * y[:8]
    return b * first


def _view_written(x, y):
    """Left as written: a view of the buffer is written, not the buffer."""
    b = torch.zeros(3, 5, 8)
    row = b[1]
    row[2:] = x[1, 2:]
    b[0] = y[:8]
    return b


def _written_under_no_grad(x, y):
    """Left as written: the second write, under no_grad, changes values but keeps the
    gradient path the first one made."""
    b = torch.zeros(3, 5, 8)
    b[0] = x[0] * y[:8].to(x.dtype)
    with torch.no_grad():
        b[1] = x[1].round()
    return b * 2


def _setitems(gm) -> int:
    return sum(n.op == "call_function" and n.target is operator.setitem for n in gm.graph.nodes)


def _check_rewrite(fn, rewritten: bool, training: bool, writes_of, reference_dtype):
    """Capture ``fn``'s graph, run the pass, check which writes are left, and compare the
    rewritten graph's output and gradients with ``fn`` run eagerly on x in
    ``reference_dtype``."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 8), torch.randn(16, dtype=torch.float64)
    x_r, y_r = x.to(reference_dtype).requires_grad_(training), y.clone().requires_grad_(training)
    want = fn(x_r, y_r)
    ins = [x.clone().requires_grad_(training), y.clone().requires_grad_(training)]
    gm = dynamo_graph(fn, *ins)
    writes = writes_of(gm)
    assert writes, "the function writes in place"
    fresh_buffers.run(GraphContext(gm.graph, size_assignments(gm.graph), True))
    gm.graph.lint()
    gm.recompile()
    assert writes_of(gm) == (0 if rewritten else writes), gm.code
    with torch.set_grad_enabled(training):
        out = gm(*ins)
    got = out[0] if isinstance(out, (tuple, list)) else out
    assert rel_err(got, want) < 1e-6
    if training:
        grads = torch.autograd.grad(got.sum(), ins, allow_unused=True)
        grads_r = torch.autograd.grad(want.sum(), (x_r, y_r), allow_unused=True)
        for g, g_r in zip(grads, grads_r):
            assert (g is None) == (g_r is None)
            if g is not None:
                assert rel_err(g, g_r) < 1e-6


@pytest.mark.parametrize(
    ("fn", "rewritten"),
    [
        (_writes_every_form, True),
        (_zeros_partly_written, True),
        (_rope_pairs_written, True),
        (_read_between_writes, False),
        (_view_written, False),
        (_written_under_no_grad, False),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_writes_into_a_fresh_buffer_become_scatters(fn, rewritten, training):
    _check_rewrite(fn, rewritten, training, _setitems, torch.float64)


def _inplace_chain(x, y):
    """In-place ops on tensors the graph made: an activation, a product, ``+=``."""
    g = x * 2
    torch.nn.functional.silu(g, inplace=True)
    g.mul_(y[:8].to(g.dtype))
    g += 1
    return g.sum(-1) + g.mean()


def _inplace_on_an_alias(x, y):
    """Left as written: ``a.float()`` of a float tensor is ``a`` itself, so the write
    lands in ``a`` too."""
    a = x * 2
    c = a.float()
    c.mul_(3)
    return a + c * y[:8].to(a.dtype)


def _inplace_seen_by_a_view(x, y):
    """Left as written: a view taken before the write sees it."""
    a = x * 2
    row = a[0]
    a.mul_(y[:8].to(a.dtype))
    return row + 1


def _written_then_viewed(x, y):
    """A view taken after the write reads the written value (OLMo's additive causal mask:
    ``m.masked_fill_(m == 1, min)`` then ``m.view(1, 1, T, T)``)."""
    a = x * 2
    a.masked_fill_(a > 1, -3.0)
    return a.view(-1, 8) * y[:8].to(a.dtype)


def _only_view_written(x, y):
    """The only view of a tensor the graph made is written (Megatron's scores viewed
    (B, H, T, T), then ``masked_fill_``): writing it is writing a fresh tensor."""
    a = (x * 2).view(3, 40)
    a.masked_fill_(a > 1, -3.0)
    return a * 2 + y[:1].to(a.dtype)


def _view_written_base_read_after(x, y):
    """Left as written: the base it views is read after the write too."""
    base = x * 2
    a = base.view(3, 40)
    a.masked_fill_(a > 1, -3.0)
    return a * 2 + base.sum() * y[:1].to(a.dtype)


def _straight_through(x, y):
    """Left as written: a write under no_grad into a tensor that requires grad changes its
    values but not its gradient path (a straight-through estimator)."""
    q = x * 3
    with torch.no_grad():
        q.add_(q.round() - q)
    return q * y[:8].to(q.dtype)


def _mutations(gm) -> int:
    from ccgqa_compile.passes.fx_util import is_mutating

    return sum(is_mutating(n) for n in gm.graph.nodes)


@pytest.mark.parametrize(
    ("fn", "rewritten"),
    [
        (_inplace_chain, True),
        (_inplace_on_an_alias, False),
        (_inplace_seen_by_a_view, False),
        (_written_then_viewed, True),
        (_only_view_written, True),
        (_view_written_base_read_after, False),
        (_straight_through, None),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_inplace_ops_on_tensors_the_graph_made_become_functional(fn, rewritten, training):
    """Compared with eager in the same dtypes (``a.float()`` aliases only in float32).
    ``rewritten`` None: only where nothing requires grad (inference)."""
    _check_rewrite(fn, not training if rewritten is None else rewritten, training, _mutations, torch.float32)
