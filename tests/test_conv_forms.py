"""Convolutions along time written without ``conv1d`` become ``conv1d``
(passes/conv_forms.py): the rewritten graph computes what the code did, values and
gradients against float64; sums of slices that are no convolution stay; and
``undo_unused`` gives back the graph as written."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccgqa_compile.passes import conv_forms
from ccgqa_compile.passes.common import GraphContext
from ccgqa_compile.passes.evaluate import size_assignments
from ccgqa_compile.passes.fx_util import CONV1D, is_function

from ._backends import dynamo_graph
from ._compare import rel_err

B, T, H, D, K = 2, 7, 2, 4, 3


def _delayed(x, j, axis=1):
    """x delayed by j steps along ``axis``, zeros entering."""
    if j == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - axis) + [j, 0]
    return F.pad(x.narrow(axis, 0, x.shape[axis] - j), pad)


def _depthwise_taps(x, w, w2):
    """(B, T, C) times per-channel taps of the past tokens, a bias added."""
    return (
        x * w[:, 2] + _delayed(x, 1) * w[:, 1] + _delayed(x, 2) * w[:, 0] + w2[:, 0, :, 0].flatten()
    )


def _delayed_by_cat(x, j):
    return x if j == 0 else torch.cat([x.new_zeros(B, j, x.shape[2]), x[:, : T - j]], 1)


def _depthwise_taps_shifted_by_cat(x, w, w2):
    """Each tap's tokens shifted by ``cat([zeros, x[:, :T - j]])``."""
    return sum(_delayed_by_cat(x, j) * w[:, K - 1 - j] for j in range(K))


def _shifted_by_cat_of_ones(x, w, w2):
    """Stays: the shift lets ones in, not zeros."""
    shifted = torch.cat([x.new_ones(B, 1, x.shape[2]), x[:, : T - 1]], 1)
    return x * w[:, 1] + shifted * w[:, 0]


def _padded_once_slices(x, w, w2):
    xp = F.pad(x, (0, 0, 2, 0))
    return xp[:, 2:] * w[:, 2] + xp[:, 1:-1] * w[:, 1] + xp[:, :-2] * w[:, 0]


def _tokens_first_heads(x, w, w2):
    """(T, B, H, D) with (H, D) taps."""
    xt = x.transpose(0, 1).unflatten(-1, (H, D))
    taps = w.view(H, D, K)
    return xt * taps[..., 1] + _delayed(xt, 1, axis=0) * taps[..., 0]


def _per_head_einsum(x, w, w2):
    xh = x.unflatten(-1, (H, D))
    return sum(torch.einsum("bthi,hoi->btho", _delayed(xh, j), w2[..., j]) for j in range(K))


def _per_head_taps_viewed_per_term(x, w, w2):
    """Each term views x as heads anew."""
    taps = w.view(H, D, K)
    return sum(_delayed(x.view(B, T, H, D), j) * taps[..., K - 1 - j] for j in range(K))


def _per_head_einsum_viewed_after_the_shift(x, w, w2):
    """The tokens shifted as (B, T, C), each copy viewed (B, T, H, D) for the einsum."""
    return sum(
        torch.einsum("bthi,hoi->btho", _delayed_by_cat(x, j).view(B, T, H, D), w2[..., j])
        for j in range(K)
    )


def _unfold_times_taps(x, w, w2):
    return (F.pad(x, (0, 0, K - 1, 0)).unfold(1, K, 1) * w).sum(-1)


def _unfold_einsum(x, w, w2):
    win = F.pad(x.unflatten(-1, (H, D)), (0, 0, 0, 0, K - 1, 0)).unfold(1, K, 1)
    return torch.einsum("bthik,hoik->btho", win, w2)


def _unfold_then_grouped_einsum(x, w, w2):
    """Windows of (B, T, C) viewed per group, (B, T, H, D, k), against (k, D, H, D) taps
    (a Flax kernel's layout)."""
    win = F.pad(x, (0, 0, K - 1, 0)).unfold(1, K, 1).reshape(B, T, H, D, K)
    return torch.einsum("btgik,kigo->btgo", win, w2.permute(3, 2, 0, 1))


def _stacked_delays_times_taps(x, w, w2):
    """The delayed copies stacked on a new middle axis, times taps along it, summed."""
    stack = torch.stack([_delayed(x, j) for j in range(K)], dim=2)  # (B, T, K, C)
    return (stack * w.flip(-1).t()).sum(2)


def _stacked_delays_einsum(x, w, w2):
    stack = torch.stack([_delayed(x.unflatten(-1, (H, D)), j) for j in range(K)])
    return torch.einsum("kbthi,hoik->btho", stack, w2.flip(-1))


