"""The CCGQA q/k prologue: our Triton kernels vs the reference under Inductor (CUDA only).

    python scripts/bench_prologue.py [--out DIR]

For each config (the block benchmark's two, B*T = 32768): checks the kernels' q, k and
every gradient against the float64 reference, then times (triton.testing.do_bench,
median, warm) the forward and forward+backward of
  * ours: ccgqa_prologue_fwd, then ccgqa_prologue_bwd;
  * the reference (two causal convs per stream, qk-mean, L2 norm, temperature, RoPE)
    compiled by Inductor default, backward through autograd.
The floor counts q_pre, k_pre read once and q, k written once (forward), and the
backward's dq, dk read plus d q_pre, d k_pre written once, at ~3 TB/s.
Prints a markdown table and writes bench_prologue.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccgqa_compile.bench import warm_up_gpu  # noqa: E402
from ccgqa_compile.kernels.ccgqa_prologue import (  # noqa: E402
    ccgqa_prologue_bwd,
    ccgqa_prologue_fwd,
    ccgqa_prologue_reference,
)

TOKENS = 32768
SEQ_LEN = 2048
# (E, hq, hkv, C) as in the block benchmark; d = E / C / hq
CONFIGS = [(2048, 16, 4, 4), (512, 8, 2, 4)]
COPY_BYTES_PER_S = 3.0e12
DEVICE = "cuda"


def make(b, t, hq, hkv, d, dtype, k1=2, k2=2):
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)

    e_q, e_kv = hq * d, hkv * d
    freqs = torch.arange(t, device=DEVICE)[:, None] / 10000 ** (
        torch.arange(0, d, 2, device=DEVICE) / d
    )
    angles = torch.cat((freqs, freqs), -1)
    tensors = [
        r(b, t, e_q), r(b, t, e_kv),
        r(e_q, 1, k1, scale=0.5), r(e_q, scale=0.1), r(e_q, d, k2, scale=1 / math.sqrt(d)),
        r(e_q, scale=0.1),
        r(e_kv, 1, k1, scale=0.5), r(e_kv, scale=0.1), r(e_kv, d, k2, scale=1 / math.sqrt(d)),
        r(e_kv, scale=0.1),
        r(hkv, scale=0.1), angles.cos().to(dtype), angles.sin().to(dtype),
    ]  # fmt: skip
    scalars = [hq, hkv, True, "exp", math.sqrt(d), 1e-12, d, False]
    return tensors, scalars


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def max_rel_err_vs_fp64(tensors, scalars, q, k, dq, dk, grads) -> float:
    """The kernels' worst relative error (q, k and every gradient) against the float64
    reference on the same inputs (``make``'s: every weight and bias present)."""
    grad_mask = [True] * 11 + [False, False]
    leaves = [x.detach().double().requires_grad_(m) for x, m in zip(tensors, grad_mask)]
    q_r, k_r = ccgqa_prologue_reference(*leaves, *scalars)
    ref_grads = torch.autograd.grad((q_r, k_r), leaves[:11], (dq.double(), dk.double()))
    return max([rel(q, q_r), rel(k, k_r)] + [rel(g, r) for g, r in zip(grads, ref_grads)])


def _profile(title: str, fn, steps: int = 5) -> None:
    """Print the CUDA kernels of ``fn`` by total time per step, and the GPU-busy total
    beside the wall time: a wall time far above the kernel total means launch overhead."""
    from profile_ops import cuda_kernel_breakdown, print_kernels  # scripts/profile_ops.py

    events, busy = cuda_kernel_breakdown(fn, steps)
    wall = triton.testing.do_bench(fn, return_mode="median")
    print(f"\n== {title}: kernels {busy:.3f} ms/step, do_bench {wall:.3f} ms")
    print_kernels(events, steps, 10)


def _bench_config(
    e, hq, hkv, c, dtype, tokens, seq_len, check_only=False, profile=False
) -> list[dict]:
    rows = []
    d = e // c // hq
    b = tokens // seq_len
    tensors, scalars = make(b, seq_len, hq, hkv, d, dtype)
    label = f"E{e} hq{hq} hkv{hkv} d{d} B{b} T{seq_len}"
    grad_mask = [True] * 11 + [False, False]
    # correctness: kernels vs float64 reference
    q, k = ccgqa_prologue_fwd(*tensors, *scalars)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    grads = ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)
    err = max_rel_err_vs_fp64(tensors, scalars, q, k, dq, dk, grads)
    if check_only:
        return [{"case": label, "kernel_rel_err_vs_fp64": err}]

    compiled = torch.compile(ccgqa_prologue_reference)

    def ours_fwd():
        return ccgqa_prologue_fwd(*tensors, *scalars)

    def ours_train():
        q, k = ccgqa_prologue_fwd(*tensors, *scalars)
        return ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)

    train_in = [x.detach().requires_grad_(m) for x, m in zip(tensors, grad_mask)]

    def inductor_fwd():
        with torch.no_grad():
            return compiled(*tensors, *scalars)

    def inductor_train():
        q, k = compiled(*train_in, *scalars)
        return torch.autograd.grad((q, k), train_in[:11], (dq, dk))

    for fn in (inductor_fwd, inductor_train):
        fn()  # compile outside the timing
    if profile:
        for name, fn in (("ccgqa kernels", ours_train), ("inductor", inductor_train)):
            _profile(f"{label} [{name}] fwd+bwd", fn)
    io = (tensors[0].numel() + tensors[1].numel()) * tensors[0].element_size() * 2
    for name, fwd, train in (
        ("ccgqa kernels", ours_fwd, ours_train),
        ("inductor", inductor_fwd, inductor_train),
    ):
        t_fwd = triton.testing.do_bench(fwd, return_mode="median")
        t_tot = triton.testing.do_bench(train, return_mode="median")
        rows.append(
            {
                "case": label,
                "provider": name,
                "fwd_ms": t_fwd,
                "total_ms": t_tot,
                "fwd_gbs": io / t_fwd / 1e6,
                "total_gbs": 2 * io / t_tot / 1e6,
                "floor_fwd_ms": io / COPY_BYTES_PER_S * 1e3,
                "floor_total_ms": 2 * io / COPY_BYTES_PER_S * 1e3,
                "kernel_rel_err_vs_fp64": err,
            }
        )
    torch._dynamo.reset()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--check-only", action="store_true", help="CPU dry run: fp32, tiny")
    ap.add_argument("--profile", action="store_true", help="also print a kernel breakdown")
    args = ap.parse_args(argv)
    global DEVICE
    if args.check_only:
        DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
        for config in CONFIGS:
            print(_bench_config(*config, torch.float32, 64, 32, check_only=True))
        return
    warm_up_gpu()
    dtype = torch.bfloat16
    rows = []
    for config in CONFIGS:
        rows.extend(_bench_config(*config, dtype, TOKENS, SEQ_LEN, profile=args.profile))
    print(
        "| case | provider | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | floor fwd / total ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['provider']} | {r['fwd_ms']:.3f} | {r['total_ms']:.3f} | "
            f"{r['fwd_gbs']:.0f} | {r['total_gbs']:.0f} | "
            f"{r['floor_fwd_ms']:.3f} / {r['floor_total_ms']:.3f} |"
        )
    print(
        "kernel rel err vs fp64 (max over q, k, grads):",
        [r["kernel_rel_err_vs_fp64"] for r in rows[::2]],
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "bench_prologue.json", "w") as fh:
        json.dump(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
            fh,
            indent=1,
        )


if __name__ == "__main__":
    main()
