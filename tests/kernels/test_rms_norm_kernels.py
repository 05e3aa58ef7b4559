"""Tests of the RMSNorm Triton kernels against a float64 PyTorch reference.

Without a GPU the kernels run in the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, set below before triton is imported). With
TRITON_INTERPRET=0 set explicitly, the same small-shape tests run on CUDA and the
`cuda`-marked tests add large shapes, bf16 and a torch.compile trace.
"""

import os

# Must precede the first import of triton; an explicit TRITON_INTERPRET=0 wins.
os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ccgqa_compile.kernels.rms_norm import (  # noqa: E402
    MAX_FUSED_COLUMNS,
    rms_norm_bwd,
    rms_norm_fwd,
    rms_norm_reference,
)

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}
CUDA_TESTS_RUNNABLE = torch.cuda.is_available() and not INTERPRETING
requires_cuda = pytest.mark.skipif(
    not CUDA_TESTS_RUNNABLE,
    reason="needs a CUDA GPU and TRITON_INTERPRET=0 (interpreted kernels take CPU tensors)",
)

# Relative-norm error bounds by the dtype the result is stored in.
INTERPRETER_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
GPU_OUTPUT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GPU_GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def nan_filled_allocations():
    """Make torch.empty fill float tensors with NaN, so any output element a kernel
    fails to write (y, rstd, dx, the dw partial sums) shows up as NaN.

    Module-scoped because hypothesis rejects function-scoped fixtures with @given.
    """
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = was_filling


def small_test_device() -> str:
    if INTERPRETING:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")


def relative_error(actual: Tensor, expected: Tensor, scale: Tensor | None = None) -> float:
    """||actual - expected|| / ||scale||, in float64; scale defaults to expected."""
    assert not torch.isnan(actual).any(), "NaN in kernel output (unwritten or bad math)"
    assert actual.shape == expected.shape
    scale = expected if scale is None else scale
    difference = (actual.double() - expected.double()).norm()
    return (difference / scale.double().norm().clamp_min(1e-300)).item()


def make_rows(
    n_rows: int, n_cols: int, dtype: torch.dtype, device: str, row_padding: int, gen
) -> Tensor:
    """Random (n_rows, n_cols) tensor, as a view with row stride n_cols + row_padding."""
    storage = torch.randn(n_rows, n_cols + row_padding, generator=gen, dtype=torch.float32)
    return storage.to(device=device, dtype=dtype)[:, :n_cols]


def check_rms_norm(
    x: Tensor,
    weight: Tensor | None,
    dy_dtype: torch.dtype,
    eps: float,
    weight_offset: float,
    out_dtype: torch.dtype,
    gen,
    output_tolerance: dict[torch.dtype, float],
    grad_tolerance: dict[torch.dtype, float],
) -> None:
    """Run the forward and backward kernels and compare both with autograd of the
    reference evaluated in float64."""
    n_rows, n_cols = x.shape
    y, rstd = rms_norm_fwd(x, weight, eps, weight_offset, out_dtype)
    assert y.dtype == out_dtype and y.is_contiguous() and y.shape == x.shape
    assert rstd.dtype == torch.float32 and rstd.shape == (n_rows,)

    x64 = x.double().requires_grad_(True)
    weight64 = weight.double().requires_grad_(True) if weight is not None else None
    y64 = rms_norm_reference(x64, weight64, eps, weight_offset, torch.float64)
    rstd64 = torch.rsqrt(x.double().pow(2).mean(dim=-1) + eps)
    assert relative_error(y, y64.detach()) < output_tolerance[out_dtype]
    assert relative_error(rstd, rstd64) < output_tolerance[torch.float32]

    dy = make_rows(n_rows, n_cols, dy_dtype, x.device.type, row_padding=3, gen=gen)
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, weight_offset)
    inputs = (x64,) if weight64 is None else (x64, weight64)
    expected = torch.autograd.grad(y64, inputs, grad_outputs=dy.double())

    assert dx.dtype == x.dtype and dx.is_contiguous() and dx.shape == x.shape
    # dx = rstd * P(g) with P the projection removing the x_hat direction, so
    # ||dx|| <= ||rstd * g||. For N == 1 the projection cancels almost exactly
    # (dx ~ eps / x^2): no float32 kernel matches that to relative precision, so
    # measure the error against the size of the terms that cancel.
    effective_weight = 1.0 if weight64 is None else weight_offset + weight64.detach()
    dx_scale = dy.double() * effective_weight * rstd64[:, None]
    assert relative_error(dx, expected[0], scale=dx_scale) < grad_tolerance[x.dtype]
    if weight is None:
        assert dw is None
    else:
        assert dw.dtype == weight.dtype and dw.shape == weight.shape
        assert relative_error(dw, expected[1]) < grad_tolerance[weight.dtype]


FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@settings(max_examples=15, deadline=None, database=None)
@given(
    n_rows=st.sampled_from([1, 3, 37]),
    n_cols=st.sampled_from([1, 17, 64, 130]),
    x_dtype=st.sampled_from(sorted(FLOAT_DTYPES)),
    weight_kind=st.sampled_from(["none", "like_x", "float32"]),
    weight_offset=st.sampled_from([0.0, 1.0]),
    eps=st.sampled_from([1e-6, 1e-5]),
    out_float32=st.booleans(),
    row_padding=st.sampled_from([0, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rms_norm_random_shapes_match_float64_reference(
    n_rows, n_cols, x_dtype, weight_kind, weight_offset, eps, out_float32, row_padding, seed
):
    device = small_test_device()
    gen = torch.Generator().manual_seed(seed)
    dtype = FLOAT_DTYPES[x_dtype]
    x = make_rows(n_rows, n_cols, dtype, device, row_padding, gen)
    weight = None
    if weight_kind != "none":
        weight_dtype = dtype if weight_kind == "like_x" else torch.float32
        weight = torch.randn(n_cols, generator=gen).to(device=device, dtype=weight_dtype)
    out_dtype = torch.float32 if out_float32 else dtype
    check_rms_norm(
        x,
        weight,
        dy_dtype=out_dtype,
        eps=eps,
        weight_offset=weight_offset,
        out_dtype=out_dtype,
        gen=gen,
        output_tolerance=INTERPRETER_TOLERANCE,
        grad_tolerance=INTERPRETER_TOLERANCE,
    )


@pytest.mark.parametrize(
    ("n_rows", "n_cols"),
    # (300, 130): 19 row tiles over the interpreter's 2 backward programs, so each
    # program loops over many tiles and accumulates dw across them.
    [(1, 1), (3, 17), (37, 64), (37, 130), (300, 130)],
)
@pytest.mark.parametrize(
    ("x_dtype", "weight_dtype", "out_dtype"),
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.float16),
        # Mixed precision: half activations, float32 weight, float32 output.
        (torch.float16, torch.float32, torch.float32),
        (torch.float16, None, torch.float16),
    ],
)
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_dtype_combinations(
    n_rows, n_cols, x_dtype, weight_dtype, out_dtype, weight_offset
):
    device = small_test_device()
    gen = torch.Generator().manual_seed(1000 * n_rows + n_cols)
    x = make_rows(n_rows, n_cols, x_dtype, device, row_padding=2, gen=gen)
    weight = None
    if weight_dtype is not None:
        weight = torch.randn(n_cols, generator=gen).to(device=device, dtype=weight_dtype)
    check_rms_norm(
        x,
        weight,
        dy_dtype=out_dtype,
        eps=1e-6,
        weight_offset=weight_offset,
        out_dtype=out_dtype,
        gen=gen,
        output_tolerance=INTERPRETER_TOLERANCE,
        grad_tolerance=INTERPRETER_TOLERANCE,
    )


@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_rms_norm_eps_tensor(eps):
    """eps given as a one-value tensor (read by the kernel when it runs) adds to the eps
    argument; rows of scale sqrt(eps), where eps decides the result."""
    device = small_test_device()
    gen = torch.Generator().manual_seed(7)
    x = make_rows(13, 40, torch.float32, device, row_padding=3, gen=gen) * eps**0.5
    weight = torch.randn(40, generator=gen).to(device)
    eps_tensor = torch.tensor([eps - 1e-7], device=device)
    y, rstd = rms_norm_fwd(x, weight, 1e-7, 0.0, torch.float32, eps_tensor)
    expected = rms_norm_reference(x.double(), weight.double(), eps, 0.0, torch.float64)
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) < INTERPRETER_TOLERANCE[torch.float32]
    expected_rstd = torch.rsqrt(x.double().pow(2).mean(-1) + eps)
    assert relative_error(rstd, expected_rstd) < INTERPRETER_TOLERANCE[torch.float32]


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_rms_norm_clamped_from_below(weighted):
    """``clamp``: x / max(rms, eps) * w (``F.normalize(x) * sqrt(N) * w``). Rows of zeros
    give zeros, rows whose rms is under eps are scaled by 1 / eps (a constant: their
    gradient is dy * w / eps), the rest normalise; values and gradients against the
    float64 reference."""
    device = small_test_device()
    gen = torch.Generator().manual_seed(11)
    eps = 1e-3
    x = make_rows(12, 40, torch.float32, device, row_padding=2, gen=gen)
    x[0] = 0.0
    x[1:5] *= 1e-5  # rms under eps: the clamp binds
    weight = torch.randn(40, generator=gen).to(device) if weighted else None
    y, rstd = rms_norm_fwd(x, weight, eps, 0.0, torch.float32, None, clamp=True)
    assert bool((rstd[:5] < 0).all()) and bool((rstd[5:] > 0).all())
    dy = torch.randn(12, 40, generator=gen).to(device)
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, 0.0)
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_() if weighted else None
    y64 = rms_norm_reference(x64, w64, eps, 0.0, torch.float64, clamp=True)
    grads = torch.autograd.grad(y64, [t for t in (x64, w64) if t is not None], dy.double())
    tol = INTERPRETER_TOLERANCE[torch.float32]
    assert torch.isfinite(y).all() and relative_error(y, y64) < tol
    assert torch.isfinite(dx).all() and relative_error(dx, grads[0]) < tol
    if weighted:
        assert relative_error(dw, grads[1]) < tol


