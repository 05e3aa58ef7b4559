"""``python -m ccgqa_compile.bench``: eager vs Inductor vs backend="ccgqa" (vs SDPA, Liger).

Same process, warm (the compiling call is never timed), medians. On CUDA it times with
``triton.testing.do_bench`` and records peak memory; on CPU it uses a wall clock over small
sizes so a new user sees it work without a GPU. Writes JSON (and PNG charts with --plot)
to --save. Bytes are the minimum traffic (each input read once, each output written once);
attention reports causal TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import ccgqa_compile

OPS = ("rmsnorm", "swiglu", "rope", "attention")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- the plain PyTorch each provider compiles (what users write) ----
def hf_rms_norm(x, weight):
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * h.to(dtype)


def silu_mul(gate, up):
    return F.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def handwritten_gqa(q, k, v):
    b, h_kv, t, d = k.shape
    groups = q.shape[1] // h_kv
    k = k[:, :, None].expand(b, h_kv, groups, t, d).reshape(b, h_kv * groups, t, d)
    v = v[:, :, None].expand(b, h_kv, groups, t, d).reshape(b, h_kv * groups, t, d)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@dataclass
class Case:
    op: str
    label: str
    fn: Callable
    make: Callable[[], tuple]
    n_grad: int  # leading inputs that receive gradients
    fwd_bytes: float = 0.0
    total_bytes: float = 0.0
    fwd_flops: float = 0.0
    extra: dict = field(default_factory=dict)


def _cases(op: str, device: str, dtype: torch.dtype, quick: bool, seq_lens: list[int]):
    big = device == "cuda" and not quick
    es = dtype.itemsize
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    if op == "rmsnorm":
        m, n = (16384, 4096) if big else (512, 1024)
        yield Case(
            op,
            f"{m}x{n}",
            hf_rms_norm,
            lambda: (rnd(m, n), 1 + 0.1 * rnd(n)),
            2,
            2 * m * n * es,
            5 * m * n * es,
        )
    elif op == "swiglu":
        m, n = (16384, 11008) if big else (512, 1376)
        yield Case(
            op,
            f"{m}x{n}",
            silu_mul,
            lambda: (rnd(m, n), rnd(m, n)),
            2,
            3 * m * n * es,
            8 * m * n * es,
        )
    elif op == "rope":
        b, t, hq, hk, d = (4, 4096, 32, 8, 128) if big else (1, 256, 8, 2, 64)

        def make():
            q = rnd(b, t, hq, d).transpose(1, 2)
            k = rnd(b, t, hk, d).transpose(1, 2)
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
            emb = torch.outer(torch.arange(t, device=device).float(), inv).repeat(1, 2)
            emb = emb[None].expand(b, t, d)
            return q, k, emb.cos().to(dtype), emb.sin().to(dtype)

        qk = b * t * (hq + hk) * d * es
        yield Case(op, f"q({b},{hq},{t},{d}) k({b},{hk},{t},{d})", hf_rope, make, 2, 2 * qk, 4 * qk)
    elif op == "attention":
        b, hq, hk, d = (2, 16, 4, 32) if big else (1, 4, 2, 32)
        for t in seq_lens or ([2048, 8192] if big else [128, 256]):
            make = lambda t=t: (rnd(b, hq, t, d), rnd(b, hk, t, d), rnd(b, hk, t, d))  # noqa: E731
            flops = 4 * b * hq * t * t * d / 2  # causal
            yield Case(
                op,
                f"B{b} Hq{hq} Hkv{hk} d{d} T{t}",
                handwritten_gqa,
                make,
                3,
                fwd_flops=flops,
                extra={"seq_len": t},
            )


def _providers(case: Case) -> dict[str, Callable]:
    out = {
        "eager": case.fn,
        "inductor": torch.compile(case.fn),
        "ccgqa": torch.compile(case.fn, backend="ccgqa"),
    }
    if case.op == "attention":
        out["sdpa"] = sdpa_gqa
    try:  # Liger-Kernel, when installed
        if case.op == "rmsnorm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            out["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama")
        elif case.op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            out["liger"] = LigerSiLUMulFunction.apply
        elif case.op == "rope":
            from liger_kernel.ops.rope import LigerRopeFunction

            out["liger"] = LigerRopeFunction.apply
    except ImportError:
        pass
    return out


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _timer(device: str, fn: Callable, reset: list[torch.Tensor]) -> float:
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, grad_to_none=reset, return_mode="median")
    times = []
    for _ in range(7):
        for t in reset:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_case(case: Case, device: str) -> list[dict]:
    base = case.make()
    rows = []
    ref_in = [t.detach().double().requires_grad_(i < case.n_grad) for i, t in enumerate(base)]
    ref_out = _as_tuple(case.fn(*ref_in))
    grads = tuple(torch.randn_like(o).to(base[0].dtype) for o in ref_out)
    torch.autograd.backward(ref_out, tuple(g.double() for g in grads))
    for name, fn in _providers(case).items():
        row = {"op": case.op, "case": case.label, "provider": name, **case.extra}
        for mode in ("fwd", "fwd+bwd"):
            train = mode == "fwd+bwd"
            inputs = [
                t.detach().clone().requires_grad_(train and i < case.n_grad)
                for i, t in enumerate(base)
            ]
            ccgqa_compile.reset_report()
            with torch.set_grad_enabled(train):
                out = _as_tuple(fn(*inputs))  # warm-up: compiles, never timed
                if train:
                    torch.autograd.backward(out, grads)
            if name == "ccgqa":
                row[f"fused_{mode}"] = ccgqa_compile.report().counts()
            err = max(_rel(o, r) for o, r in zip(out, ref_out))
            if train:
                err = max(
                    [err]
                    + [_rel(i.grad, r.grad) for i, r in zip(inputs, ref_in) if r.grad is not None]
                )

            def step(fn=fn, inputs=inputs, train=train):
                with torch.set_grad_enabled(train):
                    o = _as_tuple(fn(*inputs))
                    if train:
                        torch.autograd.backward(o, grads)

            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
            ms = _timer(device, step, inputs[: case.n_grad] if train else [])
            key = "fwd" if not train else "total"
            row[f"{key}_ms"] = ms
            row[f"{key}_rel_err_vs_fp64"] = err
            if device == "cuda":
                row[f"{key}_peak_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        row["bwd_ms"] = row["total_ms"] - row["fwd_ms"]
        if case.fwd_bytes:
            row["fwd_gbs"] = case.fwd_bytes / row["fwd_ms"] / 1e6
            row["total_gbs"] = case.total_bytes / row["total_ms"] / 1e6
        if case.fwd_flops:
            row["fwd_tflops"] = case.fwd_flops / row["fwd_ms"] / 1e9
            row["total_tflops"] = 3.5 * case.fwd_flops / row["total_ms"] / 1e9
        rows.append(row)
    return rows


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def table(rows: list[dict]) -> str:
    lines = [
        "| op | case | provider | fwd ms | fwd+bwd ms | rate | vs best(eager, inductor) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peers = [
            p for p in rows if p["case"] == r["case"] and p["provider"] in ("eager", "inductor")
        ]
        best = min(p["total_ms"] for p in peers)
        rate = (
            f"{r['total_gbs']:.0f} GB/s"
            if "total_gbs" in r
            else f"{r.get('total_tflops', 0):.1f} TFLOP/s"
        )
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {r['fwd_ms']:.4f} | "
            f"{r['total_ms']:.4f} | {rate} | {best / r['total_ms']:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in sorted({r["op"] for r in rows}):
        sub = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(r["case"] for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            fwd = [
                next(r["fwd_ms"] for r in sub if r["case"] == c and r["provider"] == p)
                for c in cases
            ]
            bwd = [
                next(r["bwd_ms"] for r in sub if r["case"] == c and r["provider"] == p)
                for c in cases
            ]
            xs = [j + i * width for j in range(len(cases))]
            ax.bar(xs, fwd, width, label=f"{p} fwd")
            ax.bar(xs, bwd, width, bottom=fwd, alpha=0.5, label=f"{p} bwd")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=7)
        ax.set_ylabel("ms (fwd + bwd stacked)")
        ax.set_title(op)
        ax.legend(fontsize=6, ncol=2)
        path = os.path.join(out_dir, f"bench_{op}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m ccgqa_compile.bench", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--ops", default="rmsnorm,swiglu,rope,attention")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--seq-lens", default="", help="attention sequence lengths, e.g. 2048,8192")
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--save", default="bench-results")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(ops) - set(OPS)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {list(OPS)}")
    if args.device not in ("cpu", "cuda"):
        ap.error(f"unknown device {args.device!r}: use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA GPU")
    try:
        args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    except ValueError:
        ap.error("--seq-lens takes comma-separated integers")
    args.ops = ops
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    cases = [
        c for op in args.ops for c in _cases(op, args.device, args.dtype, args.quick, args.seq_lens)
    ]
    try:
        from tqdm import tqdm

        progress = tqdm(cases, desc="bench", unit="case")
    except ImportError:
        progress = cases
    rows = []
    for case in progress:
        rows.extend(run_case(case, args.device))
    os.makedirs(args.save, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(args.dtype),
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(os.path.join(args.save, "bench.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    if args.plot:
        plot(rows, args.save)
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['dtype']}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
