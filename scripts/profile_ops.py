"""Where the time goes: CUDA kernel breakdown of one fwd+bwd step per provider.

    python scripts/profile_ops.py --ops rmsnorm,swiglu,rope [--top 12]

Uses the benchmark's own cases (``ccgqa_compile.bench``), warms each provider up (the
compiling call is never profiled), then profiles a few steps with torch.profiler and prints
the kernels sorted by total CUDA time, per step.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ccgqa_compile import bench


def profile_provider(case: bench.Case, name: str, fn, base, top: int, steps: int = 5) -> None:
    inputs = [t.detach().clone().requires_grad_(i < case.n_grad) for i, t in enumerate(base)]
    out = bench._as_tuple(fn(*inputs))
    grads = tuple(torch.randn_like(o) for o in out)

    def step():
        for t in inputs[: case.n_grad]:
            t.grad = None
        torch.autograd.backward(bench._as_tuple(fn(*inputs)), grads)

    events, total = cuda_kernel_breakdown(step, steps)
    print(f"\n== {case.op} {case.label} [{name}]  {total:.3f} ms/step on the GPU")
    print_kernels(events, steps, top)


def cuda_kernel_breakdown(step, steps: int = 5) -> tuple[list, float]:
    """Warm ``step`` up, profile ``steps`` calls: the CUDA kernels by total time, and the
    GPU-busy milliseconds per step."""
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


def profile_case(case: bench.Case, top: int, providers: set[str] | None = None) -> None:
    base = case.make()
    for name, fn in bench._providers(case).items():
        if providers is None or name in providers:
            profile_provider(case, name, fn, base, top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="rmsnorm,swiglu,rope")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--seq-lens", default="", help="comma-separated T (default: the bench's)")
    ap.add_argument("--block-configs", default="", help="ccgqa-block E:hq:hkv:C, comma-separated")
    ap.add_argument("--providers", default="", help="comma-separated (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    seq_lens = [int(t) for t in args.seq_lens.split(",") if t]
    configs = tuple(tuple(int(v) for v in c.split(":")) for c in args.block_configs.split(",") if c)
    providers = set(args.providers.split(",")) if args.providers else None
    for op in args.ops.split(","):
        for case in bench._cases(op, "cuda", torch.bfloat16, False, seq_lens, configs):
            profile_case(case, args.top, providers)


if __name__ == "__main__":
    main()
