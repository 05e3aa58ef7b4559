"""``torch.ops.ccgqa.ccgqa_prologue``: the composite against patterns/ccgqa.py and the
float64 reference, gradcheck, opcheck, symbolic shapes, rejection of what it does not
compute, and the op <-> kernel wiring under the Triton interpreter (see
tests/test_ops_kernel_wiring.py for the CCGQA_INTERPRET_KERNELS_ON_CPU hook)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ccgqa_compile  # noqa: F401
from ccgqa_compile.kernels import ccgqa_prologue as prologue_kernels
from ccgqa_compile.ops import _dispatch
from patterns.ccgqa import CCGQAttention
from patterns.rope import rotary_tables

from ._compare import rel_err

ops = torch.ops.ccgqa
f64 = torch.float64


def _signed(*shape, dtype=torch.float64, device="cpu", generator=None):
    t = torch.rand(*shape, generator=generator) + 0.5
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (t * sign).to(device=device, dtype=dtype)


def make_args(
    b=2,
    t=5,
    heads=4,
    kv_heads=2,
    d=8,
    k1=2,
    k2=2,
    bias=True,
    qk_mean=True,
    temperature="exp",
    rotary_dim=None,
    interleaved=False,
    norm_scale=None,
    scalar_temp=False,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    eps=1e-12,
    eps_mode=None,
):
    """Random op arguments (13 tensors, then the 8 scalars, and ``eps_mode`` when given),
    values away from zero."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return _signed(*shape, dtype=dtype, device=device, generator=gen) * scale

    e_q, e_kv = heads * d, kv_heads * d
    rotary_dim = d if rotary_dim is None else rotary_dim
    temp = None
    if temperature != "none":
        temp = r(1 if scalar_temp else kv_heads, scale=0.3)
    cos = sin = None
    if rotary_dim:
        cos, sin = r(t, rotary_dim), r(t, rotary_dim)
    tensors = [
        r(b, t, e_q),
        r(b, t, e_kv),
        r(e_q, 1, k1, scale=0.5),
        r(e_q, scale=0.3) if bias else None,
        r(e_q, d, k2, scale=1 / d),
        r(e_q, scale=0.3) if bias else None,
        r(e_kv, 1, k1, scale=0.5),
        r(e_kv, scale=0.3) if bias else None,
        r(e_kv, d, k2, scale=1 / d),
        r(e_kv, scale=0.3) if bias else None,
        temp,
        cos,
        sin,
    ]
    scale = math.sqrt(d) if norm_scale is None else norm_scale
    mean = "group" if qk_mean else "none"
    scalars = [heads, kv_heads, mean, temperature, scale, eps, rotary_dim, interleaved]
    if eps_mode is not None:
        scalars.append(eps_mode)
    return tensors, scalars


def reference(*args):
    """The kernels' naive reference on the op's arguments (it takes the group mean as a
    flag: the op's qk_mean "group" or "none")."""
    args = list(args)
    args[15] = args[15] == "group"
    return prologue_kernels.ccgqa_prologue_reference(*args)


