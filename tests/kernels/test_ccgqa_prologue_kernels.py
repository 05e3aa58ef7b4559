"""Tests for the CCGQA prologue Triton kernels in ``ccgqa_compile.kernels.ccgqa_prologue``.

Without a GPU the kernels run under the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set below unless the caller chose otherwise), in fp32 only (the
interpreter's bf16 ``tl.dot`` is broken). The tests marked ``cuda`` repeat them in
bf16/fp16/fp32 with model-sized shapes on a GPU (``TRITON_INTERPRET=0``).

Every kernel result (forward and every gradient) is compared with the float64 reference
evaluated on the very same (already rounded) inputs by relative norm error; inputs are
drawn away from zero, fresh outputs are poisoned with NaN, and NaN never passes.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from ccgqa_compile.kernels.ccgqa_prologue import (  # noqa: E402
    ccgqa_prologue_bwd,
    ccgqa_prologue_fwd,
    ccgqa_prologue_reference,
)

from .._compare import rel_err  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

requires_cuda = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET=0"
)

# Relative-norm error bounds against the float64 reference. fp32 keeps its conv2
# products in IEEE fp32; half inputs multiply conv2's operands in their own precision
# (fp32 sums, as eager's half conv does) and round every output.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

GRAD_NAMES = [
    "q_pre",
    "k_pre",
    "q_conv1.weight",
    "q_conv1.bias",
    "q_conv2.weight",
    "q_conv2.bias",
    "k_conv1.weight",
    "k_conv1.bias",
    "k_conv2.weight",
    "k_conv2.bias",
    "temp",
]


def nonzero_uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """fp32 values with |v| in [0.5, 1.5) and random sign: never zero."""
    magnitude = torch.rand(shape, generator=generator) + 0.5
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return magnitude * sign


def make_problem(
    b=1,
    t=5,
    heads=2,
    kv_heads=1,
    d=16,
    k1=2,
    k2=2,
    bias=(True, True, True, True),
    qk_mean=True,
    temperature="exp",
    scalar_temp=False,
    rotary_dim=None,
    interleaved=False,
    norm_scale=None,
    qkv_fused=False,
    per_batch_tables=False,
    dtype=torch.float32,
    seed=0,
    eps=1e-12,
):
    """(13 tensors, 8 scalars) in the op's argument order, on DEVICE in ``dtype``.

    With ``qkv_fused`` q_pre and k_pre are column slices of one wider projection (a row
    stride larger than their width), as a fused qkv Linear gives them.
    """
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (nonzero_uniform(shape, gen) * scale).to(device=DEVICE, dtype=dtype)

    e_q, e_kv = heads * d, kv_heads * d
    if qkv_fused:
        qkv = r(b, t, e_q + 2 * e_kv)
        q_pre, k_pre = qkv[..., :e_q], qkv[..., e_q : e_q + e_kv]
    else:
        q_pre, k_pre = r(b, t, e_q), r(b, t, e_kv)
    rotary_dim = d if rotary_dim is None else rotary_dim
    temp = None if temperature == "none" else r(1 if scalar_temp else kv_heads, scale=0.3)
    cos = sin = None
    if rotary_dim:
        table = (b, 1, t, rotary_dim) if per_batch_tables else (t, rotary_dim)
        cos, sin = r(*table), r(*table)
    tensors = [
        q_pre,
        k_pre,
        r(e_q, 1, k1, scale=0.5),
        r(e_q, scale=0.3) if bias[0] else None,
        r(e_q, d, k2, scale=1 / math.sqrt(d)),
        r(e_q, scale=0.3) if bias[1] else None,
        r(e_kv, 1, k1, scale=0.5),
        r(e_kv, scale=0.3) if bias[2] else None,
        r(e_kv, d, k2, scale=1 / math.sqrt(d)),
        r(e_kv, scale=0.3) if bias[3] else None,
        temp,
        cos,
        sin,
    ]
    scale = math.sqrt(d) if norm_scale is None else norm_scale
    scalars = [heads, kv_heads, qk_mean, temperature, scale, eps, rotary_dim, interleaved]
    return tensors, scalars


def reference(tensors, scalars, dq, dk, eps_mode="clamp", rotary_start=0):
    """float64 reference outputs and gradients (None for absent inputs)."""
    leaves = [
        x.detach().double().requires_grad_(i < 11) if x is not None else None
        for i, x in enumerate(tensors)
    ]
    q, k = ccgqa_prologue_reference(*leaves, *scalars, eps_mode=eps_mode, rotary_start=rotary_start)
    wrt = [x for x in leaves[:11] if x is not None]
    grads = iter(torch.autograd.grad((q, k), wrt, (dq.double(), dk.double())))
    return q, k, [next(grads) if x is not None else None for x in leaves[:11]]


def run_and_check(
    monkeypatch,
    tensors,
    scalars,
    dtype,
    transposed_grads=False,
    eps_mode="clamp",
    rotary_start=0,
    **launch,
):
    """Kernels (with NaN-poisoned fresh outputs) vs the float64 reference. With
    ``transposed_grads`` dq/dk are (B, T, H, D) storage viewed as (B, H, T, D)."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    q, k = ccgqa_prologue_fwd(
        *tensors,
        *scalars,
        block_t=launch.get("block_t"),
        eps_mode=eps_mode,
        rotary_start=rotary_start,
    )
    gen = torch.Generator().manual_seed(123)
    dq = nonzero_uniform(q.shape, gen).to(device=DEVICE, dtype=dtype)
    dk = nonzero_uniform(k.shape, gen).to(device=DEVICE, dtype=dtype)
    if transposed_grads:
        dq, dk = (g.transpose(1, 2).contiguous().transpose(1, 2) for g in (dq, dk))
        assert not dq.is_contiguous()
    grads = ccgqa_prologue_bwd(
        dq, dk, *tensors, *scalars, eps_mode=eps_mode, rotary_start=rotary_start, **launch
    )
    monkeypatch.undo()

    q_ref, k_ref, grads_ref = reference(tensors, scalars, dq, dk, eps_mode, rotary_start)
    heads, kv_heads = scalars[0], scalars[1]
    b, t, e_q = tensors[0].shape
    assert q.shape == (b, heads, t, e_q // heads) and q.is_contiguous() and q.dtype == dtype
    assert k.shape == (b, kv_heads, t, e_q // heads) and k.is_contiguous()
    tol = REL_TOL[dtype]
    errors = {"q": rel_err(q, q_ref), "k": rel_err(k, k_ref)}
    for name, grad, grad_ref, x in zip(GRAD_NAMES, grads, grads_ref, tensors):
        if x is None:
            assert grad is None, name
            continue
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        errors[name] = rel_err(grad, grad_ref)
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad}"


# Small cases for the interpreter: T = 1, T not a multiple of the block (block_t=16
# crosses block borders with the halo), d 16/32/64, G 1/2/4, k1/k2 1..4, qk mean on/off,
# every temperature mode, full/half/interleaved/no RoPE, missing biases, strided inputs,
# the widest halo, the conv backward walking several time blocks per program.
CASES = {
    "T1-G2-k22-exp-full": dict(t=1, heads=2, kv_heads=1),
    "T19-B2-G2-blocks": dict(b=2, t=19, heads=4, kv_heads=2, launch=dict(block_t=16)),
    # 3 time blocks in 2 chunks per batch row, the last chunk half past T
    "T40-B2-G2-chunks": dict(
        b=2, t=40, heads=4, kv_heads=2, k1=3, k2=2, launch=dict(block_t=16, chunk=2)
    ),
    # the widest halo (6 rows past each 16-row block), 3 blocks per conv-backward program
    "T40-k44-widest-halo-chunks": dict(
        t=40, heads=2, kv_heads=1, k1=4, k2=4, launch=dict(block_t=16, chunk=3)
    ),
    # conv2's weight gradient as its own launch (as for wide heads): 3 splits striding
    # over 2 batches x 2 chunk steps, and the widest halo in 2 splits
    "T40-B2-G2-wgrad-launch": dict(
        b=2, t=40, heads=4, kv_heads=2, k1=3, k2=2, launch=dict(block_t=16, chunk=2, wgrad_splits=3)
    ),
    "T40-k44-wgrad-launch": dict(
        t=40, heads=2, kv_heads=1, k1=4, k2=4, launch=dict(block_t=16, chunk=1, wgrad_splits=2)
    ),
    # fewer time steps than conv2's halo: the bias rows and G(s2) of the weight gradients
    "T2-k24-shorter-than-halo": dict(t=2, heads=2, kv_heads=1, k1=2, k2=4),
    "T5-d32-G4-k31-raw-half": dict(
        t=5, d=32, heads=4, kv_heads=1, k1=3, k2=1, temperature="raw", rotary_dim=16
    ),
    "T7-d64-k13-none-nomean-norope": dict(
        t=7,
        d=64,
        heads=2,
        kv_heads=2,
        k1=1,
        k2=3,
        qk_mean=False,
        temperature="none",
        rotary_dim=0,
    ),  # fmt: skip
    "T17-k33-variantish-chunked": dict(
        t=17,
        k1=3,
        k2=3,
        heads=1,
        kv_heads=1,
        rotary_dim=12,
        interleaved=True,
        scalar_temp=True,
        temperature="raw",
        norm_scale=1.0,
        bias=(False, True, True, False),
        qkv_fused=True,
        launch=dict(block_t=16, chunk=2),
    ),  # fmt: skip
    "T6-d32-G2-quarter-rope-nobias": dict(
        t=6, d=32, heads=2, kv_heads=1, rotary_dim=8, bias=(False,) * 4, k1=2, k2=3
    ),
    # eps large enough to decide for some rows: where it goes in the normalisation
    "T19-eps-clamp-deciding": dict(b=2, t=19, heads=4, kv_heads=2, eps=2.5, launch=dict(block_t=16)),
    "T19-eps-added-to-norm": dict(
        b=2, t=19, heads=4, kv_heads=2, eps=1.5, eps_mode="add", launch=dict(block_t=16)
    ),
    "T9-eps-inside-sqrt-raw-temp": dict(
        t=9, heads=2, kv_heads=1, eps=3.0, eps_mode="sqrt", temperature="raw", rotary_dim=8
    ),
    "T4-B2-per-batch-tables-transposed-grads": dict(
        b=2, t=4, heads=2, kv_heads=1, per_batch_tables=True, transposed_grads=True
    ),
    # partial RoPE on a head's last dims: the last rotate-half chunk; interleaved pairs
    # from an even dim that is no chunk border
    "T9-d32-rope-on-last-quarter": dict(
        t=9, d=32, heads=2, kv_heads=1, rotary_dim=8, rotary_start=24
    ),
    "T9-d32-interleaved-rope-from-dim-20": dict(
        t=9, d=32, heads=2, kv_heads=1, rotary_dim=12, interleaved=True, rotary_start=20
    ),
}


def _run_case(monkeypatch, name, dtype):
    case = dict(CASES[name])
    launch = case.pop("launch", {})
    transposed_grads = case.pop("transposed_grads", False)
    eps_mode = case.pop("eps_mode", "clamp")
    start = case.pop("rotary_start", 0)
    tensors, scalars = make_problem(dtype=dtype, **case)
    run_and_check(monkeypatch, tensors, scalars, dtype, transposed_grads, eps_mode, start, **launch)


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_float64_reference(monkeypatch, name):
    _run_case(monkeypatch, name, torch.float32)


# fp16 (the interpreter's fp16 tl.dot is sound, unlike its bf16 one): the half-precision
# conv2 products of a half model, across block borders and chunked weight gradients
@pytest.mark.parametrize("name", ["T19-B2-G2-blocks", "T17-k33-variantish-chunked"])
def test_half_products_match_float64_reference(monkeypatch, name):
    _run_case(monkeypatch, name, torch.float16)


def test_empty_sequence():
    tensors, scalars = make_problem(t=0, rotary_dim=0)
    q, k = ccgqa_prologue_fwd(*tensors, *scalars)
    assert q.shape == (1, 2, 0, 16) and k.shape == (1, 1, 0, 16)
    grads = ccgqa_prologue_bwd(q, k, *tensors, *scalars)
    assert grads[0].shape == (1, 0, 32) and torch.equal(grads[4], torch.zeros_like(grads[4]))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(d=24), "power-of-two head dim"),
        (dict(d=8), "power-of-two head dim"),
        (dict(k1=5), "conv kernels"),
        (dict(rotary_dim=12), "power-of-two rotary_dim"),
    ],
)
def test_unsupported_shapes_raise(change, match):
    tensors, scalars = make_problem(**change)
    with pytest.raises(ValueError, match=match):
        ccgqa_prologue_fwd(*tensors, *scalars)


