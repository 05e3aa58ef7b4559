"""What every benchmark here shares: the timer, the GPU warm-up, kernel breakdowns, errors.

Public so that the scripts under ``scripts/`` use these and write none of them again.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` (Frobenius norms), computed in float64."""
    a, b = actual.detach().double(), expected.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timer(device: str, fn: Callable, reset: list[torch.Tensor] = ()) -> tuple[float, str]:
    """Median ms of ``fn`` and the method. On CUDA: replays of a CUDA graph holding many
    steps (``do_bench_cudagraph``), which times the GPU work without the host's launch
    and autograd overhead; ``do_bench`` where a step cannot be captured. ``reset``: the
    tensors whose ``.grad`` is cleared between steps. On CPU: a wall clock, 7 calls."""
    if device == "cuda":
        import triton

        try:
            ms = triton.testing.do_bench_cudagraph(fn, grad_to_none=reset, return_mode="median")
            return ms, "cuda-graph"
        except Exception:  # a step that cannot be captured: plain events
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, grad_to_none=reset, return_mode="median")
            return ms, "events"
    times = []
    for _ in range(7):
        for t in reset:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), "wall-clock"


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Keep the GPU busy with matmuls for ``seconds`` before the first timed case.

    An idle GPU sits at its lowest clocks (the H200 reports 345 MHz SM at the start of a
    device call) and ramps up under load; without this the first case timed in a run is
    measured partly at low clocks (the d16 attention core, first in its benchmark, read
    2.000 ms on the H200 where its three kernels timed alone sum to about 1.5 ms)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def cuda_kernel_breakdown(step: Callable, steps: int = 5) -> tuple[list, float]:
    """Warm ``step`` up, profile ``steps`` calls: the CUDA kernels by total time, and the
    GPU-busy milliseconds per step (a wall time far above it means launch overhead)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.device_time_total)
    return events, sum(e.device_time_total for e in events) / steps / 1e3


def print_kernels(events: list, steps: int, top: int) -> None:
    for e in events[:top]:
        per = e.device_time_total / steps
        print(f"  {per / 1e3:8.4f} ms  x{e.count // steps:<3d} {e.key[:110]}")


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
