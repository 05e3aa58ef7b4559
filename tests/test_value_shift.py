"""The value-shift rewrite (passes/value_shift.py): ``linear(pad(x)[:, :T], W)`` becomes
``pad(linear(x, W))[:, :T]`` exactly where the two are equal, never elsewhere; outputs and
every gradient as eager, and the rewrite counted in the report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ccgqa_compile
from ccgqa_compile import config
from patterns.ccgqa import CCGQAttention

from ._backends import ccgqa_without_codegen
from ._compare import rel_err


@pytest.fixture(autouse=True)
def _fuse_on_cpu(monkeypatch):
    monkeypatch.setenv("CCGQA_FUSE_ON_CPU", "1")


@pytest.fixture
def _value_shift_only(monkeypatch):
    """Only this rewrite: the other fusions' patterns (tens of seconds to build, seconds
    per compile) are covered elsewhere; the full backend test below runs them all."""
    others = {name for name in config.FUSIONS if name != "value_shift"}
    monkeypatch.setattr(config, "disabled_fusions", others)


# float64 throughout, but the block's RoPE tables are built in float32 inside the graph
# (compiled and eager round them differently, ~1e-7), which the temperature's gradient (a
# sum over every logit) amplifies to ~1e-6; a shift applied wrongly is an O(1) error
TOLERANCE = 1e-5


def _compare(model, x, backend=ccgqa_without_codegen, dynamic=None):
    """Compiled vs eager (float64 copies of both): output, input and parameter grads."""
    model.zero_grad(set_to_none=True)  # (deepcopy does not copy .grad)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    x_c, x_e = (x.detach().clone().requires_grad_() for _ in range(2))
    out_c, out_e = compiled(x_c), eager(x_e)
    grad = torch.randn_like(out_e)
    out_c.backward(grad)
    out_e.backward(grad)
    assert rel_err(out_c, out_e) < TOLERANCE, rel_err(out_c, out_e)
    assert rel_err(x_c.grad, x_e.grad) < TOLERANCE
    for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert rel_err(p_c.grad, p_e.grad) < TOLERANCE, name
    return ccgqa_compile.report()


@pytest.mark.usefixtures("_value_shift_only")
@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    heads=st.sampled_from([(2, 1), (4, 2), (4, 4)]),
    head_dim=st.sampled_from([4, 8]),
    shift=st.sampled_from([1, 2]),
)
def test_ccgqa_value_shift_moves_onto_v(batch, seq, heads, head_dim, shift):
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    torch.manual_seed(seq)
    model = CCGQAttention(16, *heads, head_dim, value_shift_tokens=shift).double()
    rep = _compare(model, torch.randn(batch, seq, 16, dtype=torch.float64))
    assert rep.count("value_shift") == 1, str(rep)
    # V's two halves project the same x: one matmul
    assert f"idiom=linear_of_token_shift_{shift}_one_v_matmul" in str(rep), str(rep)


def test_the_full_backend_and_dynamic_sequence_lengths():
    """Every fusion, through real Inductor code generation, with every size symbolic (the
    slice bound is then T's symbol): one compilation, fused, exact for each length."""
    torch.manual_seed(0)
    model = CCGQAttention(16, 4, 2, 4).double()
    for seq in (5, 8, 11):
        rep = _compare(model, torch.randn(2, seq, 16, dtype=torch.float64), "ccgqa", True)
        assert len(rep.graphs) == 1 and rep.count("value_shift") == 1, str(rep)


class ShiftThenLinear(nn.Module):
    """One linear of a shifted input, spelled by ``variant``: "shift" is the CCGQA value
    shift (rewritten), the rest are near misses (left as written)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.proj = nn.Linear(16, 8, bias=variant == "bias")

    def forward(self, x):
        t = x.shape[1]
        if self.variant in ("shift", "bias"):
            x_prev = F.pad(x, (0, 0, 1, 0))[:, :t]
        elif self.variant == "next_token":  # pads the end: x_{t+1}
            x_prev = F.pad(x, (0, 0, 0, 1))[:, 1:]
        elif self.variant == "feature_dim":  # shifts features, not time
            x_prev = F.pad(x, (1, 0))[..., : x.shape[-1]]
        elif self.variant == "padded_with_ones":  # padding rows of 1: linear(1) != 0
            x_prev = F.pad(x, (0, 0, 1, 0), value=1.0)[:, :t]
        elif self.variant == "keeps_the_pad":  # all T + 1 rows
            x_prev = F.pad(x, (0, 0, 1, 0))
        else:
            raise ValueError(self.variant)
        return self.proj(x_prev) * 2 + 1


@pytest.mark.usefixtures("_value_shift_only")
@pytest.mark.parametrize(
    "variant, rewritten",
    [
        ("shift", True),
        ("bias", False),
        ("next_token", False),
        ("feature_dim", False),
        ("padded_with_ones", False),
        ("keeps_the_pad", False),
    ],
)
def test_only_the_exact_shift_is_rewritten(variant, rewritten):
    torch.manual_seed(0)
    model = ShiftThenLinear(variant).double()
    rep = _compare(model, torch.randn(2, 6, 16, dtype=torch.float64))
    assert rep.count("value_shift") == int(rewritten), str(rep)
    if variant == "bias":
        assert "the linear has a bias" in str(rep), str(rep)


@pytest.mark.usefixtures("_value_shift_only")
def test_disabled_by_name():
    torch.manual_seed(0)
    model = CCGQAttention(16, 4, 2, 4).double()
    compiled = torch.compile(model, backend="ccgqa", options={"ccgqa_disable": ["value_shift"]})
    compiled(torch.randn(2, 5, 16, dtype=torch.float64))
    assert ccgqa_compile.report().count("value_shift") == 0


class TwoHalves(nn.Module):
    """V as CCGQA builds it, ``cat((now(x), prev(x_prev)), -1)``, and variants whose two
    projections must stay two matmuls (the shift is still moved)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.now = nn.Linear(16, 8, bias=variant == "bias_on_now")
        self.prev = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        t = x.shape[1]
        x_prev = F.pad(x, (0, 0, 1, 0))[:, :t]
        now_in = x * 2 if self.variant == "other_input" else x
        now, prev = self.now(now_in), self.prev(x_prev)
        if self.variant == "not_concatenated":
            return now * prev
        if self.variant == "prev_first":
            return torch.cat((prev, now), dim=-1)
        return torch.cat((now, prev), dim=-1)


@pytest.mark.usefixtures("_value_shift_only")
@pytest.mark.parametrize(
    "variant, merged",
    [
        ("ccgqa", True),
        ("prev_first", True),
        ("bias_on_now", False),
        ("other_input", False),
        ("not_concatenated", False),
    ],
)
def test_v_halves_merge_into_one_matmul_only_when_exact(variant, merged):
    torch.manual_seed(0)
    rep = _compare(TwoHalves(variant).double(), torch.randn(2, 6, 16, dtype=torch.float64))
    assert rep.count("value_shift") == 1, str(rep)
    assert ("one_v_matmul" in str(rep)) == merged, str(rep)


# ---- the same shift, spelled as real implementations spell it --------------------------


def _shifted(x: torch.Tensor, spelling: str, s: int, state=None) -> torch.Tensor:
    """x (B, T, E) shifted by s tokens along T, zero rows entering, spelled ``spelling``;
    the near misses compute something else."""
    b, t, e = x.shape
    pos = torch.arange(t, device=x.device)[None, :, None]
    if spelling == "pad_then_slice":
        return F.pad(x, (0, 0, s, 0))[:, :t]
    if spelling == "slice_then_pad":  # figliola's CCA
        return F.pad(x[:, :-s], (0, 0, s, 0))
    if spelling == "negative_pad":
        return F.pad(x, (0, 0, s, -s))
    if spelling == "cat_zeros":
        return torch.cat([x.new_zeros(b, s, e), x[:, :-s]], 1)
    if spelling == "roll_zeroed_in_place":
        rolled = torch.roll(x, s, dims=1)
        rolled[:, :s] = 0
        return rolled
    if spelling == "roll_where":
        return torch.where(pos < s, 0.0, torch.roll(x, s, 1))
    if spelling == "roll_masked_fill":
        return torch.roll(x, s, 1).masked_fill(pos < s, 0.0)
    if spelling == "roll_times_mask":
        return torch.roll(x, s, 1) * (pos >= s)
    if spelling == "empty_then_slices":  # HYDRA's
        out = torch.empty_like(x)
        out[:, :s] = 0
        out[:, s:] = x[:, :-s]
        return out
    # near misses
    if spelling == "roll_wraps_around":
        return torch.roll(x, s, 1)
    if spelling == "pad_value_one":
        return F.pad(x[:, :-s], (0, 0, s, 0), value=1.0)
    if spelling == "replicate_pad":
        return F.pad(x.transpose(1, 2), (s, 0), mode="replicate").transpose(1, 2)[:, :t]
    if spelling == "feature_dim":
        return F.pad(x[..., :-s], (s, 0))
    if spelling == "per_batch_shift":
        return torch.cat([F.pad(x[i : i + 1, : t - i - s], (0, 0, i + s, 0)) for i in range(b)])
    if spelling == "slice_drops_the_first_rows":
        return F.pad(x[:, s:], (0, 0, s, 0))
    if spelling == "entering_rows_from_state":  # a decode state's previous rows
        return torch.cat([state.expand(b, s, e), x[:, :-s]], 1)
    if spelling == "entering_rows_from_x":  # the last rows enter first, detached
        return torch.cat([x[:, -s:].detach(), x[:, :-s]], 1)
    raise ValueError(spelling)


FUSING = [
    "pad_then_slice", "slice_then_pad", "negative_pad", "cat_zeros", "roll_zeroed_in_place",
    "roll_where", "roll_masked_fill", "roll_times_mask", "empty_then_slices",
]  # fmt: skip


class SpelledV(nn.Module):
    """CCGQA's V, ``cat((now(x), prev(shift(x))), -1)``, the shift spelled ``spelling``;
    ``seq_first``: x is (T, B, E), as SGLang holds its hidden states, shifted along dim 0."""

    def __init__(self, spelling: str, shift: int, bias: bool = False, seq_first: bool = False):
        super().__init__()
        self.spelling, self.shift, self.seq_first = spelling, shift, seq_first
        self.now = nn.Linear(16, 8, bias=False)
        self.prev = nn.Linear(16, 8, bias=bias)
        self.register_buffer("state", torch.randn(1, 1, 16))

    def forward(self, x):
        if self.seq_first:
            hs = x.transpose(0, 1).contiguous()  # (T, B, E)
            s = self.shift
            prev = F.pad(hs[:-s], (0, 0, 0, 0, s, 0))  # SGLang's CCA
            return torch.cat([self.now(hs), self.prev(prev)], -1).transpose(0, 1) * 2
        shifted = _shifted(x, self.spelling, self.shift, self.state)
        return torch.cat([self.now(x), self.prev(shifted)], -1)


def _compare_modes(model, x, training: bool):
    """Compiled vs eager in float64: outputs, and in training every gradient."""
    if training:
        return _compare(model, x)
    eager = copy.deepcopy(model)
    with torch.no_grad():
        out_c = torch.compile(model, backend=ccgqa_without_codegen)(x)
        out_e = eager(x)
    assert rel_err(out_c, out_e) < TOLERANCE, rel_err(out_c, out_e)
    return ccgqa_compile.report()


@pytest.mark.usefixtures("_value_shift_only")
@settings(max_examples=12, deadline=None)
@given(
    spelling=st.sampled_from([*FUSING, "seq_first"]),
    batch=st.integers(1, 3),
    seq=st.integers(3, 9),
    shift=st.sampled_from([1, 2]),
    training=st.booleans(),
)
def test_every_spelling_of_the_shift_is_moved(spelling, batch, seq, shift, training):
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    torch.manual_seed(seq)
    model = SpelledV(spelling, shift, seq_first=spelling == "seq_first").double()
    rep = _compare_modes(model, torch.randn(batch, seq, 16, dtype=torch.float64), training)
    assert rep.count("value_shift") == 1, str(rep)
    assert f"idiom=linear_of_token_shift_{shift}_one_v_matmul" in str(rep), str(rep)


@pytest.mark.usefixtures("_value_shift_only")
@pytest.mark.parametrize("spelling", [*FUSING, "seq_first"])
def test_each_spelling_is_moved_in_training(spelling):
    """Every spelling once, deterministically (hypothesis above samples them)."""
    torch.manual_seed(0)
    model = SpelledV(spelling, 1, seq_first=spelling == "seq_first").double()
    rep = _compare(model, torch.randn(2, 5, 16, dtype=torch.float64))
    assert rep.count("value_shift") == 1, str(rep)
    assert "idiom=linear_of_token_shift_1_one_v_matmul" in str(rep), str(rep)


@pytest.mark.usefixtures("_value_shift_only")
@pytest.mark.parametrize(
    "spelling, reason",
    [
        ("roll_wraps_around", "rows entering are not zero"),
        ("pad_value_one", "rows entering are not zero"),
        ("replicate_pad", "rows entering are not zero"),
        ("feature_dim", "no shift along a dim but the last"),
        ("per_batch_shift", "no shift along a dim but the last"),
        ("slice_drops_the_first_rows", "no shift along a dim but the last"),
        ("entering_rows_from_state", "another runtime tensor"),
        ("entering_rows_from_x", "rows entering are not zero"),
        ("bias", "the linear has a bias"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_near_misses_stay_as_written_and_are_reported(spelling, reason, training):
    torch.manual_seed(0)
    bias = spelling == "bias"
    model = SpelledV("roll_where" if bias else spelling, 1, bias=bias).double()
    rep = _compare_modes(model, torch.randn(2, 6, 16, dtype=torch.float64), training)
    assert rep.count("value_shift") == 0, str(rep)
    assert "rejected value_shift" in str(rep) and reason in str(rep), str(rep)


@pytest.mark.usefixtures("_value_shift_only")
def test_dynamic_lengths_with_a_spelling_that_reads_no_length():
    """``roll`` + in-place zeroing under symbolic sizes: proven at two lengths, one
    compilation exact at each."""
    torch.manual_seed(0)
    model = SpelledV("roll_zeroed_in_place", 2).double()
    for seq in (5, 8, 11):
        rep = _compare(model, torch.randn(2, seq, 16, dtype=torch.float64), dynamic=True)
        assert len(rep.graphs) == 1 and rep.count("value_shift") == 1, str(rep)


class ShiftReadTwice(nn.Module):
    """The shifted tensor also read outside the linear (``escapes``: still rewritten, the
    other reader keeps its value), or the tensor it shifts written in place after the shift
    copied it (``written_after``: the linear would read the new rows; left as written)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.now = nn.Linear(16, 8, bias=False)
        self.prev = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        h = x * 1.5
        if self.variant == "escapes":
            x_prev = torch.roll(h, 1, dims=1)
            x_prev[:, 0] = 0
            out = torch.cat([self.now(h), self.prev(x_prev)], -1)
            return out.sum(-1, keepdim=True) + x_prev
        x_prev = F.pad(h[:, :-1], (0, 0, 1, 0))
        h.mul_(2)  # after the pad copied h: x_prev keeps the old rows
        return torch.cat([self.now(h), self.prev(x_prev)], -1)


@pytest.mark.usefixtures("_value_shift_only")
@pytest.mark.parametrize("variant, fused", [("escapes", True), ("written_after", False)])
def test_a_shift_read_elsewhere_or_a_source_written_later(variant, fused):
    torch.manual_seed(0)
    rep = _compare(ShiftReadTwice(variant).double(), torch.randn(2, 6, 16, dtype=torch.float64))
    assert rep.count("value_shift") == int(fused), str(rep)
    if not fused:
        assert "writes h in place before the linear reads it" in str(rep), str(rep)
        assert "at linear:" not in str(rep), str(rep)  # now(h) is no shift: not considered
