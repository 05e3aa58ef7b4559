"""Comparison helpers: relative norm error, NaN never passes."""

from __future__ import annotations

import torch

# relative-norm tolerance of compiled vs eager, by dtype (both run in that dtype)
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the compiled result"
    err = rel_err(actual, expected)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: relative norm error {err:.3e} > {tol:.1e} ({dtype})"