def test_grouped_conv1_is_rejected():
    """The original project's per-head conv1 (weight (C, D, K)) is not what the kernel does."""
    tensors, scalars = make_problem()
    tensors[2] = torch.ones(32, 16, 2, device=DEVICE)
    with pytest.raises(ValueError, match="q conv1 weight"):
        ccgqa_prologue_fwd(*tensors, *scalars)


# ----------------------------------------------------------------------------
# GPU-only: bf16/fp16/fp32 at model-like sizes.
# ----------------------------------------------------------------------------

CUDA_CASES = {
    "zaya-like-d128": dict(b=2, t=300, heads=8, kv_heads=2, d=128, rotary_dim=64),
    "compressed-d32": dict(b=2, t=517, heads=16, kv_heads=4, d=32, per_batch_tables=True),
    "d64-k33-raw-interleaved": dict(
        b=1,
        t=1000,
        heads=4,
        kv_heads=4,
        d=64,
        k1=3,
        k2=3,
        temperature="raw",
        interleaved=True,
        rotary_dim=48,
    ),  # fmt: skip
    "d16-k44-none-nomean": dict(
        b=3, t=129, heads=8, kv_heads=1, d=16, k1=4, k2=4, qk_mean=False, temperature="none"
    ),
    "T1-d64": dict(b=2, t=1, heads=4, kv_heads=2, d=64),
    "d128-eps-added-to-norm": dict(
        b=2, t=300, heads=8, kv_heads=2, d=128, eps=4.0, eps_mode="add", rotary_dim=64
    ),
    "d32-eps-inside-sqrt": dict(b=2, t=300, heads=8, kv_heads=2, d=32, eps=9.0, eps_mode="sqrt"),
    "d128-rope-on-last-half": dict(
        b=2, t=300, heads=8, kv_heads=2, d=128, rotary_dim=64, rotary_start=64
    ),
}


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_cuda_kernels_match_float64_reference(monkeypatch, name, dtype):
    case = dict(CUDA_CASES[name])
    eps_mode = case.pop("eps_mode", "clamp")
    start = case.pop("rotary_start", 0)
    tensors, scalars = make_problem(dtype=dtype, seed=7, **case)
    assert tensors[0].is_cuda
    transposed = name == "zaya-like-d128"
    run_and_check(monkeypatch, tensors, scalars, dtype, transposed, eps_mode, start)


@pytest.mark.cuda
@requires_cuda
def test_cuda_backward_is_deterministic():
    tensors, scalars = make_problem(b=2, t=700, heads=8, kv_heads=2, d=64, seed=3)
    q, k = ccgqa_prologue_fwd(*tensors, *scalars)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    first = ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)
    second = ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name
