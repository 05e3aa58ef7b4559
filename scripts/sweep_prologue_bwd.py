"""Tune the CCGQA prologue's backward kernels (CUDA only): tile height x time blocks per
conv-backward program x warps.

    python scripts/sweep_prologue_bwd.py [--out DIR] [--old MODULE] [--inductor]

For each config (B*T = 32768 tokens, T = 2048, bf16, conv kernels 2/2, qk-mean, exp
temperature, full RoPE) and each launch variant: the backward's GPU time as a CUDA-graph
replay (``triton.testing.do_bench_cudagraph``, median; the partial sums included), beside
the forward kernel's time. The default launch's q, k and gradients are checked against the
float64 reference (relative norm error; the tests cover the other launches). ``--old`` names a
module with another ``ccgqa_prologue_fwd`` / ``ccgqa_prologue_bwd`` (same signatures, e.g. a
copy of the kernel file at an earlier commit) timed in the same process, forward too;
``--inductor`` also times the reference's backward compiled by Inductor default (the
"never slower than Inductor" check). The floor counts the backward's bytes once at ~3
TB/s: dq, dk and q_pre, k_pre read, d q_pre, d k_pre written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # --old modules of the checkout

from ccgqa_compile.bench import warm_up_gpu  # noqa: E402
from ccgqa_compile.bench.common import cuda_kernel_breakdown, print_kernels  # noqa: E402
from ccgqa_compile.bench.prologue import make_inputs, max_rel_err_vs_fp64  # noqa: E402
from ccgqa_compile.kernels.ccgqa_prologue import (  # noqa: E402
    ccgqa_prologue_bwd,
    ccgqa_prologue_fwd,
    ccgqa_prologue_reference,
)

BYTES_PER_S = 3.0e12
# launches: (block_t, chunk, num_warps)
# (first H100 sweep, 2026-11-24: 2 warps and 8 time blocks per program never won at d32)
_NARROW = [(64, 4, 4), (64, 8, 4)]
_NARROW += [(bt, c, w) for bt in (128, 256) for c in (1, 2, 4) for w in (4, 8)]
_WIDE = [(bt, c, w) for bt in (32, 64, 128) for c in (1, 2) for w in (4, 8)]
# (label, hq, hkv, d, launches): the block benchmark's two configs, then wider heads
CONFIGS = [
    ("E2048 hq16 hkv4 C4", 16, 4, 32, _NARROW),
    ("E512 hq8 hkv2 C4", 8, 2, 16, _NARROW),
    ("hq8 hkv2 d64", 8, 2, 64, _WIDE),
    ("hq8 hkv2 d128", 8, 2, 128, _WIDE),
]


def _inductor_bwd(tensors, scalars, dq, dk):
    """The reference's backward as Inductor default compiles it (forward run once)."""
    compiled = torch.compile(ccgqa_prologue_reference)
    grad_mask = [True] * 11 + [False, False]
    train_in = [x.detach().requires_grad_(m) for x, m in zip(tensors, grad_mask)]
    q, k = compiled(*train_in, *scalars)

    def bwd():
        return torch.autograd.grad((q, k), train_in[:11], (dq, dk), retain_graph=True)

    bwd()  # compile outside the timing
    return bwd


def _cuda_graph_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn)