def _stacked_two_tensors(x, w, w2):
    """Stays: one copy is of another tensor."""
    stack = torch.stack([x, _delayed(x * 2.0, 1), _delayed(x, 2)], dim=-1)
    return (stack * w).sum(-1)


def _conv2d_unit_height(x, w, w2):
    x4 = F.pad(x.transpose(1, 2)[:, :, None], (K - 1, 0))
    return F.conv2d(x4, w[:, None, None, :], groups=H * D)


def _conv2d_unit_width(x, w, w2):
    x4 = F.pad(x.transpose(1, 2)[..., None], (0, 0, K - 1, 0))
    return F.conv2d(x4, w[:, None, :, None], groups=H * D)


def _future_tap(x, w, w2):
    """A centred filter: still a convolution (the prologue decides causality)."""
    return F.pad(x[:, 1:], (0, 0, 0, 1)) * w[:, 0] + x * w[:, 1] + _delayed(x, 1) * w[:, 2]


def _tap_varies_along_time(x, w, w2):
    """Stays: a per-position factor is no filter."""
    gain = torch.arange(T, dtype=x.dtype).view(T, 1) * w[:, 0]
    return x * w[:, 1] + _delayed(x, 1) * gain


def _two_tensors(x, w, w2):
    """Stays: the slices come from different tensors."""
    return x * w[:, 1] + _delayed(x * 2.0 + 1.0, 1) * w[:, 0]


def _shifted_along_two_axes(x, w, w2):
    """Stays: one term is also cut along the channels."""
    return x * w[:, 1] + F.pad(x[:, :-1, 1:], (0, 1, 1, 0)) * w[:, 0]


def _convs(gm) -> int:
    return sum(is_function(n, *CONV1D) for n in gm.graph.nodes)


def _ops(gm) -> list:
    def named(a):
        return (a.op, str(a.target))

    return sorted(
        str((n.op, n.target, torch.fx.node.map_arg((n.args, n.kwargs), named)))
        for n in gm.graph.nodes
    )


def _in_graph_order(gm, ins):
    position = {"L_x_": 0, "L_w_": 1, "L_w2_": 2}
    return [ins[position[n.target]] for n in gm.graph.nodes if n.op == "placeholder"]


@pytest.mark.parametrize(
    ("fn", "rewritten"),
    [
        (_depthwise_taps, 1),
        (_padded_once_slices, 1),
        (_depthwise_taps_shifted_by_cat, 1),
        (_shifted_by_cat_of_ones, 0),
        (_tokens_first_heads, 1),
        (_per_head_einsum, 1),
        (_per_head_taps_viewed_per_term, 1),
        (_per_head_einsum_viewed_after_the_shift, 1),
        (_unfold_times_taps, 1),
        (_unfold_einsum, 1),
        (_unfold_then_grouped_einsum, 1),
        (_stacked_delays_times_taps, 1),
        (_stacked_delays_einsum, 1),
        (_stacked_two_tensors, 0),
        (_conv2d_unit_height, 1),
        (_conv2d_unit_width, 1),
        (_future_tap, 1),
        (_tap_varies_along_time, 0),
        (_two_tensors, 0),
        (_shifted_along_two_axes, 0),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_convolution_written_out_becomes_conv1d(fn, rewritten, training):
    torch.manual_seed(0)
    x, w, w2 = torch.randn(B, T, H * D), 0.5 + torch.rand(H * D, K), torch.randn(H, D, D, K)
    ins = [t.clone().requires_grad_(training) for t in (x, w, w2)]
    ref = [t.double().requires_grad_(training) for t in (x, w, w2)]
    want = fn(*ref)
    gm = dynamo_graph(fn, *ins)
    written = _ops(gm)
    ctx = GraphContext(gm.graph, size_assignments(gm.graph), True)
    done = conv_forms.run(ctx)
    gm.graph.lint()
    gm.recompile()
    assert len(done) == rewritten and _convs(gm) == rewritten, gm.code
    with torch.set_grad_enabled(training):
        out = gm(*_in_graph_order(gm, ins))
    got = out[0] if isinstance(out, (tuple, list)) else out
    assert rel_err(got, want) < 1e-6, gm.code
    if training:
        used = [i for i, r in zip(ins, ref) if r.requires_grad]
        grads = torch.autograd.grad(got.sum(), used, allow_unused=True)
        grads_r = torch.autograd.grad(want.sum(), ref, allow_unused=True)
        for g, g_r in zip(grads, grads_r):
            assert (g is None) == (g_r is None)
            if g is not None:
                assert rel_err(g, g_r) < 1e-6, gm.code
    conv_forms.undo_unused(ctx, done)  # nothing fused: the graph as written again
    gm.graph.lint()
    assert _ops(gm) == written, gm.code
