"""The split-KV decode attention kernel against a float64 reference.

Under the interpreter (CPU): small caches split over several programs, one to a few query
tokens, GQA ratios 1..8, no mask, a static cache's position mask (keys past the token
hidden), a row whose keys are all hidden (zeros, never NaN), fp32 and fp16. On a GPU
(``cuda``): bf16/fp16/fp32 at the ZAYA1 and Llama widths, long caches.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from ccgqa_compile.kernels.gqa_decode import (  # noqa: E402
    gqa_decode_attention_fwd,
    gqa_decode_attention_reference,
)

from .._compare import rel_err  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
requires_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1")
requires_compiled_cuda = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET != 1"
)


def _inputs(batch, hq, hkv, t_q, t_k, d, dtype, device, mask_kind, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(batch, hq, t_q, d), rand(batch, hkv, t_k, d), rand(batch, hkv, t_k, d)
    mask = None
    if mask_kind in ("static_cache", "empty_row"):
        # a static cache filled up to each token's position: keys after it are hidden
        filled = t_k - 5
        pos = torch.arange(filled - t_q, filled, device=device)
        mask = (torch.arange(t_k, device=device)[None, :] <= pos[:, None])[None, None]
        mask = mask.expand(batch, 1, t_q, t_k).clone()
        if mask_kind == "empty_row":
            mask[0, 0, 0] = False
    return q, k, v, mask


def _check(out, q, k, v, mask, scale, tol):
    want = gqa_decode_attention_reference(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "NaN/inf in the kernel output"
    if mask is not None and not mask.any(-1).all():
        empty = ~mask.expand(*q.shape[:-1], k.shape[-2]).any(-1)
        assert (out[empty] == 0).all(), "a row with no visible key must be zeros"
    err = rel_err(out, want)
    assert err < tol, f"relative error {err:.3g} >= {tol}"


CASES = [  # batch, hq, hkv, t_q, t_k, d, mask kind
    (2, 4, 2, 1, 300, 16, None),
    (1, 8, 1, 1, 257, 32, "static_cache"),
    (2, 4, 4, 3, 130, 64, "static_cache"),
    (1, 8, 2, 4, 200, 16, "empty_row"),
    (3, 2, 2, 1, 9, 128, None),
]


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_interpreted_kernel_matches_float64(case, dtype):
    batch, hq, hkv, t_q, t_k, d, mask_kind = case
    q, k, v, mask = _inputs(batch, hq, hkv, t_q, t_k, d, dtype, "cpu", mask_kind)
    out = gqa_decode_attention_fwd(q, k, v, mask, d**-0.5)
    _check(out, q, k, v, mask, d**-0.5, 1e-5 if dtype == torch.float32 else 2e-3)


@requires_interpreter
def test_interpreted_kernel_reads_strided_cache_views():
    """K/V as views of a larger (B, T_max, H, D) cache, sliced to the filled length."""
    q, _k, _v, _ = _inputs(2, 4, 2, 1, 8, 32, torch.float32, "cpu", None)
    cache = torch.randn(2, 160, 2, 32)
    k = cache[:, :150].transpose(1, 2)
    v = (cache * 0.5 + 1)[:, :150].transpose(1, 2)
    out = gqa_decode_attention_fwd(q, k, v, None, 0.2)
    _check(out, q, k, v, None, 0.2, 1e-5)


GPU_CASES = [  # batch, hq, hkv, t_q, t_k, d, mask kind
    (1, 8, 2, 1, 4096, 128, None),  # ZAYA1
    (16, 8, 2, 1, 32768, 128, "static_cache"),
    (4, 32, 8, 1, 8191, 128, None),  # Llama-3-8B
    (2, 16, 4, 4, 5000, 64, "empty_row"),
    (8, 16, 4, 1, 1000, 16, "static_cache"),
    (8, 16, 2, 2, 3000, 32, None),
]


@pytest.mark.cuda
@requires_compiled_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_kernel_matches_float64(case, dtype):
    batch, hq, hkv, t_q, t_k, d, mask_kind = case
    q, k, v, mask = _inputs(batch, hq, hkv, t_q, t_k, d, dtype, "cuda", mask_kind, seed=t_k)
    out = gqa_decode_attention_fwd(q, k, v, mask, d**-0.5)
    # bf16: the output is rounded once (2^-9) plus the bf16 P.V products; fp32: tf32 dots
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}[dtype]
    _check(out, q, k, v, mask, d**-0.5, tol)
