"""Dynamic sequence length: one compilation serves every length, fusions fire, results match."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ccgqa_compile
from patterns import BY_NAME, Shape

from ._compare import assert_as_close_as_eager, assert_close
from .spellings import RopeGptFast


def _run_lengths(entry, compiled, eager, training, mark, lengths, **shape):
    """Compiled vs eager at each length: outputs, input and parameter gradients (each
    judged as the corpus judges it: directly, or against a float64 copy where fp32 itself
    is ill-conditioned, as a CCGQA temperature's gradient is). ``mark``: True for
    ``mark_dynamic`` on T, a callable for another marker (``maybe_mark_dynamic``), False
    for none. ``lengths``: sequence lengths, or (batch, seq) pairs."""
    marker = torch._dynamo.mark_dynamic if mark is True else mark
    reference = copy.deepcopy(eager).double()
    torch.manual_seed(0)
    for size in lengths:
        batch, seq = size if isinstance(size, tuple) else (shape.get("batch", 2), size)
        sizes = Shape(**{**shape, "batch": batch, "seq": seq})
        (x,) = entry.make_inputs(sizes, torch.float32, "cpu")
        x_c, x_e = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
        if marker:
            marker(x_c, 1)
        with torch.set_grad_enabled(training):
            out_c, out_e = compiled(x_c), eager(x_e)
        assert_close(out_c, out_e, torch.float32, f"{entry.name} seq={seq}")
        if training:
            g = torch.randn_like(out_e)
            out_c.backward(g)
            out_e.backward(g)
            reference(x.double()).backward(g.double())
            assert_close(x_c.grad, x_e.grad, torch.float32, f"{entry.name} seq={seq} dx")
            pairs = zip(compiled.named_parameters(), eager.parameters(), reference.parameters())
            for (name, p_c), p_e, p_r in pairs:
                assert_as_close_as_eager(
                    p_c.grad,
                    p_e.grad,
                    p_r.grad,
                    torch.float32,
                    f"seq={seq} d{name}",
                    ill_conditioned=name.split(".")[-1] == "temp",
                )
                p_c.grad = p_e.grad = p_r.grad = None


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize(
    "name", ["rms_hf_llama", "swiglu_hf_llama", "swiglu_fused_gate_up", "rope_hf_rotate_half"]
)
def test_mark_dynamic_sequence_compiles_once(name, training):
    entry = BY_NAME[name]
    model = entry.build(Shape())
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="ccgqa")
    _run_lengths(entry, compiled, eager, training, mark=True, lengths=(5, 9, 17))
    rep = ccgqa_compile.report()
    assert len(rep.graphs) == 1, f"recompiled: {len(rep.graphs)} graphs\n{rep}"
    assert rep.count(entry.fusion) == entry.expect, str(rep)


def _expected_qk_fusions(entry) -> tuple[int, int]:
    """(prologue, rope) fusions per graph: the prologue fusion takes RoPE with it; on a
    spelling it does not cover yet, RoPE fuses on its own (q and k)."""
    return (1, 0) if dict(entry.also).get("ccgqa_prologue") else (0, 2)


def _qk_fusions(report_or_graph, entry) -> tuple[int, int]:
    return report_or_graph.count("ccgqa_prologue"), report_or_graph.count("rope")


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("name", ["ccgqa_handwritten_core", "ccgqa_sdpa_repeat_kv"])
def test_ccgqa_block_mark_dynamic_sequence_compiles_once(name, training):
    """A whole CCGQA block (causal convs included) with T marked dynamic: one compilation
    for every length, attention and the prologue (or RoPE, where the prologue's spelling
    is not covered) fused, every gradient as eager. On torch 2.13
    this needs install_conv1d_backward_fallback (its conv backward lowering guarded T).
    T = 1 afterwards is Dynamo's 0/1 specialisation: a second graph, still correct."""
    entry = BY_NAME[name]
    model = entry.build(Shape(heads=2))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="ccgqa")
    torch._dynamo.utils.counters.clear()
    _run_lengths(entry, compiled, eager, training, mark=True, lengths=(6, 11, 19), heads=2)
    rep = ccgqa_compile.report()
    assert len(rep.graphs) == 1, f"recompiled: {len(rep.graphs)} graphs\n{rep}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert rep.count("gqa_attention") == 1, str(rep)
    assert _qk_fusions(rep, entry) == _expected_qk_fusions(entry), str(rep)
    assert not rep.graphs[0].forward_only, str(rep)
    _run_lengths(entry, compiled, eager, training, mark=False, lengths=(1,), heads=2)
    assert len(ccgqa_compile.report().graphs) == 2