def _module_q_k(module: CCGQAttention, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The q and k ``module`` hands its attention core (the core itself not run)."""
    captured = {}

    def capture(q, k, v):
        captured.update(q=q, k=k)
        return q

    module._attend = capture
    module(x)
    return captured


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(value_shift=False, rotary_fraction=0.5, temperature="raw", conv_kernels=(3, 2)),
        dict(qk_mean=False, temperature="none", conv_kernels=(1, 3)),
    ],
    ids=["canonical", "half-rotary-raw", "no-mean-no-temp"],
)
def test_composite_equals_the_reference_module(options):
    """Bit for bit in float64: the op computes what patterns/ccgqa.py computes."""
    torch.manual_seed(0)
    m = CCGQAttention(32, 4, 2, 8, **options).double()
    if m.temp is not None:
        with torch.no_grad():
            m.temp.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 32, dtype=f64)
    captured = _module_q_k(m, x)
    cos, sin = rotary_tables(5, m.rotary_dim, x.device, x.dtype)
    q, k = ops.ccgqa_prologue(
        m.q_proj(x), m.k_proj(x),
        m.q_conv1.weight, m.q_conv1.bias, m.q_conv2.weight, m.q_conv2.bias,
        m.k_conv1.weight, m.k_conv1.bias, m.k_conv2.weight, m.k_conv2.bias,
        m.temp, cos, sin,
        m.h_q, m.h_kv, "group" if m.qk_mean else "none", m.temperature, math.sqrt(m.d), 1e-12, m.rotary_dim, False,
    )  # fmt: skip
    torch.testing.assert_close(q, captured["q"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(k, captured["k"], rtol=1e-13, atol=1e-13)


GRAD_CASES = [
    dict(),
    dict(k1=3, k2=1, temperature="raw", rotary_dim=2, interleaved=True),
    dict(k1=1, k2=3, qk_mean=False, temperature="none", bias=False, rotary_dim=0),
    dict(heads=2, kv_heads=2, t=1, scalar_temp=True, norm_scale=1.0),
    # eps where it decides, added to the norm or under the square root (both smooth)
    dict(eps=1.0, eps_mode="add"),
    dict(eps=2.0, eps_mode="sqrt", temperature="raw"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=range(len(GRAD_CASES)))
def test_gradcheck(case):
    shape = dict(b=1, t=3, heads=2, kv_heads=1, d=4)
    tensors, scalars = make_args(**{**shape, **case})
    inputs = [x.requires_grad_() if x is not None and i < 11 else x for i, x in enumerate(tensors)]

    def fn(*tensors):
        return ops.ccgqa_prologue(*tensors, *scalars)

    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)


@pytest.mark.parametrize("case", GRAD_CASES, ids=range(len(GRAD_CASES)))
def test_composite_matches_reference_and_its_autograd(case):
    tensors, scalars = make_args(**case)
    leaves = [x.requires_grad_() if x is not None and i < 11 else x for i, x in enumerate(tensors)]
    q, k = ops.ccgqa_prologue(*leaves, *scalars)
    q_ref, k_ref = reference(*leaves, *scalars)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    wrt = [x for x in leaves[:11] if x is not None]
    grads = torch.autograd.grad((q, k), wrt, (gq, gk))
    grads_ref = torch.autograd.grad((q_ref, k_ref), wrt, (gq, gk))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("case", [dict(), GRAD_CASES[1], GRAD_CASES[3]], ids=range(3))
def test_opcheck(case):
    shape = dict(b=1, t=3, heads=2, kv_heads=1, d=4)
    tensors, scalars = make_args(dtype=torch.float32, **{**shape, **case})
    for i in range(11):
        if tensors[i] is not None:
            tensors[i].requires_grad_()
    torch.library.opcheck(ops.ccgqa_prologue.default, (*tensors, *scalars))


def test_backward_opcheck():
    tensors, scalars = make_args(b=1, t=3, heads=2, kv_heads=1, d=4, dtype=torch.float32)
    dq, dk = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    torch.library.opcheck(ops.ccgqa_prologue_backward.default, (dq, dk, *tensors, *scalars))


def test_fake_impl_with_symbolic_batch_and_time():
    tensors, scalars = make_args(b=3, t=7, dtype=torch.float32)

    def fn(*args):
        return ops.ccgqa_prologue(*args[:10], None, *args[10:], *scalars)

    present = [*tensors[:10], tensors[11], tensors[12]]  # all but temp
    scalars[3] = "none"
    gm = make_fx(fn, tracing_mode="symbolic")(*present)
    outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    q_shape, k_shape = (o.meta["val"].shape for o in outs)
    assert not str(q_shape[0]).isdigit() and not str(q_shape[2]).isdigit(), q_shape
    assert (q_shape[1], q_shape[3], k_shape[1], k_shape[3]) == (4, 8, 2, 8)


def test_per_batch_tables():
    tensors, scalars = make_args(b=2, t=4)
    gen = torch.Generator().manual_seed(3)
    tensors[11] = _signed(2, 1, 4, 8, generator=gen)
    tensors[12] = _signed(2, 1, 4, 8, generator=gen)
    q, k = ops.ccgqa_prologue(*tensors, *scalars)
    q_ref, k_ref = reference(*tensors, *scalars)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)


def _variant(index, value):
    def change(tensors, scalars):
        tensors[index] = value(tensors)

    return change


@pytest.mark.parametrize(
    "change, match",
    [
        # two channels per conv1 group, two heads per conv2 group: neither form
        (_variant(2, lambda t: torch.randn(32, 2, 2, dtype=f64)), "depthwise"),
        (_variant(4, lambda t: torch.randn(32, 16, 2, dtype=f64)), "grouped per head"),
        (lambda t, s: s.__setitem__(2, "heads"), "qk_mean"),
        (_variant(8, lambda t: torch.randn(16, 8, 3, dtype=f64)), "conv2"),
        (_variant(3, lambda t: torch.randn(8, dtype=f64)), "bias"),
        (_variant(10, lambda t: torch.randn(3, dtype=f64)), "temp"),
        (_variant(11, lambda t: torch.randn(2, 4, 5, 8, dtype=f64)), "per head"),
        (lambda t, s: s.__setitem__(3, "sigmoid"), "temperature"),
        (lambda t, s: s.__setitem__(6, 6), "cos"),
        (lambda t, s: s.__setitem__(1, 3), "multiple"),
    ],
)
def test_rejects_what_it_does_not_compute(change, match):
    tensors, scalars = make_args()
    change(tensors, scalars)
    with pytest.raises(ValueError, match=match):
        ops.ccgqa_prologue(*tensors, *scalars)


# ----------------------------------------------------------------------------
# The kernel path (op -> launch wrappers -> kernels -> registered backward op).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        dict(b=1, t=9, d=16),
        dict(t=1, d=16, heads=2, kv_heads=1, temperature="raw", rotary_dim=8, k1=3, k2=1),
        dict(b=1, t=6, d=32, heads=2, qk_mean=False, bias=False, rotary_dim=12, interleaved=True),
    ],
    ids=["canonical-T9", "T1-raw-half", "nomean-interleaved"],
)
def test_kernel_path_matches_fp64_composite(device, case):
    tensors, scalars = make_args(dtype=torch.float32, device=device, seed=5, **case)
    assert _dispatch.use_triton(*[x for x in tensors if x is not None])
    leaves = [x.requires_grad_() if x is not None and i < 11 else x for i, x in enumerate(tensors)]
    q, k = ops.ccgqa_prologue(*leaves, *scalars)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    wrt = [x for x in leaves[:11] if x is not None]
    grads = torch.autograd.grad((q, k), wrt, (gq, gk))

    leaves64 = [
        x.detach().double().requires_grad_(i < 11) if x is not None else None
        for i, x in enumerate(tensors)
    ]
    q64, k64 = ops.ccgqa_prologue(*leaves64, *scalars)  # fp64: the composite
    wrt64 = [x for x in leaves64[:11] if x is not None]
    grads64 = torch.autograd.grad((q64, k64), wrt64, (gq.double(), gk.double()))
    for name, got, want in [("q", q, q64), ("k", k, k64), *zip(range(11), grads, grads64)]:
        assert torch.isfinite(got).all(), name
        assert got.dtype == torch.float32, name
        err = rel_err(got, want)
        assert err < 1e-4, (name, err)


@pytest.mark.cuda
# dynamic=True failed on torch 2.11 until the op specialised its head counts and
# rotary_dim (ops/ccgqa_prologue.py ``_structural``); passed on the H100 since.
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_cuda_compiled_op_inlines_both_kernels(dynamic):
    """Under torch.compile the triton_op and its backward triton_op are inlined: all three
    kernels appear in Inductor's code, and the results equal the eager op's."""
    if not torch.cuda.is_available() or _dispatch.os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET=0")
    from torch._inductor.utils import run_and_get_code

    tensors, scalars = make_args(
        b=2, t=70, heads=8, kv_heads=2, d=32, dtype=torch.bfloat16, device="cuda", seed=4
    )

    def leaves():
        return [
            x.detach().clone().requires_grad_(i < 11) if x is not None else None
            for i, x in enumerate(tensors)
        ]

    def loss(*args):
        q, k = ops.ccgqa_prologue(*args, *scalars)
        ramp = torch.arange(q.shape[-1], device=q.device)
        return (q.float() * ramp).sum() + k.float().pow(2).sum()

    eager_in = leaves()
    eager = loss(*eager_in)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    compiled_in = leaves()

    def step():
        out = compiled(*compiled_in)
        out.backward()
        return out

    out, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert "_ccgqa_prologue_fwd_kernel" in code
    assert "_ccgqa_prologue_draw_kernel" in code
    assert "_ccgqa_prologue_conv_bwd_kernel" in code
    assert rel_err(out, eager) < 1e-3
    for i, (a, b) in enumerate(zip(compiled_in, eager_in)):
        if a is not None and a.grad is not None:
            assert rel_err(a.grad, b.grad) < 1e-2, i


def _prologue_only_backend(codegen: bool = True):
    """Inductor with only the prologue recognition on (attention sites are still found,
    not replaced)."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    from ccgqa_compile.passes import RecognitionPass, ReportPass

    def run_eagerly(gm, example_inputs, **kwargs):
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        patches = {
            "pre_grad_custom_pass": RecognitionPass(("ccgqa_prologue",), fuse_on_cpu=True),
            "joint_custom_pre_pass": ReportPass(),
        }
        extra = {} if codegen else {"inner_compile": run_eagerly}
        return compile_fx(gm, example_inputs, config_patches=patches, **extra)

    return backend


def test_recognition_fuses_the_inference_prologue():
    """The prologue recognition alone replaces patterns/ccgqa.py's prologue in an
    inference graph by the op, with the same result."""
    backend = _prologue_only_backend()
    torch.manual_seed(0)
    m = CCGQAttention(32, 4, 2, 8, rotary_fraction=0.5, temperature="raw").eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        expected = m(x)
        out = torch.compile(m, backend=backend, fullgraph=True)(x)
    assert ccgqa_compile.report().count("ccgqa_prologue") == 1, str(ccgqa_compile.report())
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("head_dim", [64, 128])
def test_recognition_fuses_large_head_dims(head_dim):
    """No head dim is left to Inductor: ZAYA's d = 128 prologue fuses too."""
    backend = _prologue_only_backend()
    torch.manual_seed(0)
    m = CCGQAttention(2 * head_dim, 2, 1, head_dim).eval()
    x = torch.randn(1, 5, 2 * head_dim)
    with torch.no_grad():
        expected = m(x)
        out = torch.compile(m, backend=backend, fullgraph=True)(x)
    rep = ccgqa_compile.report()
    assert rep.count("ccgqa_prologue") == 1, str(rep)
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize(
    "heads, kv_heads", [(4, 2), (3, 1), (2, 2)], ids=["grouped", "single-kv-head", "ungrouped"]
)
def test_recognition_fuses_the_training_prologue(heads, kv_heads):
    """Replaced before autograd: the op's own backward is differentiated, and every
    gradient, x's included, matches eager."""
    backend = _prologue_only_backend()
    torch.manual_seed(0)
    m = CCGQAttention(heads * 8, heads, kv_heads, 8)
    x = torch.randn(2, 6, heads * 8, requires_grad=True)
    m(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    m.zero_grad()
    x.grad = None
    torch.compile(m, backend=backend, fullgraph=True)(x).pow(2).sum().backward()
    assert ccgqa_compile.report().count("ccgqa_prologue") == 1, str(ccgqa_compile.report())
    for got, want in zip([p.grad for p in m.parameters()] + [x.grad], expected):
        assert rel_err(got, want) < 1e-5


LAYOUTS = {"grouped": (4, 2), "single-kv-head": (3, 1), "ungrouped": (2, 2)}
SPELLINGS = {
    "no-mean": dict(qk_mean=False, temperature="none"),
    "no-mean-exp-norm-div-half-rotary": dict(qk_mean=False, l2norm="norm_div", rotary_fraction=0.5),
    "norm-div-raw": dict(l2norm="norm_div", temperature="raw"),
    "norm-div-no-temperature-half-rotary": dict(
        l2norm="norm_div", temperature="none", rotary_fraction=0.5
    ),
    "zyphra-concat-raw": dict(qk_concat=True, temperature="raw"),
    "zyphra-concat-exp-half-rotary": dict(qk_concat=True, rotary_fraction=0.5),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_recognition_fuses_each_spelling(spelling, layout):
    """Training graphs of the corpus's spellings in each head layout: one prologue op takes
    both convs of q and k, and every gradient matches eager. The Zyphra spelling's biases
    are scaled up so that conv1's bias at the padded steps (folded into conv2's bias)
    weighs in."""
    heads, kv_heads = LAYOUTS[layout]
    torch.manual_seed(0)
    m = CCGQAttention(heads * 8, heads, kv_heads, 8, **SPELLINGS[spelling])
    with torch.no_grad():
        if m.temp is not None:
            m.temp.uniform_(-0.5, 0.5)
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.mul_(4)
    x = torch.randn(2, 6, heads * 8, requires_grad=True)
    expected = m(x)
    grad = torch.randn_like(expected)
    wrt = [x, *m.parameters()]
    want = torch.autograd.grad(expected, wrt, grad)
    compiled = torch.compile(m, backend=_prologue_only_backend(codegen=False), fullgraph=True)
    out = compiled(x)
    rep = ccgqa_compile.report()
    assert rep.count("ccgqa_prologue") == 1, str(rep)
    assert rel_err(out, expected) < 1e-5
    for i, (got, ref) in enumerate(zip(torch.autograd.grad(out, wrt, grad), want)):
        assert rel_err(got, ref) < 1e-5, i


def test_zyphra_concat_conv_equals_the_op_with_conv1_bias_folded():
    """Float64, bit for bit up to rounding: Zyphra's one pad of (K1-1)+(K2-1) lets conv1's
    bias reach conv2 at the first K2-1 steps, so it is NOT the two separately padded convs
    on the sliced weights; with conv1's bias folded into conv2's (what the replacement
    passes the op) it is."""
    from ccgqa_compile.passes.prologue import _fold

    torch.manual_seed(0)
    m = CCGQAttention(32, 4, 2, 8, qk_concat=True, conv_kernels=(3, 2), temperature="raw")
    m = m.double()
    with torch.no_grad():
        m.temp.uniform_(0.5, 1.5)
        m.qk_conv1.bias.mul_(4)
    x = torch.randn(2, 5, 32, dtype=f64)
    captured = _module_q_k(m, x)
    q_pre, k_pre = m.q_proj(x), m.k_proj(x)
    cos, sin = rotary_tables(5, m.rotary_dim, x.device, x.dtype)
    conv1, conv2 = m.qk_conv1, m.qk_conv2
    scalars = (4, 2, "group", "raw", math.sqrt(8), 1e-12, m.rotary_dim, False)
    e_q = q_pre.shape[-1]
    sliced = (
        conv1.weight[:e_q], conv1.bias[:e_q], conv2.weight[:e_q], conv2.bias[:e_q],
        conv1.weight[e_q:], conv1.bias[e_q:], conv2.weight[e_q:], conv2.bias[e_q:],
    )  # fmt: skip
    q, _ = ops.ccgqa_prologue(q_pre, k_pre, *sliced, m.temp, cos, sin, *scalars)
    assert rel_err(q[:, :, :1], captured["q"][:, :, :1]) > 1e-3  # the bias does weigh in
    b2 = conv2.bias + _fold(conv2.weight, conv1.bias, 8)
    folded = (
        conv1.weight[:e_q], None, conv2.weight[:e_q], b2[:e_q],
        conv1.weight[e_q:], None, conv2.weight[e_q:], b2[e_q:],
    )  # fmt: skip
    q, k = ops.ccgqa_prologue(q_pre, k_pre, *folded, m.temp, cos, sin, *scalars)
    torch.testing.assert_close(q, captured["q"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, captured["k"], rtol=1e-12, atol=1e-12)
