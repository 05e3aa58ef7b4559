"""Tune the CCGQA prologue's backward kernel (CUDA only): tiles per program x warps.

    python scripts/sweep_prologue_bwd.py [--out DIR] [--old MODULE]

For each config (B*T = 32768 tokens, T = 2048, bf16, conv kernels 2/2 and 4/4, qk-mean,
exp temperature, full RoPE) and each (chunk, num_warps): the backward's gradients against
the float64 reference (relative norm error), then its GPU time as a CUDA-graph replay
(``triton.testing.do_bench_cudagraph``, median; the partial sums included), beside the
forward kernel's time. ``--old`` names a module with an older ``ccgqa_prologue_bwd``
(same signature, without num_warps) timed in the same process as the baseline.
The floor counts the backward's bytes once at ~3 TB/s: dq, dk and q_pre, k_pre read, d
q_pre, d k_pre written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_prologue import make, rel  # noqa: E402

from ccgqa_compile.kernels.ccgqa_prologue import (  # noqa: E402
    ccgqa_prologue_bwd,
    ccgqa_prologue_fwd,
    ccgqa_prologue_reference,
)

BYTES_PER_S = 3.0e12
# (label, hq, hkv, d, k1, k2): the block benchmark's two configs, then wider heads
CONFIGS = [
    ("E2048 hq16 hkv4 C4", 16, 4, 32, 2, 2),
    ("E512 hq8 hkv2 C4", 8, 2, 16, 2, 2),
    ("E2048 hq16 hkv4 C4 k44", 16, 4, 32, 4, 4),
    ("hq8 hkv2 d64", 8, 2, 64, 2, 2),
    ("hq8 hkv2 d128", 8, 2, 128, 2, 2),
]
CHUNKS = (1, 2, 4, 8)
WARPS = (4, 8)


def _max_err(tensors, scalars, dq, dk, grads) -> float:
    mask = [True] * 11 + [False, False]
    leaves = [x.detach().double().requires_grad_(m) if x is not None else None
              for x, m in zip(tensors, mask)]  # fmt: skip
    q_r, k_r = ccgqa_prologue_reference(*leaves, *scalars)
    wrt = [x for x in leaves[:11] if x is not None]
    ref = iter(torch.autograd.grad((q_r, k_r), wrt, (dq.double(), dk.double())))
    return max(rel(g, next(ref)) for g, x in zip(grads, leaves[:11]) if x is not None)


def _sweep_config(label, hq, hkv, d, k1, k2, b, t, old) -> list[dict]:
    tensors, scalars = make(b, t, hq, hkv, d, torch.bfloat16, k1=k1, k2=k2)
    q, k = ccgqa_prologue_fwd(*tensors, *scalars)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    io = sum(x.numel() * x.element_size() for x in (dq, dk, tensors[0], tensors[1]))
    io += tensors[0].numel() * 2 + tensors[1].numel() * 2
    floor = io / BYTES_PER_S * 1e3
    t_fwd = triton.testing.do_bench_cudagraph(lambda: ccgqa_prologue_fwd(*tensors, *scalars))
    print(f"\n== {label} k{k1}{k2} B{b} T{t}: fwd {t_fwd:.4f} ms, bwd floor {floor:.4f} ms")
    variants = []
    if old is not None:
        variants.append(("old (two kernels)", lambda: old(dq, dk, *tensors, *scalars)))
    for chunk in CHUNKS:
        for warps in WARPS:
            variants.append(
                (f"chunk {chunk} warps {warps}",
                 lambda c=chunk, w=warps: ccgqa_prologue_bwd(
                     dq, dk, *tensors, *scalars, chunk=c, num_warps=w)),
            )  # fmt: skip
    rows = []
    for name, fn in variants:
        try:
            err = _max_err(tensors, scalars, dq, dk, fn())
            ms = triton.testing.do_bench_cudagraph(fn)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit is a result
            print(f"  {name:24s} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        print(f"  {name:24s} {ms:8.4f} ms  {io / ms / 1e6:7.1f} GB/s  max rel err {err:.2e}")
        rows.append(dict(config=label, k1=k1, k2=k2, b=b, t=t, variant=name, bwd_ms=ms,
                         fwd_ms=t_fwd, floor_bwd_ms=floor, gbs=io / ms / 1e6,
                         max_rel_err=err))  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--old", default=None, help="module with the previous ccgqa_prologue_bwd")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args(argv)
    old = importlib.import_module(args.old).ccgqa_prologue_bwd if args.old else None
    b, t = args.tokens // args.seq_len, args.seq_len
    rows = []
    for config in CONFIGS:
        rows += _sweep_config(*config, b, t, old)
        torch.cuda.empty_cache()
    out = Path(args.out) / "sweep_prologue_bwd.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