# (batch, seq) pairs for dynamic=True: both vary (every dim is symbolic), none is 1 (0/1
# specialisation), and the first pair differs (equal hints would share one symbol)
_DYNAMIC_SIZES = ((2, 6), (3, 11), (4, 19))


def _compile_dynamic_true(name, heads):
    entry = BY_NAME[name]
    model = entry.build(Shape(heads=heads))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="ccgqa", dynamic=True)
    torch._dynamo.utils.counters.clear()
    return entry, compiled, eager


def _assert_one_graph():
    rep = ccgqa_compile.report()
    assert len(rep.graphs) == 1, f"recompiled: {len(rep.graphs)} graphs\n{rep}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    return rep


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("name", ["ccgqa_handwritten_core", "ccgqa_sdpa_repeat_kv"])
def test_ccgqa_block_dynamic_true_compiles_once_and_fuses(name, training):
    """``dynamic=True`` (every dim symbolic, batch included): one compilation for every
    batch size and length, attention (hand-written, or SDPA) and the q/k prologue fused
    (forward and backward), outputs and every gradient as eager. The hand-written attention
    and the prologue failed their exact re-trace before
    ``symbolic_sizes_as_pattern_inputs`` (B and T: two independent symbols)."""
    entry, compiled, eager = _compile_dynamic_true(name, heads=2)
    _run_lengths(entry, compiled, eager, training, False, _DYNAMIC_SIZES, heads=2)
    rep = _assert_one_graph()
    assert rep.count("gqa_attention") == 1, str(rep)
    assert _qk_fusions(rep, entry) == _expected_qk_fusions(entry) == (1, 0), str(rep)
    assert rep.count("ccgqa_block") == 1, str(rep)
    assert not rep.graphs[0].forward_only, str(rep)


@pytest.mark.parametrize(
    "name",
    [
        "attn_repeat_kv_tril",
        "attn_repeat_interleave_triu",
        "attn_near_non_causal",
        "attn_near_peeks_ahead",
    ],
)
@pytest.mark.parametrize("heads", [2, 4], ids=["hkv1", "hkv2"])
def test_handwritten_attention_dynamic_true(name, heads):
    """Hand-written causal GQA attention under ``dynamic=True`` (training): one compilation
    for every batch size and length, fused with its backward; the near misses (no mask,
    ``tril(1)``) still never fuse. Outputs and gradients as eager either way."""
    entry, compiled, eager = _compile_dynamic_true(name, heads)
    _run_lengths(entry, compiled, eager, True, False, _DYNAMIC_SIZES, heads=heads)
    rep = _assert_one_graph()
    assert rep.count("gqa_attention") == entry.expect, str(rep)
    assert not rep.graphs[0].forward_only, str(rep)


@pytest.mark.parametrize(
    "name", ["ccgqa_near_symmetric_conv_padding", "ccgqa_near_mean_wrong_heads"]
)
def test_ccgqa_block_near_miss_dynamic_true(name):
    """The block near misses under ``dynamic=True``: their genuine attention core fuses,
    the q/k prologue (convs that see later tokens, a mean over the wrong heads) does not.
    Four query heads over two kv heads: with one kv head the strided mean is the right one."""
    entry, compiled, eager = _compile_dynamic_true(name, heads=4)
    _run_lengths(entry, compiled, eager, True, False, _DYNAMIC_SIZES, heads=4)
    rep = _assert_one_graph()
    assert entry.block_near_miss
    assert rep.count("gqa_attention") == entry.expect == 1, str(rep)
    assert rep.count("ccgqa_prologue") == 0, str(rep)
    assert rep.count("ccgqa_block") == 0, str(rep)


