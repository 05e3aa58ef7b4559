"""``python -m ccgqa_compile.bench``: every benchmark a user runs, one command.

    python -m ccgqa_compile.bench [--ops ...]      eager vs Inductor vs backend="ccgqa" (ops.py)
    python -m ccgqa_compile.bench core             attention core vs SDPA's backends
    python -m ccgqa_compile.bench prologue         CCGQA prologue kernels vs Inductor
    python -m ccgqa_compile.bench profile          CUDA kernels of each provider's step
    python -m ccgqa_compile.bench tables           docs tables and charts from the results
    python -m ccgqa_compile.bench record FILE...   results measured elsewhere, appended

Each benchmark appends its rows to the device's results file (``results.py``); ``tables``
turns those files into docs/benchmarks/README.md and README.md's "Measured" table. The
helpers the benchmarks (and ``scripts/``) share are in ``common.py``, exported here.
"""

from .cli import main, parse_args
from .common import (
    DTYPES,
    as_tuple,
    cuda_kernel_breakdown,
    device_name,
    print_kernels,
    rel_err,
    timer,
    warm_up_gpu,
)

__all__ = [
    "DTYPES", "as_tuple", "cuda_kernel_breakdown", "device_name", "main", "parse_args",
    "print_kernels", "rel_err", "timer", "warm_up_gpu",
]  # fmt: skip
