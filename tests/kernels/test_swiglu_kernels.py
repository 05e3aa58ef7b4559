"""Tests of the SwiGLU Triton kernels against a float64 PyTorch reference.

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

from ccgqa_compile.kernels.swiglu import swiglu_bwd, swiglu_fwd, swiglu_reference  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}
CUDA_TESTS_RUNNABLE = torch.cuda.is_available() and not INTERPRETING
requires_cuda = pytest.mark.skipif(
    not CUDA_TESTS_RUNNABLE,
    reason="needs a CUDA GPU and TRITON_INTERPRET=0 (interpreted kernels take CPU tensors)",
)

# Relative-norm error bounds by the dtype the result is stored in.
INTERPRETER_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
GPU_OUTPUT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GPU_GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def nan_filled_allocations():
    """Make torch.empty fill float tensors with NaN, so any output element a kernel
    fails to write shows up as NaN.

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


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    assert not torch.isnan(actual).any(), "NaN in kernel output (unwritten or bad math)"
    assert actual.shape == expected.shape
    difference = (actual.double() - expected.double()).norm()
    return (difference / expected.double().norm().clamp_min(1e-300)).item()


def make_operands(
    n_rows: int, n_cols: int, dtype: torch.dtype, device: str, layout: str, gen
) -> tuple[Tensor, Tensor]:
    """Random gate and up of shape (n_rows, n_cols) in one of five layouts:
    separate contiguous tensors, the two halves of one (n_rows, 2 n_cols) tensor,
    its interleaved columns (column stride 2), transposed storage (column stride
    n_rows), or views with padded rows."""
    # Spread wide enough that sigmoid saturates on both sides for some elements.
    scale = 3.0
    if layout == "halves":
        fused = scale * torch.randn(n_rows, 2 * n_cols, generator=gen)
        gate, up = fused.to(device=device, dtype=dtype).chunk(2, dim=-1)
        return gate, up
    if layout == "interleaved":
        fused = scale * torch.randn(n_rows, 2 * n_cols, generator=gen).to(device=device, dtype=dtype)
        return fused[:, 0::2], fused[:, 1::2]
    if layout == "transposed":
        gate = scale * torch.randn(n_cols, n_rows, generator=gen)
        up = torch.randn(n_cols, n_rows, generator=gen)
        return gate.to(device=device, dtype=dtype).t(), up.to(device=device, dtype=dtype).t()
    padding = 7 if layout == "padded" else 0
    gate = scale * torch.randn(n_rows, n_cols + padding, generator=gen)
    up = torch.randn(n_rows, n_cols + 2 * padding, generator=gen)
    return (
        gate.to(device=device, dtype=dtype)[:, :n_cols],
        up.to(device=device, dtype=dtype)[:, :n_cols],
    )


def nan_buffer_halves(
    n_rows: int, n_cols: int, dtype: torch.dtype, device: str
) -> tuple[Tensor, Tensor, Tensor]:
    """A NaN-filled (n_rows, 2 n_cols) buffer and its two column halves."""
    buffer = torch.full((n_rows, 2 * n_cols), float("nan"), dtype=dtype, device=device)
    first, second = buffer.chunk(2, dim=-1)
    return buffer, first, second