def test_ccgqa_block_maybe_dynamic_sequence():
    """``maybe_mark_dynamic`` on T (Dynamo may or may not generalise): every length matches
    eager, outputs and gradients, with attention and the prologue (and their backwards)
    fused in every graph compiled."""
    entry = BY_NAME["ccgqa_handwritten_core"]
    model = entry.build(Shape(heads=2))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="ccgqa")
    maybe = torch._dynamo.maybe_mark_dynamic
    _run_lengths(entry, compiled, eager, True, mark=maybe, lengths=(6, 11, 19), heads=2)
    rep = ccgqa_compile.report()
    assert 1 <= len(rep.graphs) <= 3, str(rep)
    for graph in rep.graphs:
        assert graph.count("gqa_attention") == 1, str(rep)
        assert _qk_fusions(graph, entry) == _expected_qk_fusions(entry), str(rep)
        assert not graph.forward_only, str(rep)


class _AttributeEpsNorm(torch.nn.Module):
    """gpt-fast's RMSNorm: eps a float attribute, which ``dynamic=True`` lifts to an input
    read with ``.item()`` (its value is not known when compiling). ``form`` spells a norm
    (``mean``, ``F.rms_norm``, eps doubled before use) or a near miss (eps outside the sqrt,
    eps added after the norm)."""

    def __init__(self, dim, form, eps=1e-5):
        super().__init__()
        self.eps, self.form = eps, form
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(dim))

    def forward(self, x):
        if self.form == "rms_norm":
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        ms = torch.mean(x * x, dim=-1, keepdim=True)
        if self.form == "mean":
            return x * torch.rsqrt(ms + self.eps) * self.weight
        if self.form == "doubled":
            return x * torch.rsqrt(ms + 2 * self.eps) * self.weight
        if self.form == "near_eps_outside_sqrt":
            return x / (torch.sqrt(ms) + self.eps) * self.weight
        assert self.form == "near_eps_after"
        return x * torch.rsqrt(ms) * self.weight + self.eps


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize(
    "form", ["mean", "rms_norm", "doubled", "near_eps_outside_sqrt", "near_eps_after"]
)
def test_rms_norm_eps_lifted_to_an_input(form, training):
    """Under ``dynamic=True`` a float eps attribute reaches the graph as a run-time scalar:
    the norm fuses with eps read when it runs (changing the attribute afterwards changes
    the result, as in eager, without a recompile); a run-time scalar anywhere but inside
    the sqrt is not an eps and the region is not fused there. Outputs and gradients as
    eager, at rows small enough for eps to matter. ``F.rms_norm`` takes eps as a Python
    float, so Dynamo fixes it and compiles again when it changes; every graph is checked."""
    torch.manual_seed(0)
    model = _AttributeEpsNorm(48, form)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="ccgqa", dynamic=True)
    for step, (shape, eps) in enumerate((((2, 5, 48), 1e-5), ((3, 7, 48), 1e-2))):
        model.eps = eager.eps = eps
        x = torch.randn(shape) * (1.0 if step == 0 else 0.05)
        x_c, x_e = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            out_c, out_e = compiled(x_c), eager(x_e)
        assert_close(out_c, out_e, torch.float32, f"{form} eps={eps}")
        if training:
            g = torch.randn_like(out_e)
            out_c.backward(g)
            out_e.backward(g)
            assert_close(x_c.grad, x_e.grad, torch.float32, f"{form} dx")
            assert_close(model.weight.grad, eager.weight.grad, torch.float32, f"{form} dw")
            model.weight.grad = eager.weight.grad = None
    rep = ccgqa_compile.report()
    if form == "mean":  # (torch 2.11 fixes a doubled eps: it cannot tensorify 2 * eps)
        assert len(rep.graphs) == 1, f"eps was fixed, not read when the program runs\n{rep}"
    for graph in rep.graphs:
        if form.startswith("near"):
            assert graph.count("rms_norm") == 0 or "not beyond" in str(rep), str(rep)
        else:
            assert graph.count("rms_norm") == 1, str(rep)


