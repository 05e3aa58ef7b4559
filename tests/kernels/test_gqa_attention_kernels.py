"""Tests of the causal GQA flash-attention kernels against a float64 reference.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set
below before torch/triton are imported): tiny shapes, float32 (and one float16
case; bf16 dots are broken in the interpreter).  The `cuda` tests run the compiled
kernels in bf16/fp16 and are skipped unless a GPU is present and TRITON_INTERPRET
is not 1.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from ccgqa_compile.kernels import gqa_attention as attention  # noqa: E402
from ccgqa_compile.kernels.gqa_attention import (  # noqa: E402
    BlockConfig,
    gqa_attention_bwd,
    gqa_attention_fwd,
    gqa_attention_reference,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Device for the interpreter tests: the interpreter runs kernels on CPU tensors.
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"

# The float32 tests below expect IEEE float32 dots and the interpreter's small tiles;
# on a GPU the `cuda` tests cover the compiled kernels instead.
requires_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1")
requires_compiled_cuda = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(),
    reason="needs a CUDA GPU and TRITON_INTERPRET != 1",
)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite values in the kernel output"
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, name: str):
    if expected.abs().max() == 0:
        # e.g. dq and dk at T=1: the only probability is exactly 1, so the exact
        # gradient is 0 and only rounding noise may remain.
        assert torch.isfinite(actual).all(), name
        assert actual.abs().max().item() < 1e-5, name
        return
    error = _relative_error(actual, expected)
    assert error < tolerance, f"{name}: relative error {error:.3g} >= {tolerance}"


def _make_inputs(
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    seq_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    layout: str,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v; layout "bhtd" is contiguous, "bthd" a transposed view of a
    contiguous (B, T, H, D) tensor (how attention inputs usually arrive)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def make(num_heads: int) -> torch.Tensor:
        if layout == "bthd":
            t = torch.randn(batch, seq_len, num_heads, head_dim, generator=generator)
            return t.to(device=device, dtype=dtype).transpose(1, 2)
        t = torch.randn(batch, num_heads, seq_len, head_dim, generator=generator)
        return t.to(device=device, dtype=dtype)

    return make(num_q_heads), make(num_kv_heads), make(num_kv_heads)


def _reference_outputs(q, k, v, do, scale):
    """o, lse and (dq, dk, dv) from the naive float64 reference."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = gqa_attention_reference(q64, k64, v64, scale)
    grads = torch.autograd.grad(out, (q64, k64, v64), do.double())
    group_size = q.shape[1] // k.shape[1]
    scores = q64.detach() @ k64.detach().repeat_interleave(group_size, 1).transpose(-1, -2)
    seq_len = q.shape[2]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    lse = torch.logsumexp((scores * scale).masked_fill(future, float("-inf")), dim=-1)
    return out.detach(), lse, grads


