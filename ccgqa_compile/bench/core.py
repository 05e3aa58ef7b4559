"""``python -m ccgqa_compile.bench core``: the Triton causal GQA attention core against
PyTorch SDPA's backends (CUDA only).

For B=2, T=8192, bf16 and each (Hq, Hkv, D) in ``CONFIGS``: checks our forward output and
gradients against float32 SDPA once, then times (``triton.testing.do_bench``, median,
warm, the GPU warmed up first) the forward and forward+backward of
  * ours (``gqa_attention_fwd`` / ``gqa_attention_bwd``, called directly),
  * ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` under
    the default backend choice, under FLASH_ATTENTION and under CUDNN_ATTENTION. A backend
    that rejects enable_gqa gets K/V expanded with repeat_interleave outside the timed
    region (noted "expanded": its backward then stops at the expanded K/V, a little less
    work than ours).
Prints markdown tables, writes bench_gqa_attention.json to --out and appends its rows to
the device's results file (op ``attention-core``; the ratio is against the fastest SDPA
backend). FLOPs as FlashAttention counts them: causal forward = 4 * B * Hq * T^2 * D / 2,
backward = 2.5 x forward. ``--profile``: a kernel breakdown of ours and cuDNN instead.
The launch tables this core uses are tuned by ``scripts/sweep_gqa_attention.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from . import results
from .common import cuda_kernel_breakdown, print_kernels, rel_err, warm_up_gpu

BATCH = 2
SEQ_LEN = 8192
CONFIGS = [(16, 4, 16), (16, 4, 32), (16, 4, 64), (16, 4, 128), (8, 2, 128)]
DTYPE = torch.bfloat16
WARMUP_MS = 25
REP_MS = 100
OURS = "ccgqa kernels"
HELP = "attention core (our kernels) vs SDPA default / flash / cuDNN (CUDA)"

Tensor = torch.Tensor


def kernels():
    """The attention kernel module (imported when used: it needs Triton)."""
    from ccgqa_compile.kernels import gqa_attention

    return gqa_attention


def forward_flops(batch: int, num_q_heads: int, seq_len: int, head_dim: int) -> float:
    return 2 * 2 * batch * num_q_heads * seq_len * seq_len * head_dim / 2


def bench_ms(fn: Callable[[], object], warmup: int = WARMUP_MS, rep: int = REP_MS) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def make_inputs(num_q_heads: int, num_kv_heads: int, head_dim: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, device="cuda", dtype=DTYPE, generator=generator)

    q = randn(BATCH, num_q_heads, SEQ_LEN, head_dim)
    k = randn(BATCH, num_kv_heads, SEQ_LEN, head_dim)
    v = randn(BATCH, num_kv_heads, SEQ_LEN, head_dim)
    do = randn(BATCH, num_q_heads, SEQ_LEN, head_dim)
    return q, k, v, do


def check_correctness(q: Tensor, k: Tensor, v: Tensor, do: Tensor, scale: float) -> dict:
    """Our bf16 outputs vs float32 SDPA (efficient/math backends) on the same inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attention = kernels()
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(
            q32, k32, v32, is_causal=True, enable_gqa=True, scale=scale
        )
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    out, lse = attention.gqa_attention_fwd(q, k, v, scale)
    grads = attention.gqa_attention_bwd(do, q, k, v, out, lse, scale)
    errors = {"o": rel_err(out, ref)}
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        errors[name] = rel_err(grad, ref_grad)
    del q32, k32, v32, ref, ref_grads
    torch.cuda.empty_cache()
    return errors


def sdpa_callables(q: Tensor, k: Tensor, v: Tensor, do: Tensor, backend):
    """(fwd, fwd+bwd, note) for SDPA under ``backend`` (None: PyTorch's default choice)."""
    from torch.nn.attention import sdpa_kernel

    def context():
        return sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()

    gqa_kwargs = {"enable_gqa": True}
    note = ""
    try:
        with context():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    except RuntimeError:
        group_size = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group_size, dim=1)
        v = v.repeat_interleave(group_size, dim=1)
        gqa_kwargs = {}
        note = "expanded"
    q_leaf, k_leaf, v_leaf = (t.detach().requires_grad_() for t in (q, k, v))

    def forward():
        with context():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa_kwargs)

    def forward_backward():
        with context():
            out = F.scaled_dot_product_attention(
                q_leaf, k_leaf, v_leaf, is_causal=True, **gqa_kwargs
            )
        return torch.autograd.grad(out, (q_leaf, k_leaf, v_leaf), do)

    forward_backward()  # fail here, outside timing, if the backward is unsupported
    return forward, forward_backward, note