def reference_forward_and_grads(
    gate: Tensor, up: Tensor, dout: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    gate64 = gate.double().requires_grad_(True)
    up64 = up.double().requires_grad_(True)
    out64 = swiglu_reference(gate64, up64)
    dgate64, dup64 = torch.autograd.grad(out64, (gate64, up64), grad_outputs=dout.double())
    return out64.detach(), dgate64, dup64


@settings(max_examples=15, deadline=None, database=None)
@given(
    n_rows=st.sampled_from([1, 3, 37]),
    n_cols=st.sampled_from([1, 17, 64, 130]),
    dtype_name=st.sampled_from(sorted(FLOAT_DTYPES)),
    layout=st.sampled_from(["contiguous", "halves", "interleaved", "transposed", "padded"]),
    given_outputs=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_swiglu_random_shapes_match_float64_reference(
    n_rows, n_cols, dtype_name, layout, given_outputs, seed
):
    device = small_test_device()
    dtype = FLOAT_DTYPES[dtype_name]
    tolerance = INTERPRETER_TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(seed)
    gate, up = make_operands(n_rows, n_cols, dtype, device, layout, gen)
    dout = torch.randn(n_rows, n_cols, generator=gen).to(device=device, dtype=dtype)
    out64, dgate64, dup64 = reference_forward_and_grads(gate, up, dout)

    if given_outputs:
        out_buffer = torch.full((n_rows, n_cols + 3), float("nan"), dtype=dtype, device=device)
        out = swiglu_fwd(gate, up, out=out_buffer[:, :n_cols])
        assert out.data_ptr() == out_buffer.data_ptr()
        # Only the view is written: the row padding keeps its NaN.
        assert torch.isnan(out_buffer[:, n_cols:]).all()
        grad_buffer, dgate_view, dup_view = nan_buffer_halves(n_rows, n_cols, dtype, device)
        dgate, dup = swiglu_bwd(dout, gate, up, dgate=dgate_view, dup=dup_view)
        assert dgate.data_ptr() == dgate_view.data_ptr()
        assert dup.data_ptr() == dup_view.data_ptr()
        assert not torch.isnan(grad_buffer).any()
    else:
        out = swiglu_fwd(gate, up)
        dgate, dup = swiglu_bwd(dout, gate, up)
        for result in (out, dgate, dup):
            assert result.is_contiguous() and result.dtype == dtype

    assert relative_error(out, out64) < tolerance
    assert relative_error(dgate, dgate64) < tolerance
    assert relative_error(dup, dup64) < tolerance


@pytest.mark.parametrize("layout", ["interleaved", "transposed"])
def test_swiglu_reads_strided_columns_in_place(layout):
    """Columns of stride 2 (a gate-up projection split into even and odd columns) or of
    the row count (transposed storage) are read where they lie, fwd and bwd."""
    device = small_test_device()
    gen = torch.Generator().manual_seed(5)
    gate, up = make_operands(5, 33, torch.float32, device, layout, gen)
    assert gate.stride(1) != 1
    dout = torch.randn(5, 33, generator=gen).to(device)
    out64, dgate64, dup64 = reference_forward_and_grads(gate, up, dout)
    out = swiglu_fwd(gate, up)
    dgate, dup = swiglu_bwd(dout, gate, up)
    for result, expected in ((out, out64), (dgate, dgate64), (dup, dup64)):
        assert relative_error(result, expected) < INTERPRETER_TOLERANCE[torch.float32]


@pytest.mark.parametrize(("n_rows", "n_cols"), [(2, 1024), (4, 768), (3, 2048)])
def test_swiglu_flat_tiles_of_contiguous_operands(n_rows, n_cols):
    """Contiguous operands whose size is a multiple of the flat width take the autotuned
    flat-tile path: every element written (NaN-poisoned buffers), fwd and bwd exact."""
    device = small_test_device()
    dtype = torch.float32
    gen = torch.Generator().manual_seed(n_rows * n_cols)
    gate, up = make_operands(n_rows, n_cols, dtype, device, "contiguous", gen)
    gate, up = gate.contiguous(), up.contiguous()
    dout = torch.randn(n_rows, n_cols, generator=gen).to(device=device, dtype=dtype)
    out64, dgate64, dup64 = reference_forward_and_grads(gate, up, dout)
    poisoned = [torch.full_like(gate, float("nan")) for _ in range(3)]
    out = swiglu_fwd(gate, up, out=poisoned[0])
    dgate, dup = swiglu_bwd(dout, gate, up, dgate=poisoned[1], dup=poisoned[2])
    tolerance = INTERPRETER_TOLERANCE[dtype]
    assert relative_error(out, out64) < tolerance
    assert relative_error(dgate, dgate64) < tolerance
    assert relative_error(dup, dup64) < tolerance


@pytest.mark.parametrize(("n_rows", "n_cols"), [(1, 1), (37, 17), (3, 130), (5, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_fused_gate_up_halves(n_rows, n_cols, dtype):
    """The fused gate-up layout end to end: inputs are the halves of one (M, 2N)
    tensor and the gradients land in the halves of one (M, 2N) buffer, which is
    then exactly the gradient of the fused tensor."""
    device = small_test_device()
    gen = torch.Generator().manual_seed(n_rows * 7919 + n_cols)
    fused = (3.0 * torch.randn(n_rows, 2 * n_cols, generator=gen)).to(device=device, dtype=dtype)
    dout = torch.randn(n_rows, n_cols, generator=gen).to(device=device, dtype=dtype)

    fused64 = fused.double().requires_grad_(True)
    out64 = swiglu_reference(*fused64.chunk(2, dim=-1))
    (dfused64,) = torch.autograd.grad(out64, fused64, grad_outputs=dout.double())

    gate, up = fused.chunk(2, dim=-1)
    out = swiglu_fwd(gate, up)
    grad_buffer, dgate_view, dup_view = nan_buffer_halves(n_rows, n_cols, dtype, device)
    swiglu_bwd(dout, gate, up, dgate=dgate_view, dup=dup_view)

    assert relative_error(out, out64.detach()) < INTERPRETER_TOLERANCE[dtype]
    assert relative_error(grad_buffer, dfused64) < INTERPRETER_TOLERANCE[dtype]


def test_swiglu_output_dtype_follows_given_buffer():
    """Half inputs written into float32 buffers are rounded only once."""
    device = small_test_device()
    gen = torch.Generator().manual_seed(3)
    gate, up = make_operands(37, 64, torch.float16, device, "contiguous", gen)
    dout = torch.randn(37, 64, generator=gen).to(device=device, dtype=torch.float32)
    out64, dgate64, dup64 = reference_forward_and_grads(gate, up, dout)
    out = swiglu_fwd(gate, up, out=torch.full((37, 64), float("nan"), device=device))
    dgate, dup = swiglu_bwd(
        dout,
        gate,
        up,
        dgate=torch.full((37, 64), float("nan"), device=device),
        dup=torch.full((37, 64), float("nan"), device=device),
    )
    for result, expected in ((out, out64), (dgate, dgate64), (dup, dup64)):
        assert result.dtype == torch.float32
        assert relative_error(result, expected) < INTERPRETER_TOLERANCE[torch.float32]


def test_swiglu_without_rows():
    device = small_test_device()
    gate = torch.empty(0, 17, device=device)
    assert swiglu_fwd(gate, gate).shape == (0, 17)
    dgate, dup = swiglu_bwd(gate, gate, gate)
    assert dgate.shape == (0, 17) and dup.shape == (0, 17)


def test_swiglu_rejects_mismatched_operands():
    device = small_test_device()
    gate = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="up must have shape"):
        swiglu_fwd(gate, torch.randn(4, 9, device=device))
    with pytest.raises(ValueError, match="dgate must have shape"):
        swiglu_bwd(gate, gate, gate, dgate=torch.empty(4, 4, device=device))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n_rows", "n_cols"), [(4096, 4096), (1000, 11008), (5, 1000)])
@pytest.mark.parametrize("layout", ["contiguous", "halves", "interleaved"])
def test_swiglu_gpu_large_shapes(dtype, n_rows, n_cols, layout):
    gen = torch.Generator().manual_seed(n_rows + n_cols)
    gate, up = make_operands(n_rows, n_cols, dtype, "cuda", layout, gen)
    dout = torch.randn(n_rows, n_cols, generator=gen).to(device="cuda", dtype=dtype)
    out64, dgate64, dup64 = reference_forward_and_grads(gate, up, dout)
    if layout == "halves":
        _, dgate_view, dup_view = nan_buffer_halves(n_rows, n_cols, dtype, "cuda")
        dgate, dup = swiglu_bwd(dout, gate, up, dgate=dgate_view, dup=dup_view)
    else:
        dgate, dup = swiglu_bwd(dout, gate, up)
    out = swiglu_fwd(gate, up)
    assert relative_error(out, out64) < GPU_OUTPUT_TOLERANCE[dtype]
    assert relative_error(dgate, dgate64) < GPU_GRAD_TOLERANCE[dtype]
    assert relative_error(dup, dup64) < GPU_GRAD_TOLERANCE[dtype]


@functools.cache
def traceable_swiglu_ops():
    """SwiGLU kernels wrapped in triton_ops, as the package's autograd layer does."""

    @torch.library.triton_op("ccgqa_kernel_tests::swiglu_fwd", mutates_args=())
    def fwd(gate: Tensor, up: Tensor) -> Tensor:
        return swiglu_fwd(gate, up)

    @torch.library.triton_op("ccgqa_kernel_tests::swiglu_bwd_fused", mutates_args=())
    def bwd_fused(dout: Tensor, gate: Tensor, up: Tensor) -> Tensor:
        # Gradient of the fused (M, 2N) gate-up tensor, written without a cat.
        dfused = torch.empty(
            (gate.shape[0], 2 * gate.shape[1]), dtype=gate.dtype, device=gate.device
        )
        dgate, dup = dfused.chunk(2, dim=-1)
        swiglu_bwd(dout, gate, up, dgate=dgate, dup=dup)
        return dfused

    return fwd, bwd_fused


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_swiglu_traces_under_torch_compile(dynamic):
    fwd, bwd_fused = traceable_swiglu_ops()

    def forward_and_backward(fused, dout):
        gate, up = fused.chunk(2, dim=-1)
        return fwd(gate, up), bwd_fused(dout, gate, up)

    compiled = torch.compile(forward_and_backward, fullgraph=True, dynamic=dynamic)
    for n_rows in (64, 100):
        fused = torch.randn(n_rows, 2 * 1000, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(n_rows, 1000, device="cuda", dtype=torch.bfloat16)
        for actual, expected in zip(
            compiled(fused, dout), forward_and_backward(fused, dout), strict=True
        ):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