def _sweep_config(label, hq, hkv, d, launches, b, t, old, inductor, sweep, kernels=False) -> list[dict]:
    tensors, scalars = make_inputs(b, t, hq, hkv, d, torch.bfloat16)
    q, k = ccgqa_prologue_fwd(*tensors, *scalars)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    io = sum(x.numel() * x.element_size() for x in (dq, dk, tensors[0], tensors[1]))
    io += tensors[0].numel() * 2 + tensors[1].numel() * 2
    floor = io / BYTES_PER_S * 1e3
    t_fwd = triton.testing.do_bench_cudagraph(lambda: ccgqa_prologue_fwd(*tensors, *scalars))
    grads = ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)
    err = max_rel_err_vs_fp64(tensors, scalars, q, k, dq, dk, grads)
    print(f"\n== {label} B{b} T{t}: fwd {t_fwd:.4f} ms, bwd floor {floor:.4f} ms, "
          f"default bwd max rel err {err:.2e}")  # fmt: skip
    if kernels:
        events, busy_ms = cuda_kernel_breakdown(lambda: ccgqa_prologue_bwd(dq, dk, *tensors, *scalars))
        print(f"   default backward, per kernel ({busy_ms:.4f} ms in all):")
        print_kernels(events, 5, 12)
    t_fwd_old = None
    if old is not None:
        q_old, k_old = old.ccgqa_prologue_fwd(*tensors, *scalars)
        grads_old = old.ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)
        err_old = max_rel_err_vs_fp64(tensors, scalars, q_old, k_old, dq, dk, grads_old)
        t_fwd_old = triton.testing.do_bench_cudagraph(
            lambda: old.ccgqa_prologue_fwd(*tensors, *scalars)
        )
        print(f"   --old: fwd {t_fwd_old:.4f} ms, bwd max rel err {err_old:.2e}")
    variants = [("default", lambda: ccgqa_prologue_bwd(dq, dk, *tensors, *scalars))]
    if old is not None:
        variants.append(("--old", lambda: old.ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)))
    if inductor:
        variants.append(("inductor reference bwd", _inductor_bwd(tensors, scalars, dq, dk)))
    for bt, chunk, warps in launches if sweep else ():
        variants.append(
            (f"block_t {bt} chunk {chunk} warps {warps}",
             lambda bt=bt, c=chunk, w=warps: ccgqa_prologue_bwd(
                 dq, dk, *tensors, *scalars, block_t=bt, chunk=c, num_warps=w)),
        )  # fmt: skip
    rows = []
    for name, fn in variants:
        # Inductor's backward is an autograd call that CUDA graphs cannot capture here:
        # plain do_bench (its launch overhead counts against it; small at these sizes)
        bench = triton.testing.do_bench if name.startswith("inductor") else _cuda_graph_ms
        try:
            ms = bench(fn)
        except Exception as exc:  # noqa: BLE001 - a launch that does not fit is a result
            print(f"  {name:32s} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        print(f"  {name:32s} {ms:8.4f} ms  {io / ms / 1e6:7.1f} GB/s")
        rows.append(dict(config=label, b=b, t=t, variant=name, bwd_ms=ms, fwd_ms=t_fwd,
                         old_fwd_ms=t_fwd_old, floor_bwd_ms=floor, gbs=io / ms / 1e6,
                         default_max_rel_err=err))  # fmt: skip
    torch._dynamo.reset()  # the next config's shapes get a fresh compile
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--old", default=None, help="module with another ccgqa_prologue_fwd/_bwd")
    ap.add_argument("--inductor", action="store_true", help="also time Inductor's backward")
    ap.add_argument(
        "--no-sweep",
        action="store_true",
        help="time only the default launch (and --old / --inductor): at d128 each launch "
        "variant compiles for tens of seconds, and the whole list did not fit a 330 s step",
    )
    ap.add_argument("--kernels", action="store_true", help="the default backward's kernels, timed apart")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument(
        "--configs", default=None, help="comma-separated head dims, e.g. d128,d32 (default: all)"
    )
    args = ap.parse_args(argv)
    old = importlib.import_module(args.old) if args.old else None
    warm_up_gpu()
    # by head dim, so that the choice passes through a shell variable unquoted
    by_dim = {f"d{config[3]}": config for config in CONFIGS}
    chosen = args.configs.split(",") if args.configs else list(by_dim)
    unknown = set(chosen) - set(by_dim)
    if unknown:
        ap.error(f"unknown --configs {sorted(unknown)}; known: {list(by_dim)}")
    b, t = args.tokens // args.seq_len, args.seq_len
    rows = []
    out = Path(args.out) / "sweep_prologue_bwd.json"
    for key in chosen:
        rows += _sweep_config(*by_dim[key], b, t, old, args.inductor, not args.no_sweep, args.kernels)
        out.write_text(json.dumps(rows, indent=1))  # after each config: a cut run keeps them
        torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