class _GptFastRope(torch.nn.Module):
    """gpt-fast's rotary embedding: q and k from projections, (T, D/2, 2) cos/sin pairs
    indexed by the positions, x reshaped to pairs with its own sizes (under
    ``dynamic=True`` the region reads the uncast projection's sizes, not its values). The
    table is a plain attribute, as gpt-fast keeps it: Dynamo makes its sizes symbols, then
    fixes them to numbers when the view needs them."""

    def __init__(self, dim=64, heads=4, kv_heads=2, head_dim=16, max_len=64):
        super().__init__()
        self.shape = (heads, kv_heads, head_dim)
        self.wq = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = torch.nn.Linear(dim, kv_heads * head_dim, bias=False)
        freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(max_len).float(), freqs)
        self.freqs_cis = torch.stack([angles.cos(), angles.sin()], dim=-1)

    def forward(self, x, input_pos):
        b, t, _ = x.shape
        heads, kv_heads, head_dim = self.shape
        q = self.wq(x).view(b, t, heads, head_dim)
        k = self.wk(x).view(b, t, kv_heads, head_dim)
        freqs_cis = self.freqs_cis[input_pos]
        rotate = RopeGptFast.apply_rotary_emb
        return rotate(q, freqs_cis), rotate(k, freqs_cis)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_gpt_fast_rope_dynamic_true(training):
    """gpt-fast compiles its prefill with ``dynamic=True``: both rotations fuse, outputs
    and gradients as eager at every length."""
    torch.manual_seed(0)
    model = _GptFastRope()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="ccgqa", dynamic=True)
    for b, t in _DYNAMIC_SIZES:
        x = torch.randn(b, t, 64)
        pos = torch.arange(3, 3 + t)
        x_c, x_e = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            out_c, out_e = compiled(x_c, pos), eager(x_e, pos)
        for name, a, e in zip("qk", out_c, out_e):
            assert_close(a, e, torch.float32, f"{name} T={t}")
        if training:
            g = [torch.randn_like(o) for o in out_e]
            torch.autograd.backward(out_c, g)
            torch.autograd.backward(out_e, g)
            assert_close(x_c.grad, x_e.grad, torch.float32, f"dx T={t}")
    rep = ccgqa_compile.report()  # Dynamo fixes B in the first graph (Inductor alone too)
    assert 1 <= len(rep.graphs) <= 2, str(rep)
    for graph in rep.graphs:
        assert graph.count("rope") == 2, str(rep)


