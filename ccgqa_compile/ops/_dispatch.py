"""The one place that decides "Triton kernel or exact composite fallback"."""

from __future__ import annotations

import functools
import os

import torch

from .. import config

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor is a CUDA tensor of a dtype our kernels handle.

    Anything else (CPU, fp64, missing triton, ``CCGQA_DISABLE_KERNELS=1``) takes the
    composite path, which computes the same function with plain PyTorch ops.
    """
    present = [t for t in tensors if t is not None]
    if not present or config.kernels_disabled() or not triton_available():
        return False
    on_cpu_ok = interpreting_kernels_on_cpu()
    return all(
        (t.is_cuda or (on_cpu_ok and t.device.type == "cpu")) and t.dtype in KERNEL_DTYPES
        for t in present
    )


def interpreting_kernels_on_cpu() -> bool:
    """Test hook: run the Triton kernels on CPU tensors under the Triton interpreter.

    Needs both ``TRITON_INTERPRET=1`` (set before triton is imported) and
    ``CCGQA_INTERPRET_KERNELS_ON_CPU=1``. Only for eager op calls: Inductor cannot run
    Triton on CPU. It lets CPU CI check the op <-> kernel wiring (shapes, strides,
    argument order, the registered backward) that otherwise only a GPU would exercise.
    """
    return (
        os.environ.get("TRITON_INTERPRET") == "1"
        and os.environ.get("CCGQA_INTERPRET_KERNELS_ON_CPU") == "1"
    )


def composite_op(name: str, fn):
    """Register ``fn`` (plain PyTorch) as the opaque op ``ccgqa::<name>``.

    The fused ops are ``triton_op``s, which Inductor decomposes into their bodies. On the
    fallback path that body would be plain aten ops again, which our own patterns (or a
    later round of them) could match a second time; wrapping it in an opaque op keeps the
    graph honest: it shows ``ccgqa.<name>`` where a fusion fired.
    """
    op = torch.library.custom_op(f"ccgqa::{name}", fn, mutates_args=())
    op.register_fake(fn)
    return op


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its last dim is not unit-stride.

    The kernels read rows of the last dim as vectors. Inductor may hand an op a tensor whose
    layout it inherited from a convolution ((B, C, T) memory seen as (B, H, T, D)): one
    copy is cheap next to the composite fallback, which materialises T x T scores.
    """
    return t if t.stride(-1) == 1 else t.contiguous()


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64: the fallback never loses precision."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out