def _check_against_reference(q, k, v, scale, do, out_tol, lse_tol, grad_tol):
    out, lse = gqa_attention_fwd(q, k, v, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    dq, dk, dv = gqa_attention_bwd(do, q, k, v, out, lse, scale)
    assert dq.shape == q.shape and dq.dtype == q.dtype
    assert dk.shape == k.shape and dk.dtype == k.dtype
    assert dv.shape == v.shape and dv.dtype == v.dtype

    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = _reference_outputs(q, k, v, do, scale)
    _assert_close(out, ref_out, out_tol, "o")
    _assert_close(lse, ref_lse, lse_tol, "lse")
    _assert_close(dq, ref_dq, grad_tol, "dq")
    _assert_close(dk, ref_dk, grad_tol, "dk")
    _assert_close(dv, ref_dv, grad_tol, "dv")


# The interpreter computes float32 dots in IEEE float32 (errors ~1e-7); 1e-4 also
# leaves room for tf32 should the interpreter ever emulate it.
FP32_TOLERANCE = 1e-4

# (B, Hq, Hkv, T, D).  Interpreter tiles are 32x16 (forward, dQ) and 16x32 (dK/dV),
# so T=17/40 end inside a block, T=32/64 are whole blocks (the unmasked EVEN_T code).
INTERPRETER_CASES = [
    (1, 2, 1, 1, 16),  # T=1: a single key per query
    (2, 3, 1, 17, 16),  # G=3, partial last block
    (1, 2, 2, 5, 32),  # G=1 (plain multi-head)
    (2, 4, 2, 40, 32),  # G=2, two KV heads
    (1, 6, 2, 64, 16),  # G=3, T a multiple of every block (no bounds masks)
    (1, 2, 1, 33, 64),  # D=64
]


@requires_interpreter
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize(
    ("batch", "num_q_heads", "num_kv_heads", "seq_len", "head_dim"), INTERPRETER_CASES
)
def test_matches_float64_reference_fp32(
    batch, num_q_heads, num_kv_heads, seq_len, head_dim, layout
):
    q, k, v = _make_inputs(
        batch,
        num_q_heads,
        num_kv_heads,
        seq_len,
        head_dim,
        torch.float32,
        DEVICE,
        layout,
        seed=seq_len,
    )
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    scale = 1.0 / math.sqrt(head_dim)
    _check_against_reference(q, k, v, scale, do, FP32_TOLERANCE, FP32_TOLERANCE, FP32_TOLERANCE)


@requires_interpreter
@pytest.mark.parametrize(("seq_len", "head_dim"), [(40, 32), (64, 16), (1, 16), (33, 64)])
def test_tma_forward_matches_pointer_loads_and_reference(seq_len, head_dim):
    # The forward's TMA form (K/V through tensor descriptors; rows past T zero-filled
    # instead of masked), which the GPU takes at D=128, run here at small D.
    import triton

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    q, k, v = _make_inputs(1, 4, 2, seq_len, head_dim, torch.float32, DEVICE, "bthd", seed=21)
    scale = 1.0 / math.sqrt(head_dim)
    shapes = attention._check_inputs(q, k, v, scale)
    config = attention.INTERPRETER_FORWARD_CONFIG
    out_tma, lse_tma = attention._launch_forward(q, k, v, scale, shapes, config, tma=True)
    out_ptr, lse_ptr = attention._launch_forward(q, k, v, scale, shapes, config, tma=False)
    ref_out, ref_lse, _ = _reference_outputs(q, k, v, torch.ones_like(q), scale)
    _assert_close(out_tma, ref_out, FP32_TOLERANCE, "o (tma)")
    _assert_close(lse_tma, ref_lse, FP32_TOLERANCE, "lse (tma)")
    assert torch.allclose(out_tma, out_ptr, atol=1e-6) and torch.allclose(lse_tma, lse_ptr)


@requires_interpreter
@pytest.mark.parametrize(
    ("batch", "num_q_heads", "num_kv_heads", "seq_len", "head_dim"), INTERPRETER_CASES
)
def test_tma_dkdv_matches_pointer_loads(batch, num_q_heads, num_kv_heads, seq_len, head_dim):
    # The dK/dV kernel's TMA form (Q and dO through (group, T, D) descriptors), which the
    # GPU takes at D=128, against its pointer-load form and the float64 reference.
    import triton

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    q, k, v = _make_inputs(
        batch, num_q_heads, num_kv_heads, seq_len, head_dim, torch.float32, DEVICE, "bthd",
        seed=seq_len + 7,
    )  # fmt: skip
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    scale = 1.0 / math.sqrt(head_dim)
    shapes = attention._check_inputs(q, k, v, scale)
    out, lse = gqa_attention_fwd(q, k, v, scale)
    delta = attention._launch_backward_preprocess(do, out, shapes)
    config = attention.INTERPRETER_DKDV_CONFIG
    launch = attention._launch_backward_dkdv
    dk_tma, dv_tma = launch(do, q, k, v, lse, delta, scale, shapes, config, tma=True)
    dk_ptr, dv_ptr = launch(do, q, k, v, lse, delta, scale, shapes, config, tma=False)
    _, _, (_, ref_dk, ref_dv) = _reference_outputs(q, k, v, do, scale)
    _assert_close(dk_tma, ref_dk, FP32_TOLERANCE, "dk (tma)")
    _assert_close(dv_tma, ref_dv, FP32_TOLERANCE, "dv (tma)")
    assert torch.allclose(dk_tma, dk_ptr, atol=1e-5) and torch.allclose(dv_tma, dv_ptr, atol=1e-5)


def test_tma_forward_not_taken_where_it_cannot_run():
    q, k, v = _make_inputs(1, 2, 1, 8, 128, torch.float32, DEVICE, "bhtd", seed=0)
    assert not attention.use_forward_tma(k, v, 128)  # CPU / interpreter
    assert not attention.use_forward_tma(k, v, 64)  # not a TMA head dim
    assert not attention.use_dkdv_tma(q, q, 128)
    assert not attention.use_dkdv_tma(q, q, 64)


@requires_interpreter
def test_square_tiles_and_non_default_scale(monkeypatch):
    # One diagonal block per query block (block_m == block_n), unlike the default
    # interpreter tiles; a non-default scale checks where the scale enters dq/dk.
    square = BlockConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    monkeypatch.setattr(attention, "INTERPRETER_FORWARD_CONFIG", square)
    monkeypatch.setattr(attention, "INTERPRETER_DKDV_CONFIG", square)
    monkeypatch.setattr(attention, "INTERPRETER_DQ_CONFIG", square)
    q, k, v = _make_inputs(1, 4, 2, 40, 16, torch.float32, DEVICE, "bthd", seed=7)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _check_against_reference(q, k, v, 0.7, do, FP32_TOLERANCE, FP32_TOLERANCE, FP32_TOLERANCE)


@requires_interpreter
def test_non_contiguous_grad_output():
    # do arrives as a transposed view, e.g. from a following (B, T, H*D) projection.
    q, k, v = _make_inputs(1, 4, 2, 17, 16, torch.float32, DEVICE, "bhtd", seed=3)
    do = torch.randn(1, 17, 4, 16, generator=torch.Generator().manual_seed(4))
    do = do.to(DEVICE).transpose(1, 2)
    assert not do.is_contiguous()
    scale = 0.25
    _check_against_reference(q, k, v, scale, do, FP32_TOLERANCE, FP32_TOLERANCE, FP32_TOLERANCE)


@requires_interpreter
def test_float16():
    q, k, v = _make_inputs(1, 4, 2, 40, 32, torch.float16, DEVICE, "bthd", seed=5)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, torch.float16)
    # fp16 storage of inputs, P and dS: errors of a few 1e-4 expected.
    _check_against_reference(q, k, v, 1.0 / math.sqrt(32), do, 3e-3, 1e-4, 5e-3)


