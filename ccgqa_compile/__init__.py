"""ccgqa-compile: fused Triton kernels for CCGQA-style transformer blocks, through torch.compile.

``torch.compile(model, backend="ccgqa")`` works after ``pip install`` (entry point). The
functions below inspect what fused; ``register_global()`` opts plain ``torch.compile`` in.
"""

from __future__ import annotations

# torch.ops.ccgqa.* are registered by ``import ccgqa_compile.ops``, which the backend and
# the passes do when they first run (the op modules import triton; the passes do not)
from .backend import ccgqa_backend, register_global, unregister_global
from .reporting import FusionReport, report, reset_report

__version__ = "0.1.0"

__all__ = [
    "FusionReport",
    "ccgqa_backend",
    "register_global",
    "report",
    "reset_report",
    "unregister_global",
]
