"""Tests for the seed variant's prologue kernels in ``ccgqa_compile.kernels.ccgqa_seed_prologue``.

Without a GPU the kernels run under the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set below unless the caller chose otherwise), in fp32 only (the
interpreter's bf16 ``tl.dot`` is broken). The tests marked ``cuda`` repeat them in
bf16/fp16/fp32 with model-sized shapes on a GPU.

Every kernel result (q, k and every gradient) is compared with the float64 reference on the
very same (already rounded) inputs by relative norm error; inputs are drawn away from zero,
and NaN never passes.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from ccgqa_compile.kernels.ccgqa_seed_prologue import (  # noqa: E402
    ccgqa_seed_prologue_bwd,
    ccgqa_seed_prologue_fwd,
    ccgqa_seed_prologue_reference,
)

from .._compare import rel_err  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

requires_cuda = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET=0"
)

# fp32 products stay IEEE; half inputs round conv1's output, the products and the outputs
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
GRAD_NAMES = ["q_pre", "k_pre", "q_conv1.weight", "q_conv2.weight", "k_conv1.weight"]
GRAD_NAMES += ["k_conv2.weight", "temp"]


def nonzero_uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """fp32 values with |v| in [0.5, 1.5) and random sign: never zero."""
    magnitude = torch.rand(shape, generator=generator) + 0.5
    return magnitude * (torch.randint(0, 2, shape, generator=generator) * 2 - 1)


def make_problem(
    b=2,
    t=37,
    heads=4,
    kv_heads=2,
    d=8,
    k1=3,
    k2=3,
    temp=True,
    interleaved=True,
    per_batch_tables=False,
    dtype=torch.float32,
    seed=0,
):
    """(9 tensors, 4 scalars) in the op's argument order; q_pre and k_pre are column slices
    of one fused qkv projection (row stride wider than their width), as in the seed."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (nonzero_uniform(shape, gen) * scale).to(device=DEVICE, dtype=dtype)

    e_q, e_kv = heads * d, kv_heads * d
    qkv = r(b, t, e_q + 2 * e_kv)
    table = (b, 1, t, d) if per_batch_tables else (t, d)
    tensors = [
        qkv[..., :e_q],
        qkv[..., e_q : e_q + e_kv],
        r(e_q, d, k1, scale=1 / math.sqrt(d * k1)),
        r(e_q, e_q, k2, scale=1 / math.sqrt(e_q * k2)),
        r(e_kv, d, k1, scale=1 / math.sqrt(d * k1)),
        r(e_kv, e_kv, k2, scale=1 / math.sqrt(e_kv * k2)),
        r(1, scale=2.0).reshape(()) if temp else None,
        r(*table),
        r(*table),
    ]
    return tensors, [heads, kv_heads, 1e-12, interleaved]


def check_against_reference(tensors, scalars, dtype, **launch):
    q, k = ccgqa_seed_prologue_fwd(*tensors, *scalars, **launch)
    gen = torch.Generator().manual_seed(1)
    dq = nonzero_uniform(q.shape, gen).to(q)
    dk = nonzero_uniform(k.shape, gen).to(k)
    grads = ccgqa_seed_prologue_bwd(dq, dk, *tensors, *scalars, **launch)
    leaves = [
        x.detach().double().requires_grad_(i < 7) if x is not None else None
        for i, x in enumerate(tensors)
    ]
    q_ref, k_ref = ccgqa_seed_prologue_reference(*leaves, *scalars)
    wanted = [x for x in leaves[:7] if x is not None]
    ref = iter(torch.autograd.grad((q_ref, k_ref), wanted, (dq.double(), dk.double())))
    tol = REL_TOL[dtype]
    assert q.dtype == dtype and k.dtype == dtype
    assert rel_err(q, q_ref) < tol, f"q: {rel_err(q, q_ref):.2e}"
    assert rel_err(k, k_ref) < tol, f"k: {rel_err(k, k_ref):.2e}"
    for name, grad, leaf in zip(GRAD_NAMES, grads, leaves[:7]):
        if leaf is None:
            assert grad is None, f"{name}: a gradient for an absent input"
            continue
        expected = next(ref)
        assert grad.shape == leaf.shape, f"{name}: shape {grad.shape} != {leaf.shape}"
        err = rel_err(grad, expected)
        assert err < tol, f"d {name}: relative error {err:.2e} >= {tol:.0e}"


CASES = {
    # T crosses several tiles and ends mid-tile; padded widths (24 -> 32, 8 -> 16)
    "seed-layout-3-heads": dict(heads=3, kv_heads=1, d=8, t=37),
    "seed-defaults": dict(),
    "rotate-half-no-temp": dict(interleaved=False, temp=False, k1=2, k2=4),
    "per-batch-tables-d16": dict(d=16, heads=2, kv_heads=1, per_batch_tables=True, k1=1),
    "single-step": dict(t=1),
    "ungrouped-heads-k4": dict(heads=2, kv_heads=2, k1=4, k2=2, t=23),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_float64_reference(name):
    tensors, scalars = make_problem(**CASES[name])
    check_against_reference(tensors, scalars, torch.float32, block_t=16)


def test_empty_sequence():
    tensors, scalars = make_problem(t=0)
    q, k = ccgqa_seed_prologue_fwd(*tensors, *scalars)
    assert q.shape == (2, 4, 0, 8) and k.shape == (2, 2, 0, 8)
    grads = ccgqa_seed_prologue_bwd(torch.empty_like(q), torch.empty_like(k), *tensors, *scalars)
    assert all(g.abs().sum() == 0 for g in grads[2:])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(d=6, heads=2, kv_heads=1), "power-of-two head dim"),
        (dict(d=32, heads=8, kv_heads=2), "at most 128 channels"),
        (dict(k1=5), "conv kernels must be in"),
    ],
)
def test_unsupported_shapes_raise(change, match):
    tensors, scalars = make_problem(t=4, **change)
    with pytest.raises(ValueError, match=match):
        ccgqa_seed_prologue_fwd(*tensors, *scalars)


def test_depthwise_conv1_is_rejected():
    """The stock prologue's depthwise conv1 is another computation: a clear error."""
    tensors, scalars = make_problem(t=4)
    tensors[2] = tensors[2][:, :1]
    with pytest.raises(ValueError, match="q conv1 weight must be"):
        ccgqa_seed_prologue_fwd(*tensors, *scalars)


# ---- GPU (H100): model-sized shapes, half precision ----------------------------------

CUDA_CASES = {
    # the seed config: E512, hq8, hkv2, C4 -> d16, widths 128 + 32
    "seed-E512": dict(b=2, t=1000, heads=8, kv_heads=2, d=16),
    "d32-widths-128-32": dict(b=2, t=777, heads=4, kv_heads=1, d=32),
    "rotate-half-no-temp": dict(
        b=2, t=300, heads=6, kv_heads=3, d=16, interleaved=False, temp=False
    ),
}


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda_kernels_match_float64_reference(name, dtype):
    tensors, scalars = make_problem(dtype=dtype, **CUDA_CASES[name])
    check_against_reference(tensors, scalars, dtype)