def test_reference_matches_sdpa():
    q, k, v = _make_inputs(2, 6, 2, 9, 16, torch.float64, "cpu", "bhtd", seed=8)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True
    )
    assert _relative_error(gqa_attention_reference(q, k, v, 0.25), expected) < 1e-12


@pytest.mark.parametrize("head_dim", [8, 48, 256])
def test_unsupported_head_dim_raises(head_dim):
    q, k, v = _make_inputs(1, 2, 1, 4, head_dim, torch.float32, DEVICE, "bhtd", seed=0)
    with pytest.raises(ValueError, match="head dim"):
        gqa_attention_fwd(q, k, v, 0.5)
    out = torch.randn_like(q)
    lse = torch.randn(q.shape[:3], device=q.device)
    with pytest.raises(ValueError, match="head dim"):
        gqa_attention_bwd(out, q, k, v, out, lse, 0.5)


def test_invalid_inputs_raise():
    q, k, v = _make_inputs(1, 3, 2, 4, 16, torch.float32, DEVICE, "bhtd", seed=0)
    with pytest.raises(ValueError, match="multiple"):
        gqa_attention_fwd(q, k, v, 0.5)
    q, k, v = _make_inputs(1, 2, 1, 4, 16, torch.float32, DEVICE, "bhtd", seed=0)
    with pytest.raises(ValueError, match="dtype"):
        gqa_attention_fwd(q, k.double(), v.double(), 0.5)
    with pytest.raises(ValueError, match="agree"):
        gqa_attention_fwd(q, k[:, :, :3], v[:, :, :3], 0.5)


# --------------------------------------------------------------------------------
# Compiled kernels on a GPU
# --------------------------------------------------------------------------------

# bf16/fp16 storage (inputs, output, P and dS): ~3e-3 typical for o, ~1e-2 for grads.
GPU_TOLERANCES = {
    torch.bfloat16: (1e-2, 1e-4, 2e-2),
    torch.float16: (5e-3, 1e-4, 1e-2),
}