def sdpa_backends() -> tuple:
    from torch.nn.attention import SDPBackend

    return (
        ("sdpa default", None),
        ("sdpa flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
    )


def benchmark_config(num_q_heads: int, num_kv_heads: int, head_dim: int) -> list[dict]:
    attention = kernels()
    q, k, v, do = make_inputs(num_q_heads, num_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    errors = check_correctness(q, k, v, do, scale)
    print(
        f"Hq={num_q_heads} Hkv={num_kv_heads} D={head_dim}: rel err vs fp32 SDPA "
        + " ".join(f"{name}={value:.2e}" for name, value in errors.items()),
        flush=True,
    )
    fwd_flops = forward_flops(BATCH, num_q_heads, SEQ_LEN, head_dim)
    total_flops = fwd_flops * 3.5  # forward + backward (2.5x)

    def ours_forward():
        return attention.gqa_attention_fwd(q, k, v, scale)

    def ours_forward_backward():
        out, lse = attention.gqa_attention_fwd(q, k, v, scale)
        return attention.gqa_attention_bwd(do, q, k, v, out, lse, scale)

    providers = {OURS: (ours_forward, ours_forward_backward, "")}
    for label, backend in sdpa_backends():
        try:
            providers[label] = sdpa_callables(q, k, v, do, backend)
        except RuntimeError as error:
            print(f"  {label}: unavailable ({str(error).splitlines()[0][:100]})")
    rows = []
    for label, (forward, forward_backward, note) in providers.items():
        fwd_ms = bench_ms(forward)
        fwd_bwd_ms = bench_ms(forward_backward)
        row = {
            "num_q_heads": num_q_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "batch": BATCH,
            "seq_len": SEQ_LEN,
            "provider": label,
            "note": note,
            "fwd_ms": fwd_ms,
            "fwd_tflops": fwd_flops / fwd_ms * 1e-9,
            "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_bwd_tflops": total_flops / fwd_bwd_ms * 1e-9,
            "rel_err": errors if label == OURS else None,
        }
        rows.append(row)
        print(
            f"  {label:14s} fwd {fwd_ms:7.3f} ms {row['fwd_tflops']:6.1f} TFLOP/s | "
            f"fwd+bwd {fwd_bwd_ms:7.3f} ms {row['fwd_bwd_tflops']:6.1f} TFLOP/s {note}",
            flush=True,
        )
    return rows


def case_label(row: dict) -> str:
    return (
        f"B{row['batch']} Hq{row['num_q_heads']} Hkv{row['num_kv_heads']} d{row['head_dim']} "
        f"T{row['seq_len']}"
    )


def result_rows(rows: list[dict], **common) -> list[dict]:
    """The benchmark's rows as results rows: ours against the fastest SDPA backend."""
    out = [
        {
            **common, "op": "attention-core", "case": case_label(r), "provider": r["provider"],
            "fwd_ms": r["fwd_ms"], "fwd_bwd_ms": r["fwd_bwd_ms"],
            "rate": results.rate(tflops=r["fwd_bwd_tflops"]), "note": r["note"] or None,
        }
        for r in rows
    ]  # fmt: skip
    for row in out:
        if row["provider"] == OURS:
            sdpa = [p for p in out if p["case"] == row["case"] and p["provider"] != OURS]
            if sdpa:
                results.set_ratio(row, min(sdpa, key=lambda p: p["fwd_bwd_ms"]))
    return out


def print_tables(rows: list[dict]) -> None:
    print()
    print(f"B={BATCH} T={SEQ_LEN} {DTYPE}, causal; {torch.cuda.get_device_name()}")
    print()
    print("| Hq | Hkv | D | provider | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        provider = row["provider"] + (f" ({row['note']})" if row["note"] else "")
        print(
            f"| {row['num_q_heads']} | {row['num_kv_heads']} | {row['head_dim']} | {provider} | "
            f"{row['fwd_ms']:.3f} | {row['fwd_tflops']:.1f} | {row['fwd_bwd_ms']:.3f} | "
            f"{row['fwd_bwd_tflops']:.1f} |"
        )
    print()
    print("Speed-up of ours over SDPA (time ratio, >1 means ours is faster):")
    print()
    print("| Hq | Hkv | D | vs default fwd | vs default fwd+bwd | vs best fwd | vs best fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row["provider"] != OURS:
            continue
        same_shape = [
            other
            for other in rows
            if other["provider"] != OURS and case_label(other) == case_label(row)
        ]
        default = [other for other in same_shape if other["provider"] == "sdpa default"]
        if not default:
            continue
        best_fwd = min(other["fwd_ms"] for other in same_shape)
        best_fwd_bwd = min(other["fwd_bwd_ms"] for other in same_shape)
        print(
            f"| {row['num_q_heads']} | {row['num_kv_heads']} | {row['head_dim']} | "
            f"{default[0]['fwd_ms'] / row['fwd_ms']:.2f}x | "
            f"{default[0]['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}x | "
            f"{best_fwd / row['fwd_ms']:.2f}x | {best_fwd_bwd / row['fwd_bwd_ms']:.2f}x |"
        )


def write_json(path: Path, payload: dict) -> None:
    import triton

    payload = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(DTYPE),
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def benchmark(
    out_dir: Path, target: Path | None = None, head_dims=(16, 32, 64, 128), source: str = ""
) -> list[dict]:
    """Every config of ``CONFIGS`` with a head dim in ``head_dims``: printed, written to
    ``out_dir``/bench_gqa_attention.json and appended to the results at ``target``."""
    started, commit = results.now(), results.current_commit()
    rows = []
    for num_q_heads, num_kv_heads, head_dim in CONFIGS:
        if head_dim in head_dims:
            rows += benchmark_config(num_q_heads, num_kv_heads, head_dim)
            torch.cuda.empty_cache()
    print_tables(rows)
    write_json(out_dir / "bench_gqa_attention.json", {"rows": rows})
    device = torch.cuda.get_device_name()
    common = {"date": started, "commit": commit, "device": device, "dtype": "bfloat16",
              "source": source or "python -m ccgqa_compile.bench core"}  # fmt: skip
    results.record(target, device, result_rows(rows, **common))
    return rows


def profile_head_dim(num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Kernel breakdown of one fwd+bwd of ours and of SDPA cuDNN, and both timed as a
    CUDA graph (no launch overhead) beside the plain do_bench median."""
    import triton
    from torch.nn.attention import SDPBackend

    attention = kernels()
    q, k, v, do = make_inputs(num_q_heads, num_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)

    def ours():
        out, lse = attention.gqa_attention_fwd(q, k, v, scale)
        return attention.gqa_attention_bwd(do, q, k, v, out, lse, scale)

    cudnn = sdpa_callables(q, k, v, do, SDPBackend.CUDNN_ATTENTION)[1]
    for label, step in ((OURS, ours), ("sdpa cudnn", cudnn)):
        events, total = cuda_kernel_breakdown(step, steps=5)
        plain = bench_ms(step)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            graphed = triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median")
        print(
            f"== D={head_dim} Hq={num_q_heads} Hkv={num_kv_heads} {label}: "
            f"{total:.3f} ms of kernels per step, do_bench {plain:.3f} ms, "
            f"CUDA graph {graphed:.3f} ms",
            flush=True,
        )
        print_kernels(events, 5, 8)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=Path("."), help="directory for the JSON")
    ap.add_argument("--head-dims", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument(
        "--profile", action="store_true", help="kernel breakdown of ours and cuDNN, fwd+bwd"
    )
    results.add_results_argument(ap)


def run(args: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("the attention core benchmark needs a CUDA GPU")
    warm_up_gpu()
    if args.profile:
        for num_q_heads, num_kv_heads, head_dim in CONFIGS:
            if head_dim in args.head_dims:
                profile_head_dim(num_q_heads, num_kv_heads, head_dim)
        return []
    target = results.results_target(args, "cuda")
    return benchmark(args.out, target, tuple(args.head_dims), getattr(args, "source", ""))