def test_rms_norm_without_rows():
    device = small_test_device()
    x = torch.empty(0, 17, device=device)
    weight = torch.randn(17, device=device)
    y, rstd = rms_norm_fwd(x, weight, 1e-6, 0.0, torch.float32)
    assert y.shape == (0, 17) and rstd.shape == (0,)
    dx, dw = rms_norm_bwd(torch.empty(0, 17, device=device), x, weight, rstd, 0.0)
    assert dx.shape == (0, 17)
    assert torch.equal(dw, torch.zeros_like(weight))


def test_rms_norm_rejects_unsupported_layouts():
    device = small_test_device()
    transposed = torch.randn(8, 4, device=device).t()
    with pytest.raises(ValueError, match="unit column stride"):
        rms_norm_fwd(transposed, None, 1e-6, 0.0, torch.float32)
    too_wide = torch.empty(1, MAX_FUSED_COLUMNS + 1, device=device)
    with pytest.raises(ValueError, match="exceeds"):
        rms_norm_fwd(too_wide, None, 1e-6, 0.0, torch.float32)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_fwd(
            torch.randn(2, 4, device=device),
            torch.randn(5, device=device),
            1e-6,
            0.0,
            torch.float32,
        )


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n_rows", "n_cols"), [(4096, 4096), (1000, 11008), (5, 1000)])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_gpu_large_shapes(dtype, n_rows, n_cols, weight_offset):
    gen = torch.Generator().manual_seed(n_rows + n_cols)
    x = make_rows(n_rows, n_cols, dtype, "cuda", row_padding=0, gen=gen)
    weight = torch.randn(n_cols, generator=gen).to(device="cuda", dtype=dtype)
    check_rms_norm(
        x,
        weight,
        dy_dtype=dtype,
        eps=1e-6,
        weight_offset=weight_offset,
        out_dtype=dtype,
        gen=gen,
        output_tolerance=GPU_OUTPUT_TOLERANCE,
        grad_tolerance=GPU_GRAD_TOLERANCE,
    )


@pytest.mark.cuda
@requires_cuda
def test_rms_norm_gpu_strided_input_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(7)
    x = make_rows(2048, 4096, torch.bfloat16, "cuda", row_padding=64, gen=gen)
    weight = torch.randn(4096, generator=gen).to(device="cuda", dtype=torch.float32)
    check_rms_norm(
        x,
        weight,
        dy_dtype=torch.float32,
        eps=1e-5,
        weight_offset=1.0,
        out_dtype=torch.float32,
        gen=gen,
        output_tolerance=GPU_OUTPUT_TOLERANCE,
        grad_tolerance=GPU_GRAD_TOLERANCE,
    )


@functools.cache
def traceable_rms_norm_ops():
    """RMSNorm kernels wrapped in triton_ops, as the package's autograd layer does."""

    @torch.library.triton_op("ccgqa_kernel_tests::rms_norm_fwd", mutates_args=())
    def fwd(x: Tensor, weight: Tensor, eps: float, weight_offset: float) -> tuple[Tensor, Tensor]:
        return rms_norm_fwd(x, weight, eps, weight_offset, x.dtype)

    @torch.library.triton_op("ccgqa_kernel_tests::rms_norm_bwd", mutates_args=())
    def bwd(
        dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, weight_offset: float
    ) -> tuple[Tensor, Tensor]:
        dx, dw = rms_norm_bwd(dy, x, weight, rstd, weight_offset)
        return dx, dw

    return fwd, bwd


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_rms_norm_traces_under_torch_compile(dynamic):
    fwd, bwd = traceable_rms_norm_ops()

    def forward_and_backward(x, weight, dy):
        y, rstd = fwd(x, weight, 1e-6, 1.0)
        dx, dw = bwd(dy, x, weight, rstd, 1.0)
        return y, dx, dw

    compiled = torch.compile(forward_and_backward, fullgraph=True, dynamic=dynamic)
    for n_rows in (64, 100):
        x = torch.randn(n_rows, 1000, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        for actual, expected in zip(
            compiled(x, weight, dy), forward_and_backward(x, weight, dy), strict=True
        ):
            # Same kernels; only dw's final torch.sum may be reordered by Inductor.
            torch.testing.assert_close(actual, expected)
