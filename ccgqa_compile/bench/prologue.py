"""``python -m ccgqa_compile.bench prologue``: the CCGQA q/k prologue (two causal convs per
stream, qk-mean, L2 norm, temperature, RoPE), our Triton kernels against the same function
compiled by Inductor default (CUDA; ``--check-only`` runs on CPU).

For each config (the block benchmark's two, B*T = 32768, T = 2048, conv kernels 2/2):
checks the kernels' q, k and every gradient against the float64 reference, then times the
forward and forward+backward of
  * ours: ``ccgqa_prologue_fwd``, then ``ccgqa_prologue_bwd``;
  * the reference compiled by Inductor default, backward through autograd;
as CUDA-graph replays (the GPU work, as a compiled model runs it; events where a step cannot
be captured, noted). The floor counts q_pre, k_pre read once and q, k written once
(forward), and the backward's dq, dk read plus d q_pre, d k_pre written once, at ~3 TB/s.
Prints a markdown table, writes bench_prologue.json to --out and appends its rows to the
device's results file (op ``prologue-kernels``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from . import results
from .common import cuda_kernel_breakdown, print_kernels, rel_err, timer, warm_up_gpu

TOKENS = 32768
SEQ_LEN = 2048
# (E, hq, hkv, C) as in the block benchmark; d = E / C / hq
CONFIGS = [(2048, 16, 4, 4), (512, 8, 2, 4)]
COPY_BYTES_PER_S = 3.0e12
GRAD_MASK = [True] * 11 + [False, False]  # every tensor input but the RoPE tables
HELP = "the CCGQA prologue: our kernels vs Inductor's compile of the same function (CUDA)"


def kernels():
    """The prologue kernel module (imported when used: it needs Triton)."""
    from ccgqa_compile.kernels import ccgqa_prologue

    return ccgqa_prologue


def make_inputs(b, t, hq, hkv, d, dtype, k1=2, k2=2, device="cuda"):
    """The prologue op's tensor and scalar arguments, every weight and bias present."""
    gen = torch.Generator(device=device).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    e_q, e_kv = hq * d, hkv * d
    freqs = torch.arange(t, device=device)[:, None] / 10000 ** (
        torch.arange(0, d, 2, device=device) / d
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


def max_rel_err_vs_fp64(tensors, scalars, q, k, dq, dk, grads) -> float:
    """The kernels' worst relative error (q, k and every gradient) against the float64
    reference on the same inputs (``make_inputs``'s)."""
    leaves = [x.detach().double().requires_grad_(m) for x, m in zip(tensors, GRAD_MASK)]
    q_r, k_r = kernels().ccgqa_prologue_reference(*leaves, *scalars)
    ref_grads = torch.autograd.grad((q_r, k_r), leaves[:11], (dq.double(), dk.double()))
    return max(
        [rel_err(q, q_r), rel_err(k, k_r)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    )


def _bench_config(e, hq, hkv, c, dtype, tokens, seq_len, device, check_only=False, profile=False):
    ops = kernels()
    d = e // c // hq
    b = tokens // seq_len
    tensors, scalars = make_inputs(b, seq_len, hq, hkv, d, dtype, device=device)
    label = f"E{e} hq{hq} hkv{hkv} d{d} B{b} T{seq_len}"
    # correctness: kernels vs float64 reference
    q, k = ops.ccgqa_prologue_fwd(*tensors, *scalars)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    grads = ops.ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)
    err = max_rel_err_vs_fp64(tensors, scalars, q, k, dq, dk, grads)
    if check_only:
        return [{"case": label, "kernel_rel_err_vs_fp64": err}]

    compiled = torch.compile(ops.ccgqa_prologue_reference)

    def ours_fwd():
        return ops.ccgqa_prologue_fwd(*tensors, *scalars)

    def ours_train():
        ops.ccgqa_prologue_fwd(*tensors, *scalars)
        return ops.ccgqa_prologue_bwd(dq, dk, *tensors, *scalars)

    train_in = [x.detach().requires_grad_(m) for x, m in zip(tensors, GRAD_MASK)]

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
            events, busy = cuda_kernel_breakdown(fn)
            print(f"\n== {label} [{name}] fwd+bwd: kernels {busy:.3f} ms/step")
            print_kernels(events, 5, 10)
    io = (tensors[0].numel() + tensors[1].numel()) * tensors[0].element_size() * 2
    rows = []
    for name, fwd, train in (
        ("ccgqa kernels", ours_fwd, ours_train),
        ("inductor", inductor_fwd, inductor_train),
    ):
        t_fwd, how_fwd = timer(device, fwd)
        t_tot, how_tot = timer(device, train)
        rows.append(
            {
                "case": label,
                "provider": name,
                "fwd_ms": t_fwd,
                "total_ms": t_tot,
                "timers": sorted({how_fwd, how_tot}),
                "fwd_gbs": io / t_fwd / 1e6,
                "total_gbs": 2 * io / t_tot / 1e6,
                "floor_fwd_ms": io / COPY_BYTES_PER_S * 1e3,
                "floor_total_ms": 2 * io / COPY_BYTES_PER_S * 1e3,
                "kernel_rel_err_vs_fp64": err,
            }
        )
    torch._dynamo.reset()
    return rows


def result_rows(rows: list[dict], **common) -> list[dict]:
    out = []
    for r in rows:
        note = f"floor {r['floor_fwd_ms']:.3f} / {r['floor_total_ms']:.3f} ms"
        if r["timers"] != ["cuda-graph"]:
            note += f"; timed by {', '.join(r['timers'])}"
        out.append({
            **common, "op": "prologue-kernels", "case": r["case"], "provider": r["provider"],
            "fwd_ms": r["fwd_ms"], "fwd_bwd_ms": r["total_ms"],
            "rate": results.rate(r["total_gbs"]), "note": note,
        })  # fmt: skip
    for row in out:
        base = [p for p in out if p["case"] == row["case"] and p["provider"] == "inductor"]
        if row["provider"] != "inductor" and base:
            results.set_ratio(row, base[0])
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default=".", help="directory for bench_prologue.json")
    ap.add_argument("--check-only", action="store_true", help="correctness only: fp32, tiny")
    ap.add_argument("--profile", action="store_true", help="also print a kernel breakdown")
    results.add_results_argument(ap)


def run(args: argparse.Namespace) -> list[dict]:
    if args.check_only:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("prologue --check-only on a CPU runs the kernels in Triton's "
                             "interpreter: set TRITON_INTERPRET=1")  # fmt: skip
        rows = []
        for config in CONFIGS:
            rows += _bench_config(*config, torch.float32, 64, 32, device, check_only=True)
            print(rows[-1])
        return rows
    if not torch.cuda.is_available():
        raise SystemExit("the prologue benchmark needs a CUDA GPU (or --check-only)")
    started, commit = results.now(), results.current_commit()
    warm_up_gpu()
    rows = []
    for config in CONFIGS:
        rows.extend(
            _bench_config(*config, torch.bfloat16, TOKENS, SEQ_LEN, "cuda", profile=args.profile)
        )
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
    device = torch.cuda.get_device_name()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "bench_prologue.json", "w") as fh:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, fh, indent=1)
    common = {"date": started, "commit": commit, "device": device, "dtype": "bfloat16",
              "source": getattr(args, "source", "python -m ccgqa_compile.bench prologue")}  # fmt: skip
    results.record(results.results_target(args, "cuda"), device, result_rows(rows, **common))
    return rows
