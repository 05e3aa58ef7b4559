"""Triton kernels, one file per fused op, each with a naive reference beside it."""

from __future__ import annotations

import os

import torch


def traceable(kernel):
    """``torch.library.wrap_triton(kernel)``: a launch Inductor can trace and inline.

    torch < 2.13 rejects the interpreter's kernels (``TRITON_INTERPRET=1``, CPU tests);
    there the plain kernel is launched, which is all an eager interpreted call needs
    (Inductor never runs Triton on CPU).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        major, minor = (int(p) for p in torch.__version__.split(".")[:2])
        if (major, minor) < (2, 13):
            return kernel
    return torch.library.wrap_triton(kernel)
