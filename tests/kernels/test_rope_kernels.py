"""Tests for the RoPE Triton kernels in ``ccgqa_compile.kernels.rope``.

On a machine without a GPU the kernels run under the Triton interpreter on CPU
tensors (``TRITON_INTERPRET=1``, set below unless the caller chose otherwise).
With ``TRITON_INTERPRET=0`` the same tests run on CUDA tensors, and the tests
marked ``cuda`` add bf16 and model-sized shapes plus a ``torch.compile`` check.

Every kernel result is compared with the float64 reference evaluated on the
very same (already rounded) inputs, so the error measured is the kernel's own.
Inputs are drawn away from zero so that no term of the formula can vanish and
hide a wrong index or sign.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from ccgqa_compile.kernels.rope import rope_bwd, rope_fwd, rope_reference  # noqa: E402

from .._compare import rel_err  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

requires_cuda = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(),
    reason="needs a CUDA GPU and TRITON_INTERPRET=0",
)

# Relative-norm error bounds against the float64 reference.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def nonzero_uniform(
    shape: tuple[int, ...], generator: torch.Generator, small_ints: bool = False
) -> torch.Tensor:
    """fp32 values with |v| in [0.5, 1.5) and random sign: never zero.

    With ``small_ints`` the values are in {-3, -2, 2, 3} instead, so that RoPE
    of them is computed exactly in fp32.
    """
    magnitude = torch.rand(shape, generator=generator) + 0.5
    if small_ints:
        magnitude = (magnitude * 2 + 1).floor().clamp(2, 3)
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return magnitude * sign


def make_x(
    batch: int,
    heads: int,
    seq: int,
    head_dim: int,
    layout: str,
    dtype: torch.dtype,
    generator: torch.Generator,
    small_ints: bool = False,
) -> torch.Tensor:
    """A (B, H, T, D) tensor with unit last stride in one of several layouts."""

    # Draw the storage in the final dtype and device before viewing it, since
    # a dtype conversion of a non-dense view would make it contiguous.
    def storage(shape: tuple[int, ...]) -> torch.Tensor:
        return nonzero_uniform(shape, generator, small_ints).to(device=DEVICE, dtype=dtype)

    if layout == "contiguous":
        x = storage((batch, heads, seq, head_dim))
    elif layout == "transposed":
        # HF attention: q = proj(h).view(B, T, H, D).transpose(1, 2).
        x = storage((batch, seq, heads, head_dim)).transpose(1, 2)
    elif layout == "sliced":
        # Row stride not a multiple of 16 and a misaligned start (offset 3).
        x = storage((batch, seq, heads, head_dim + 5))[..., 3 : 3 + head_dim].transpose(1, 2)
    else:
        raise ValueError(layout)
    assert x.stride(-1) == 1
    if layout != "contiguous":
        assert x.stride(2) == heads * x.stride(1), "time must be the outer dim in memory"
    return x


def make_table(
    batch: int,
    heads: int,
    seq: int,
    rotary_dim: int,
    style: str,
    dtype: torch.dtype,
    generator: torch.Generator,
    small_ints: bool = False,
) -> torch.Tensor:
    """A cos- or sin-like table of arbitrary values, broadcast to (B, H, T, R)."""
    full_shape = (batch, heads, seq, rotary_dim)
    if style == "shared":  # one (T, R) table for every batch and head
        table = nonzero_uniform((1, 1, seq, rotary_dim), generator, small_ints)
    elif style == "per_batch":  # position ids differ per batch, heads broadcast
        table = nonzero_uniform((batch, 1, seq, rotary_dim), generator, small_ints)
    elif style == "per_head":  # genuinely different values for every head
        table = nonzero_uniform(full_shape, generator, small_ints)
    else:
        raise ValueError(style)
    return table.to(device=DEVICE, dtype=dtype).expand(full_shape)


def reference_grad(
    dy: torch.Tensor,
    x_like: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    interleaved: bool,
) -> torch.Tensor:
    """d/dx <rope_reference(x), dy> in float64 (linear in x, so x is irrelevant)."""
    x64 = x_like.detach().double().requires_grad_(True)
    out = rope_reference(x64, cos.double(), sin.double(), rotary_dim, interleaved)
    (grad,) = torch.autograd.grad(out, x64, dy.double())
    return grad


def check_output(out: torch.Tensor, src: torch.Tensor, rotary_dim: int) -> None:
    """Shape/dtype/layout contract, finiteness and bit-exact passthrough."""
    assert out.shape == src.shape
    assert out.dtype == src.dtype
    assert out.is_contiguous()
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., rotary_dim:], src[..., rotary_dim:])


# (B, H, T, D, R, x layout, table style): odd and unit T, D not a power of
# two, R/2 not a power of two, partial rotary, B = 1 and H = 1.
CASES = [
    (2, 3, 5, 16, 16, "transposed", "shared"),
    (1, 2, 7, 20, 12, "contiguous", "per_batch"),
    (2, 2, 1, 32, 16, "transposed", "per_head"),
    (1, 1, 9, 80, 64, "sliced", "shared"),
    (2, 4, 3, 96, 96, "contiguous", "shared"),
    (3, 5, 4, 24, 8, "sliced", "per_batch"),
]
CASE_IDS = [f"B{b}H{h}T{t}D{d}R{r}-{layout}-{table}" for b, h, t, d, r, layout, table in CASES]


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize(
    "x_dtype, table_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float32)],
    ids=["fp32", "fp16-fp32tables"],
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fwd_matches_reference(case, x_dtype, table_dtype, interleaved):
    batch, heads, seq, head_dim, rotary_dim, layout, table_style = case
    gen = torch.Generator().manual_seed(1234)
    x = make_x(batch, heads, seq, head_dim, layout, x_dtype, gen)
    cos = make_table(batch, heads, seq, rotary_dim, table_style, table_dtype, gen)
    sin = make_table(batch, heads, seq, rotary_dim, table_style, table_dtype, gen)

    out = rope_fwd(x, cos, sin, rotary_dim, interleaved)

    check_output(out, x, rotary_dim)
    expected = rope_reference(x.double(), cos.double(), sin.double(), rotary_dim, interleaved)
    assert rel_err(out, expected) < REL_TOL[x_dtype]


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bwd_matches_autograd_of_reference(case, dtype, interleaved):
    batch, heads, seq, head_dim, rotary_dim, layout, table_style = case
    gen = torch.Generator().manual_seed(99)
    dy = make_x(batch, heads, seq, head_dim, layout, dtype, gen)
    cos = make_table(batch, heads, seq, rotary_dim, table_style, dtype, gen)
    sin = make_table(batch, heads, seq, rotary_dim, table_style, dtype, gen)

    dx = rope_bwd(dy, cos, sin, rotary_dim, interleaved)

    check_output(dx, dy, rotary_dim)
    expected = reference_grad(dy, dy, cos, sin, rotary_dim, interleaved)
    assert rel_err(dx, expected) < REL_TOL[dtype]


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bwd_is_exact_adjoint_of_fwd(case, interleaved):
    """<fwd(x), y> == <x, bwd(y)>.

    With small integer inputs every fp32 product and sum is exact, so the
    identity must hold exactly; with random inputs, to fp32 rounding.
    """
    batch, heads, seq, head_dim, rotary_dim, layout, table_style = case
    gen = torch.Generator().manual_seed(7)

    def args(small_ints: bool) -> list[torch.Tensor]:
        x, y = (
            make_x(batch, heads, seq, head_dim, layout, torch.float32, gen, small_ints)
            for _ in range(2)
        )
        cos, sin = (
            make_table(batch, heads, seq, rotary_dim, table_style, torch.float32, gen, small_ints)
            for _ in range(2)
        )
        return [x, y, cos, sin]

    x, y, cos, sin = args(small_ints=True)
    lhs = (rope_fwd(x, cos, sin, rotary_dim, interleaved).double() * y.double()).sum()
    rhs = (x.double() * rope_bwd(y, cos, sin, rotary_dim, interleaved).double()).sum()
    assert lhs.item() == rhs.item()

    x, y, cos, sin = args(small_ints=False)
    fwd_x = rope_fwd(x, cos, sin, rotary_dim, interleaved).double()
    bwd_y = rope_bwd(y, cos, sin, rotary_dim, interleaved).double()
    lhs = (fwd_x * y.double()).sum()
    rhs = (x.double() * bwd_y).sum()
    scale = (fwd_x.norm() * y.double().norm()).item()
    assert abs(lhs - rhs).item() <= 1e-6 * scale


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_every_output_element_is_written(monkeypatch, direction, interleaved):
    """Poison fresh allocations with NaN: any element the kernel skips shows up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    batch, heads, seq, head_dim, rotary_dim = 2, 3, 5, 80, 48
    gen = torch.Generator().manual_seed(3)
    x = make_x(batch, heads, seq, head_dim, "transposed", torch.float32, gen)
    cos = make_table(batch, heads, seq, rotary_dim, "shared", torch.float32, gen)
    sin = make_table(batch, heads, seq, rotary_dim, "shared", torch.float32, gen)
    kernel = rope_fwd if direction == "fwd" else rope_bwd

    monkeypatch.setattr(torch, "empty", nan_empty)
    out = kernel(x, cos, sin, rotary_dim, interleaved)
    monkeypatch.undo()

    check_output(out, x, rotary_dim)
    if direction == "fwd":
        expected = rope_reference(x.double(), cos.double(), sin.double(), rotary_dim, interleaved)
    else:
        expected = reference_grad(x, x, cos, sin, rotary_dim, interleaved)
    assert rel_err(out, expected) < REL_TOL[torch.float32]


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_and_layouts(seed):
    """Seeded fuzz over shapes, layouts, table styles and both directions."""
    gen = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[torch.randint(len(options), (1,), generator=gen).item()]

    head_dim = pick([8, 16, 20, 24, 40, 48, 64, 80])
    rotary_dim = 2 * int(torch.randint(1, head_dim // 2 + 1, (1,), generator=gen))
    batch, heads, seq = pick([1, 2, 3]), pick([1, 2, 3, 6]), pick([1, 2, 5, 8, 13])
    layout = pick(["contiguous", "transposed", "sliced"])
    table_style = pick(["shared", "per_batch", "per_head"])
    interleaved = bool(pick([False, True]))
    dtype = pick([torch.float32, torch.float16])

    x = make_x(batch, heads, seq, head_dim, layout, dtype, gen)
    cos = make_table(batch, heads, seq, rotary_dim, table_style, torch.float32, gen)
    sin = make_table(batch, heads, seq, rotary_dim, table_style, torch.float32, gen)

    out = rope_fwd(x, cos, sin, rotary_dim, interleaved)
    check_output(out, x, rotary_dim)
    expected = rope_reference(x.double(), cos.double(), sin.double(), rotary_dim, interleaved)
    assert rel_err(out, expected) < REL_TOL[dtype]

    dx = rope_bwd(x, cos, sin, rotary_dim, interleaved)
    check_output(dx, x, rotary_dim)
    assert rel_err(dx, reference_grad(x, x, cos, sin, rotary_dim, interleaved)) < REL_TOL[dtype]


def test_unexpanded_tables_are_broadcast():
    """(T, R) tables give the same result as the same tables expanded to 4-D."""
    batch, heads, seq, head_dim, rotary_dim = 2, 3, 4, 16, 16
    gen = torch.Generator().manual_seed(5)
    x = make_x(batch, heads, seq, head_dim, "transposed", torch.float32, gen)
    cos = nonzero_uniform((seq, rotary_dim), gen).to(DEVICE)
    sin = nonzero_uniform((seq, rotary_dim), gen).to(DEVICE)
    full = (batch, heads, seq, rotary_dim)
    out_2d = rope_fwd(x, cos, sin, rotary_dim, False)
    out_4d = rope_fwd(x, cos.expand(full), sin.expand(full), rotary_dim, False)
    assert torch.equal(out_2d, out_4d)


def test_empty_sequence():
    x = torch.ones(2, 3, 0, 16, device=DEVICE)
    cos = torch.ones(2, 3, 0, 8, device=DEVICE)
    assert rope_fwd(x, cos, cos, 8, False).shape == (2, 3, 0, 16)
    assert rope_bwd(x, cos, cos, 8, True).shape == (2, 3, 0, 16)


@pytest.mark.parametrize(
    "rotary_dim, table_dim, match",
    [(7, 7, "even"), (18, 18, "head_dim"), (0, 0, "even"), (8, 6, "last dim")],
)
def test_invalid_arguments_raise(rotary_dim, table_dim, match):
    x = torch.ones(1, 1, 2, 16, device=DEVICE)
    table = torch.ones(1, 1, 2, table_dim, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        rope_fwd(x, table, table, rotary_dim, False)


def test_reference_matches_closed_form():
    """Pin the layouts of the reference itself on a hand-written example."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    cos = torch.tensor([0.5, 0.25, 2.0, 4.0])
    sin = torch.tensor([3.0, 5.0, 7.0, 11.0])
    # rotate-half: rot(x[:4]) = [-3, -4, 1, 2]
    half = rope_reference(x, cos, sin, 4, interleaved=False)
    assert torch.equal(half, torch.tensor([0.5 - 9, 0.5 - 20, 6 + 7, 16 + 22, 5.0]))
    # interleaved: rot(x[:4]) = [-2, 1, -4, 3]
    inter = rope_reference(x, cos, sin, 4, interleaved=True)
    assert torch.equal(inter, torch.tensor([0.5 - 6, 0.5 + 5, 6 - 28, 16 + 33, 5.0]))


# ----------------------------------------------------------------------------
# GPU-only: bf16, model-sized shapes and tracing through torch.compile.
# ----------------------------------------------------------------------------


def _model_inputs(dtype: torch.dtype, head_dim: int, rotary_dim: int, seed: int):
    batch, heads, seq = 2, 8, 256
    gen = torch.Generator().manual_seed(seed)
    x = make_x(batch, heads, seq, head_dim, "transposed", dtype, gen)
    cos = make_table(batch, heads, seq, rotary_dim, "shared", torch.float32, gen)
    sin = make_table(batch, heads, seq, rotary_dim, "shared", torch.float32, gen)
    return x, cos, sin


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("head_dim, rotary_dim", [(128, 128), (128, 64), (80, 64)])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_cuda_q_shapes(dtype, head_dim, rotary_dim, interleaved):
    x, cos, sin = _model_inputs(dtype, head_dim, rotary_dim, seed=11)
    assert x.is_cuda

    out = rope_fwd(x, cos, sin, rotary_dim, interleaved)
    check_output(out, x, rotary_dim)
    expected = rope_reference(x.double(), cos.double(), sin.double(), rotary_dim, interleaved)
    assert rel_err(out, expected) < REL_TOL[dtype]

    dx = rope_bwd(x, cos, sin, rotary_dim, interleaved)
    check_output(dx, x, rotary_dim)
    assert rel_err(dx, reference_grad(x, x, cos, sin, rotary_dim, interleaved)) < REL_TOL[dtype]


@functools.cache
def _rope_fwd_triton_op():
    """A triton_op around rope_fwd, registered once, for the compile test."""

    @torch.library.triton_op("ccgqa_rope_kernel_test::rope_fwd", mutates_args=())
    def rope_fwd_op(
        x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool
    ) -> torch.Tensor:
        return rope_fwd(x, cos, sin, rotary_dim, interleaved)

    return rope_fwd_op


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_cuda_wrap_triton_traces_under_torch_compile(interleaved):
    """wrap_triton launches must be capturable by Inductor inside a triton_op."""
    op = _rope_fwd_triton_op()
    rotary_dim = 64
    x, cos, sin = _model_inputs(torch.bfloat16, 128, rotary_dim, seed=12)

    def attention_prologue(x, cos, sin):
        return op(x * 2, cos, sin, rotary_dim, interleaved) + 1

    torch._dynamo.reset()
    compiled = torch.compile(attention_prologue, fullgraph=True)
    actual = compiled(x, cos, sin)
    expected = rope_fwd(x * 2, cos, sin, rotary_dim, interleaved) + 1
    torch.testing.assert_close(actual, expected)
