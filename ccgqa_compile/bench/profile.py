"""``python -m ccgqa_compile.bench profile``: where the time goes, the CUDA kernels of one
fwd+bwd step per provider (CUDA only).

Uses the default command's cases (``--ops``, ``--seq-lens``, ``--block-configs``), warms each
provider up (the compiling call is never profiled), then profiles a few steps with
torch.profiler and prints the kernels sorted by total CUDA time, per step.
"""

from __future__ import annotations

import argparse

import torch

from . import ops
from .common import as_tuple, cuda_kernel_breakdown, print_kernels

HELP = "CUDA kernel breakdown of one fwd+bwd step per provider (CUDA)"


def profile_provider(case: ops.Case, name: str, fn, base, top: int, steps: int = 5) -> None:
    inputs = [t.detach().clone().requires_grad_(i < case.n_grad) for i, t in enumerate(base)]
    out = as_tuple(fn(*inputs))
    grads = tuple(torch.randn_like(o) for o in out)

    def step():
        for t in inputs[: case.n_grad]:
            t.grad = None
        torch.autograd.backward(as_tuple(fn(*inputs)), grads)

    events, total = cuda_kernel_breakdown(step, steps)
    print(f"\n== {case.op} {case.label} [{name}]  {total:.3f} ms/step on the GPU")
    print_kernels(events, steps, top)


def profile_case(case: ops.Case, top: int, providers: set[str] | None = None) -> None:
    base = case.make()
    for name, fn in ops.providers(case).items():
        if providers is None or name in providers:
            profile_provider(case, name, fn, base, top)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ops", default="rmsnorm,swiglu,rope", help=f"of {', '.join(ops.OPS)}")
    ap.add_argument("--top", type=int, default=12, help="kernels shown per provider")
    ap.add_argument("--seq-lens", default="", help="comma-separated T (default: the bench's)")
    ap.add_argument("--block-configs", default="", help="ccgqa-block E:hq:hkv:C, comma-separated")
    ap.add_argument("--providers", default="", help="comma-separated (default: all)")


def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile needs a CUDA GPU")
    torch.manual_seed(0)
    seq_lens = [int(t) for t in args.seq_lens.split(",") if t]
    configs = tuple(tuple(int(v) for v in c.split(":")) for c in args.block_configs.split(",") if c)
    providers = set(args.providers.split(",")) if args.providers else None
    for op in args.ops.split(","):
        for case in ops.cases(op, "cuda", torch.bfloat16, False, seq_lens, configs):
            profile_case(case, args.top, providers)