class _FractionSlicedTaps(torch.nn.Module):
    """RoPE on the first ``int(self.fraction * d)`` dims (all of them here), each product a
    slice of x: under ``dynamic=True`` the lifted float makes the slice bound a size no
    assignment gives. The convolution reader raised on this sum of slices, and the RoPE
    reader hashed the symbolic width."""

    fraction = 1.0

    def forward(self, x, cos, sin):
        d = x.shape[-1]
        r = int(self.fraction * d)
        rot = torch.cat([-x[..., d // 2 : r], x[..., : d // 2]], -1)
        return torch.cat([x[..., :r] * cos + rot * sin, x[..., r:]], -1)


def test_sum_of_slices_with_a_float_sized_bound():
    torch.manual_seed(0)
    model = _FractionSlicedTaps()
    compiled = torch.compile(model, backend="ccgqa", dynamic=True)
    x, cos, sin = torch.randn(2, 7, 4, 16), torch.randn(7, 1, 16), torch.randn(7, 1, 16)
    assert_close(compiled(x, cos, sin), model(x, cos, sin), torch.float32, "rope")


class _DecodeStepFractionRope(torch.nn.Module):
    """An outside author's HF-style CCGQA decode step (a conv state concatenated in front,
    the cache joined by ``cat``) with its RoPE width ``int(d * self.fraction)`` computed in
    the forward: ``dynamic=True`` makes it symbolic. The RoPE reader hashed it (a SymInt)
    and the convolution reader failed on it: each failed the compile under CCGQA_STRICT."""

    E, HQ, HKV, D, K1, K2 = 32, 4, 2, 8, 2, 2
    fraction = 1.0

    def __init__(self):
        super().__init__()
        cq, ckv = self.HQ * self.D, self.HKV * self.D
        c = cq + ckv
        self.wq, self.wk = torch.nn.Linear(self.E, cq, bias=False), torch.nn.Linear(self.E, ckv, bias=False)
        self.wv, self.wo = torch.nn.Linear(self.E, ckv, bias=False), torch.nn.Linear(cq, self.E, bias=False)
        self.conv1 = torch.nn.Conv1d(c, c, self.K1, groups=c)
        self.conv2 = torch.nn.Conv1d(c, c, self.K2, groups=self.HQ + self.HKV)
        self.temp = torch.nn.Parameter(0.3 * torch.randn(self.HKV))

    def forward(self, x, past_k, past_v, conv_state):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        g, cq = hq // hkv, hq * d
        qp, kp = self.wq(x), self.wk(x)
        full = torch.cat([conv_state, torch.cat([qp, kp], -1).transpose(1, 2)], -1)
        qc, kc = self.conv2(self.conv1(full)).transpose(1, 2).split([cq, hkv * d], -1)
        m = (qp.view(b, t, hq, d) + kp.view(b, t, hkv, d).repeat_interleave(g, 2)) * 0.5
        q = qc.view(b, t, hq, d) + m
        k = kc.view(b, t, hkv, d) + m.view(b, t, hkv, g, d).mean(3)
        q = q * (d**0.5 / q.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        k = k * (d**0.5 / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)) * self.temp.exp()[:, None]
        s0 = past_k.shape[2]
        f = torch.arange(s0, s0 + t)[:, None].float() / 10000 ** (torch.arange(0, d, 2).float() / d)
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        r = int(d * self.fraction)

        def rope(z):
            zr = z[..., :r]
            turned = torch.cat([-zr[..., d // 2 :], zr[..., : d // 2]], -1)
            return torch.cat([zr * cos + turned * sin, z[..., r:]], -1)

        q, k = rope(q), torch.cat([past_k, rope(k)], 2)
        v = torch.cat([past_v, self.wv(x).view(b, t, hkv, d).transpose(1, 2)], 2)
        a = torch.softmax(q @ k.repeat_interleave(g, 1).transpose(-1, -2) / d**0.5, -1)
        o = (a @ v.repeat_interleave(g, 1)).transpose(1, 2).reshape(b, t, cq)
        return self.wo(o), k, v, full[..., -(self.K1 + self.K2 - 2) :]


def test_decode_step_with_a_float_sized_rope_width():
    torch.manual_seed(0)
    model = _DecodeStepFractionRope()
    compiled = torch.compile(model, backend="ccgqa", dynamic=True)
    m = model
    c, w = (m.HQ + m.HKV) * m.D, m.K1 + m.K2 - 2
    state = (torch.randn(1, m.HKV, 6, m.D), torch.randn(1, m.HKV, 6, m.D), torch.randn(1, c, w))
    ref_state = state
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 1, m.E)
            out, *state = compiled(x, *state)
            ref, *ref_state = model(x, *ref_state)
            assert_close(out, ref, torch.float32, "decode step")


class _OutsideTablesBlock(torch.nn.Module):
    """A CCGQA block as HF writes one: RoPE tables handed in by the caller (their width
    is symbolic under ``dynamic=True``) and the norm scale a float attribute (``dynamic=True``
    lifts it to a run-time scalar). ``form`` spells the norm scale: ``attribute`` (ZAYA's
    ``x * (scale / |x|)``), ``divided`` (``x / |x| * scale``), ``sqrt`` (``sqrt(scale)``: a
    scalar computed from the run-time one), or near misses the op's outputs times the
    scalar do not compute: ``q_only`` (k's scale a constant) and ``added`` (the scalar
    added to q and k)."""

    E, HQ, HKV, D, K = 32, 4, 2, 8, 2

    def __init__(self, form):
        super().__init__()
        self.form, self.scale = form, self.D**0.5
        cq, ckv = self.HQ * self.D, self.HKV * self.D
        self.wq, self.wk = torch.nn.Linear(self.E, cq, bias=False), torch.nn.Linear(self.E, ckv, bias=False)
        self.wv, self.wo = torch.nn.Linear(self.E, ckv, bias=False), torch.nn.Linear(cq, self.E, bias=False)
        self.q1, self.k1 = torch.nn.Conv1d(cq, cq, self.K, groups=cq), torch.nn.Conv1d(ckv, ckv, self.K, groups=ckv)
        self.q2 = torch.nn.Conv1d(cq, cq, self.K, groups=self.HQ)
        self.k2 = torch.nn.Conv1d(ckv, ckv, self.K, groups=self.HKV)
        self.temp = torch.nn.Parameter(0.3 * torch.randn(self.HKV))

    def _scaled(self, x, stream):
        norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        if self.form == "divided":
            return x / norm * self.scale
        if self.form == "sqrt":
            return x * (self.scale**0.5 / norm)
        if self.form == "q_only" and stream == "k":
            return x * (self.D**0.5 / norm)
        if self.form == "added":
            return x * (self.D**0.5 / norm) + self.scale
        return x * (self.scale / norm)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        hq, hkv, d, g = self.HQ, self.HKV, self.D, self.HQ // self.HKV
        qp, kp = self.wq(x), self.wk(x)

        def conv(z, c1, c2):
            z = F.pad(z.transpose(1, 2), (self.K - 1, 0))
            return c2(F.pad(c1(z), (self.K - 1, 0))).transpose(1, 2)

        m = (qp.view(b, t, hq, d) + kp.view(b, t, hkv, d).repeat_interleave(g, 2)) * 0.5
        q = conv(qp, self.q1, self.q2).view(b, t, hq, d) + m
        k = conv(kp, self.k1, self.k2).view(b, t, hkv, d) + m.view(b, t, hkv, g, d).mean(3)
        q, k = self._scaled(q, "q"), self._scaled(k, "k") * self.temp[:, None]
        r = cos.shape[-1]

        def rope(z):  # on the first r dims of each head, rotate-half
            zr, rest = z[..., :r], z[..., r:]
            turned = torch.cat([-zr[..., r // 2 :], zr[..., : r // 2]], -1)
            return torch.cat([zr * cos[:, :, None] + turned * sin[:, :, None], rest], -1)

        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        v = self.wv(x).view(b, t, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(b, t, hq * d))


def _tables(t, r):
    f = torch.arange(t)[:, None].float() / 100 ** (torch.arange(0, r, 2).float() / r)
    f = torch.cat([f, f], -1)[None]
    return f.cos(), f.sin()


@pytest.mark.parametrize("form", ["attribute", "divided", "sqrt", "q_only", "added"])
def test_norm_scale_and_table_width_lifted_by_dynamic(form):
    """Under ``dynamic=True`` the norm scale arrives as a run-time scalar and the caller's
    RoPE tables with a symbolic width: the prologue fuses with its outputs times the scalar
    and the width fixed by a guard (a call with other tables recompiles and still agrees
    with eager); the near misses, not proportional to the scalar as the op would make
    them, are not fused. Outputs and gradients against eager at two lengths."""
    torch.manual_seed(0)
    model = _OutsideTablesBlock(form)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="ccgqa", dynamic=True)
    for t, r in ((7, 4), (11, 4), (9, 8)):
        x = torch.randn(2, t, model.E)
        x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_c, out_e = compiled(x_c, *_tables(t, r)), eager(x_e, *_tables(t, r))
        assert_close(out_c, out_e, torch.float32, f"{form} T={t} r={r}")
        g = torch.randn_like(out_e)
        out_c.backward(g)
        out_e.backward(g)
        assert_close(x_c.grad, x_e.grad, torch.float32, f"{form} dx")
        for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters()):
            assert_close(p_c.grad, p_e.grad, torch.float32, f"{form} d{name}")
            p_c.grad = p_e.grad = None
    rep = ccgqa_compile.report()
    assert len(rep.graphs) == 2, f"one graph per table width\n{rep}"
    for graph in rep.graphs:
        assert graph.count("ccgqa_prologue") == (form in ("attribute", "divided", "sqrt")), str(rep)
