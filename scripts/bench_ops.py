"""Benchmark RMSNorm / SwiGLU / RoPE on CUDA: eager, Inductor default, backend="ccgqa", Liger.

Same process, warm (never the compiling call), triton.testing.do_bench medians. Prints a
markdown table and writes JSON to --out. Bytes counted as the minimum traffic (each input
read once, each output written once) so GB/s is comparable to the device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ccgqa_compile  # noqa: E402
from patterns.rope import rotate_half  # noqa: E402


def hf_rms_norm(x, weight, eps=1e-6):
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul(gate, up):
    return torch.nn.functional.silu(gate) * up


def hf_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def liger_providers():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as e:  # noqa: BLE001
        print("liger not available:", e)
        return {}
    return {
        "rmsnorm": lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama"),
        "swiglu": lambda g, u: LigerSiLUMulFunction.apply(g, u),
        "rope": lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin),
    }


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def copy_bandwidth():
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6  # GB/s, read + write


def bench(fn, inputs, grad_out, fwd_only):
    if fwd_only:
        return triton.testing.do_bench(lambda: fn(*inputs), return_mode="median")

    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grad_out)

    return triton.testing.do_bench(step, grad_to_none=inputs, return_mode="median")


def cases(quick):
    m = 4096 if quick else 16384
    yield (
        "rmsnorm",
        f"{m}x4096",
        hf_rms_norm,
        lambda: (
            torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16),
            1 + 0.1 * torch.randn(4096, device="cuda", dtype=torch.bfloat16),
        ),
        (2 * m * 4096 * 2, 5 * m * 4096 * 2),
    )
    yield (
        "swiglu",
        f"{m}x11008",
        silu_mul,
        lambda: (
            torch.randn(m, 11008, device="cuda", dtype=torch.bfloat16),
            torch.randn(m, 11008, device="cuda", dtype=torch.bfloat16),
        ),
        (3 * m * 11008 * 2, 8 * m * 11008 * 2),
    )
    b, t = (1, 4096) if quick else (4, 4096)

    def rope_inputs():
        q = torch.randn(b, t, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(b, t, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        pos = torch.arange(t, device="cuda", dtype=torch.float32)
        inv = 1.0 / (10000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
        emb = torch.outer(pos, inv).repeat(1, 2)[None].expand(b, t, 128)
        return q, k, emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)

    qk = b * t * (32 + 8) * 128 * 2
    yield "rope", f"q({b},32,{t},128)k({b},8,{t},128)", hf_rope, rope_inputs, (2 * qk, 4 * qk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth()
    liger = liger_providers()
    rows = []
    for op, shape, fn, make, (fwd_bytes, total_bytes) in cases(args.quick):
        base = make()
        providers = {
            "eager": fn,
            "inductor": torch.compile(fn),
            "ccgqa": torch.compile(fn, backend="ccgqa"),
        }
        if op in liger:
            providers["liger"] = liger[op]
        ref_in = [
            t.detach().clone().requires_grad_(t.is_floating_point() and i < 2)
            for i, t in enumerate(base)
        ]
        ref_out = fn(*ref_in)
        ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
        grad_out = tuple(torch.randn_like(o) for o in ref_out)
        torch.autograd.backward(ref_out, grad_out)
        for name, f in providers.items():
            for mode in ("fwd", "fwd+bwd"):
                inputs = [
                    t.detach().clone().requires_grad_(mode != "fwd" and i < 2)
                    for i, t in enumerate(base)
                ]
                ccgqa_compile.reset_report()
                with torch.set_grad_enabled(mode != "fwd"):
                    out = f(*inputs)  # warm up / compile
                out = out if isinstance(out, tuple) else (out,)
                fused = ccgqa_compile.report().counts() if name == "ccgqa" else {}
                err = max(rel_err(o, r) for o, r in zip(out, ref_out))
                if mode != "fwd":
                    torch.autograd.backward(out, grad_out)
                    err = max(
                        [err] + [rel_err(i.grad, r.grad) for i, r in zip(inputs[:2], ref_in[:2])]
                    )
                with torch.set_grad_enabled(mode != "fwd"):
                    ms = bench(f, inputs, grad_out, mode == "fwd")
                nbytes = fwd_bytes if mode == "fwd" else total_bytes
                rows.append(
                    dict(
                        op=op,
                        shape=shape,
                        provider=name,
                        mode=mode,
                        ms=ms,
                        gbs=nbytes / ms / 1e6,
                        rel_err=err,
                        fused=fused,
                    )
                )
                print(
                    f"{op:8s} {shape:28s} {name:9s} {mode:8s} {ms:8.4f} ms {nbytes / ms / 1e6:7.0f} GB/s err={err:.1e} {fused}",
                    flush=True,
                )
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        copy_gbs=copy_gbs,
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ops_h100.json"), "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"\ndevice copy bandwidth {copy_gbs:.0f} GB/s ({meta['device']}, torch {meta['torch']})")
    print(
        "| op | shape | mode | eager ms | inductor ms | ccgqa ms | liger ms | ccgqa GB/s | ccgqa/best(eager,inductor) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted(
        {(r["op"], r["shape"], r["mode"]) for r in rows},
        key=lambda k: [r for r in rows].index(
            next(r for r in rows if (r["op"], r["shape"], r["mode"]) == k)
        ),
    )
    for op, shape, mode in keys:
        get = {
            r["provider"]: r for r in rows if (r["op"], r["shape"], r["mode"]) == (op, shape, mode)
        }
        best = min(get["eager"]["ms"], get["inductor"]["ms"])
        lig = f"{get['liger']['ms']:.4f}" if "liger" in get else "-"
        print(
            f"| {op} | {shape} | {mode} | {get['eager']['ms']:.4f} | {get['inductor']['ms']:.4f} | {get['ccgqa']['ms']:.4f} | {lig} | {get['ccgqa']['gbs']:.0f} | {best / get['ccgqa']['ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