@pytest.mark.cuda
@requires_compiled_cuda
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("seq_len", [1, 100, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_float64_reference(dtype, seq_len, head_dim):
    q, k, v = _make_inputs(
        2, 8, 2, seq_len, head_dim, dtype, "cuda", "bthd", seed=seq_len + head_dim
    )
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to("cuda", dtype)
    out_tol, lse_tol, grad_tol = GPU_TOLERANCES[dtype]
    _check_against_reference(q, k, v, 1.0 / math.sqrt(head_dim), do, out_tol, lse_tol, grad_tol)


@pytest.mark.cuda
@requires_compiled_cuda
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_cuda_long_partial_block_bf16(head_dim):
    # T past the short-sequence tiles and not a multiple of them: masked large tiles.
    q, k, v = _make_inputs(1, 6, 2, 1000, head_dim, torch.bfloat16, "cuda", "bhtd", seed=11)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(
        "cuda", torch.bfloat16
    )
    _check_against_reference(
        q, k, v, 1.0 / math.sqrt(head_dim), do, *GPU_TOLERANCES[torch.bfloat16]
    )


@pytest.mark.cuda
@requires_compiled_cuda
@pytest.mark.parametrize("seq_len", [1, 100, 1000, 2048])
def test_cuda_tma_d128_and_its_pointer_fallback(seq_len):
    # D=128 takes the TMA forward on a Hopper; a K/V view 2 bytes off 16-byte alignment
    # must take the pointer-load forward instead, with the same result.
    q, k, v = _make_inputs(2, 8, 2, seq_len, 128, torch.bfloat16, "cuda", "bthd", seed=17)
    assert attention.use_forward_tma(k, v, 128)
    scale = 1.0 / math.sqrt(128)
    out, lse = gqa_attention_fwd(q, k, v, scale)
    ref_out, ref_lse, _ = _reference_outputs(q, k, v, torch.ones_like(q), scale)
    _assert_close(out, ref_out, GPU_TOLERANCES[torch.bfloat16][0], "o")
    _assert_close(lse, ref_lse, GPU_TOLERANCES[torch.bfloat16][1], "lse")
    flat = torch.empty(k.numel() + 1, dtype=k.dtype, device="cuda")
    k_off = flat[1:].view(k.shape[0], k.shape[2], k.shape[1], 128).transpose(1, 2)
    k_off.copy_(k)
    assert not attention.use_forward_tma(k_off, v, 128)
    out_off, lse_off = gqa_attention_fwd(q, k_off, v, scale)
    _assert_close(out_off, ref_out, GPU_TOLERANCES[torch.bfloat16][0], "o (unaligned k)")
    # the backward: TMA dK/dV on aligned q/dO, pointer loads on a misaligned dO
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(18)).to(
        "cuda", torch.bfloat16
    )
    assert attention.use_dkdv_tma(q, do, 128)
    _, _, ref_grads = _reference_outputs(q, k, v, do, scale)
    flat = torch.empty(do.numel() + 1, dtype=do.dtype, device="cuda")
    do_off = flat[1:].view(do.shape).copy_(do)
    assert not attention.use_dkdv_tma(q, do_off, 128)
    for grad_out in (do, do_off):
        grads = gqa_attention_bwd(grad_out, q, k, v, out, lse, scale)
        for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
            _assert_close(grad, ref, GPU_TOLERANCES[torch.bfloat16][2], name)


@pytest.mark.cuda
@requires_compiled_cuda
def test_cuda_tma_forward_under_torch_compile():
    # Inside a compiled graph Inductor launches the kernel and provides the scratch
    # the device-side descriptors need: the op at D=128, fwd and bwd, vs float64.
    import ccgqa_compile  # noqa: F401  (registers torch.ops.ccgqa)

    q, k, v = _make_inputs(2, 8, 2, 300, 128, torch.bfloat16, "cuda", "bthd", seed=19)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(20)).to(
        "cuda", torch.bfloat16
    )
    scale = 1.0 / math.sqrt(128)

    @torch.compile(fullgraph=True)
    def attend(q, k, v):
        return torch.ops.ccgqa.gqa_attention(q, k, v, scale)[0]

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    ref_out, _, ref_grads = _reference_outputs(q, k, v, do, scale)
    out_tol, _, grad_tol = GPU_TOLERANCES[torch.bfloat16]
    _assert_close(out, ref_out, out_tol, "o")
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        _assert_close(grad, ref, grad_tol, name)


@pytest.mark.cuda
@requires_compiled_cuda
def test_cuda_float32():
    q, k, v = _make_inputs(1, 4, 2, 300, 64, torch.float32, "cuda", "bthd", seed=13)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(14)).to("cuda")
    # tf32 dots (10-bit mantissa): ~3e-4 relative on o, a little more on lse and grads.
    _check_against_reference(q, k, v, 0.125, do, 2e-3, 1e-3, 5e-3)
