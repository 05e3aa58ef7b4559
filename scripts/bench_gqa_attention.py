"""Benchmark the Triton causal GQA flash attention against PyTorch SDPA (CUDA only).

    python scripts/bench_gqa_attention.py [--out DIR] [--sweep]

For B=2, T=8192, bf16 and each (Hq, Hkv, D) in CONFIGS: checks our forward output and
gradients against float32 SDPA once, then times (triton.testing.do_bench, median,
warm) the forward and forward+backward of
  * ours (gqa_attention_fwd / gqa_attention_bwd),
  * F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) under
    the default backend choice, under SDPBackend.FLASH_ATTENTION and under
    SDPBackend.CUDNN_ATTENTION.  A backend that rejects enable_gqa gets K/V expanded
    with repeat_interleave outside the timed region (marked "expanded"; its backward
    then stops at the expanded K/V, so it does a little less work than ours).
Prints a markdown table and writes bench_gqa_attention.json to --out.

FLOPs as FlashAttention counts them: causal forward = 4 * B * Hq * T^2 * D / 2
(two matmuls, half the square), backward = 2.5 x forward.

--sweep instead times candidate block configs of each kernel separately for each
head dim (Hq=16, Hkv=4) and reports the fastest: how the tables in
ccgqa_compile/kernels/gqa_attention.py were chosen.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from ccgqa_compile.bench import warm_up_gpu
    from ccgqa_compile.kernels import gqa_attention as attention
except ImportError:
    # The kernel module stands alone; load it by path if the package's other
    # imports are not available in this environment.
    _path = Path(__file__).resolve().parents[1] / "ccgqa_compile" / "kernels" / "gqa_attention.py"
    _spec = importlib.util.spec_from_file_location("gqa_attention", _path)
    attention = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(attention)

    def warm_up_gpu() -> None:
        print("ccgqa_compile not importable: no GPU warm-up, the first case may read slow")


BATCH = 2
SEQ_LEN = 8192
CONFIGS = [(16, 4, 16), (16, 4, 32), (16, 4, 64), (16, 4, 128), (8, 2, 128)]
DTYPE = torch.bfloat16
WARMUP_MS = 25
REP_MS = 100

Tensor = torch.Tensor


def forward_flops(batch: int, num_q_heads: int, seq_len: int, head_dim: int) -> float:
    return 2 * 2 * batch * num_q_heads * seq_len * seq_len * head_dim / 2


def bench_ms(fn: Callable[[], object], warmup: int = WARMUP_MS, rep: int = REP_MS) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def relative_error(actual: Tensor, expected: Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm()).item()


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
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(
            q32, k32, v32, is_causal=True, enable_gqa=True, scale=scale
        )
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    out, lse = attention.gqa_attention_fwd(q, k, v, scale)
    grads = attention.gqa_attention_bwd(do, q, k, v, out, lse, scale)
    errors = {"o": relative_error(out, ref)}
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        errors[name] = relative_error(grad, ref_grad)
    del q32, k32, v32, ref, ref_grads
    torch.cuda.empty_cache()
    return errors


def sdpa_callables(q: Tensor, k: Tensor, v: Tensor, do: Tensor, backend: SDPBackend | None):
    """(fwd, fwd+bwd, note) for SDPA under `backend` (None: PyTorch's default choice)."""

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


def benchmark_config(num_q_heads: int, num_kv_heads: int, head_dim: int) -> list[dict]:
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

    providers = {"triton (ours)": (ours_forward, ours_forward_backward, "")}
    for label, backend in (
        ("sdpa default", None),
        ("sdpa flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
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
            "rel_err": errors if label == "triton (ours)" else None,
        }
        rows.append(row)
        print(
            f"  {label:14s} fwd {fwd_ms:7.3f} ms {row['fwd_tflops']:6.1f} TFLOP/s | "
            f"fwd+bwd {fwd_bwd_ms:7.3f} ms {row['fwd_bwd_tflops']:6.1f} TFLOP/s {note}",
            flush=True,
        )
    return rows


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
        if row["provider"] != "triton (ours)":
            continue
        same_shape = [
            other
            for other in rows
            if other["provider"] != "triton (ours)"
            and other["head_dim"] == row["head_dim"]
            and other["num_q_heads"] == row["num_q_heads"]
            and other["num_kv_heads"] == row["num_kv_heads"]
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


def run_benchmark(out_dir: Path) -> None:
    rows = []
    for num_q_heads, num_kv_heads, head_dim in CONFIGS:
        rows += benchmark_config(num_q_heads, num_kv_heads, head_dim)
        torch.cuda.empty_cache()
    print_tables(rows)
    write_json(out_dir / "bench_gqa_attention.json", {"rows": rows})


# Candidates for --sweep, per head dim: (block_m, block_n, num_warps, num_stages).
# Configs that spill registers on sm_90 (checked offline with ptxas -v) are left out.
# fmt: off
SWEEP_CANDIDATES: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        16: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
        32: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
        128: [
            (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4), (128, 32, 4, 3),
            (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (64, 128, 4, 2), (64, 32, 4, 4),
        ],
    },
    "dkdv": {
        16: [(64, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3)],
        32: [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 64, 8, 3)],
        64: [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3), (16, 64, 4, 3)],
        128: [
            (32, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 1), (16, 64, 4, 3), (32, 128, 8, 2),
            (64, 64, 8, 2), (64, 64, 8, 3), (32, 128, 8, 3), (16, 128, 4, 3), (32, 64, 8, 3),
            (64, 128, 8, 2), (32, 64, 4, 4), (16, 64, 4, 4),
        ],
    },
    # the dK/dV kernel with Q/dO loaded through TMA tensor descriptors
    "dkdv_tma": {
        64: [(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2)],
        128: [
            (32, 64, 4, 3), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2),
            (64, 64, 4, 2), (32, 64, 4, 4),
        ],
    },
    # the forward with K/V loaded through TMA tensor descriptors
    "fwd_tma": {
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        128: [
            (128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3),
            (128, 32, 8, 4), (64, 32, 4, 3),
        ],
    },
    "dq": {
        16: [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
        32: [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
        64: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 3)],
        128: [
            (128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2),
            (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 8, 4), (64, 64, 4, 2),
        ],
    },
}
# fmt: on


def sweep_head_dim(head_dim: int, kernels: list[str]) -> list[dict]:
    # device-side TMA descriptors (fwd_tma) take their 128 bytes from this
    triton.set_allocator(attention._tma_scratch)
    num_q_heads, num_kv_heads = 16, 4
    q, k, v, do = make_inputs(num_q_heads, num_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    shapes = attention._check_inputs(q, k, v, scale)
    out, lse = attention.gqa_attention_fwd(q, k, v, scale)
    dq, dk, _ = attention.gqa_attention_bwd(do, q, k, v, out, lse, scale)
    delta = attention._launch_backward_preprocess(do, out, shapes)
    fwd_flops = forward_flops(BATCH, num_q_heads, SEQ_LEN, head_dim)
    # The dK/dV kernel does 4 matmuls (QK^T, dP, dV, dK), dQ 3 (QK^T, dP, dQ).
    flops = {"fwd": fwd_flops, "fwd_tma": fwd_flops, "dkdv": fwd_flops * 2, "dq": fwd_flops * 1.5}
    flops["dkdv_tma"] = flops["dkdv"]
    expected = {"fwd": out, "fwd_tma": out, "dkdv": dk, "dkdv_tma": dk, "dq": dq}

    def launch(kernel: str, config: attention.BlockConfig) -> Tensor:
        if kernel.startswith("fwd"):
            tma = kernel == "fwd_tma"
            return attention._launch_forward(q, k, v, scale, shapes, config, tma)[0]
        if kernel.startswith("dkdv"):
            tma = kernel == "dkdv_tma"
            return attention._launch_backward_dkdv(
                do, q, k, v, lse, delta, scale, shapes, config, tma
            )[0]
        return attention._launch_backward_dq(do, q, k, v, lse, delta, scale, shapes, config)

    results = []
    for kernel, per_head_dim in SWEEP_CANDIDATES.items():
        if kernels and kernel not in kernels:
            continue
        timings = []
        for candidate in per_head_dim.get(head_dim, []):
            config = attention.BlockConfig(*candidate)
            started = time.time()
            try:
                error = relative_error(launch(kernel, config), expected[kernel])
                ms = bench_ms(lambda k=kernel, c=config: launch(k, c), warmup=10, rep=50)
            except Exception as exc:  # noqa: BLE001  (out of resources etc.)
                print(f"  D={head_dim} {kernel} {candidate}: failed {type(exc).__name__}: {exc}")
                continue
            timings.append((ms, candidate, error))
            results.append(
                {
                    "head_dim": head_dim,
                    "kernel": kernel,
                    "config": candidate,
                    "ms": ms,
                    "tflops": flops[kernel] / ms * 1e-9,
                    "rel_err_vs_default": error,
                    "wall_s": time.time() - started,
                }
            )
        timings.sort()
        print(f"D={head_dim} {kernel}:", flush=True)
        for ms, candidate, error in timings:
            tflops = flops[kernel] / ms * 1e-9
            print(f"    {candidate}  {ms:7.3f} ms  {tflops:6.1f} TFLOP/s  err {error:.1e}")
    return results


def run_sweep(out_dir: Path, head_dims: list[int], then_bench: bool, kernels: list[str]) -> None:
    results = []
    for head_dim in head_dims:
        results += sweep_head_dim(head_dim, kernels)
        torch.cuda.empty_cache()
    write_json(out_dir / "sweep_gqa_attention.json", {"results": results})

    # The fastest config of each kernel per head dim, printed as the module's tables.
    tables = {
        "fwd": attention.FORWARD_CONFIGS,
        "dkdv": attention.BACKWARD_DKDV_CONFIGS,
        "dq": attention.BACKWARD_DQ_CONFIGS,
        "fwd_tma": attention.FORWARD_TMA_CONFIGS,
        "dkdv_tma": attention.BACKWARD_DKDV_TMA_CONFIGS,
    }
    fastest_ms: dict[tuple[str, int], float] = {}
    for kernel, table in tables.items():
        print(f"{kernel} table:")
        for head_dim in head_dims:
            timed = [r for r in results if r["kernel"] == kernel and r["head_dim"] == head_dim]
            if not timed:
                continue
            fastest = min(timed, key=lambda r: r["ms"])
            fastest_ms[kernel, head_dim] = fastest["ms"]
            best = attention.BlockConfig(*fastest["config"])
            print(f"    {head_dim}: {best},")
            # a TMA form only where it beat the pointer-load kernel in this sweep
            plain = fastest_ms.get((kernel.removesuffix("_tma"), head_dim), float("inf"))
            if kernel.endswith("_tma") and fastest["ms"] >= plain:
                print(f"    ({kernel} slower than {plain:.3f} ms: not used)")
                if then_bench:
                    table.pop(head_dim, None)
            elif then_bench:
                table[head_dim] = best
    if then_bench:
        run_benchmark(out_dir)


def profile_head_dim(num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Kernel breakdown of one fwd+bwd of ours and of SDPA cuDNN, and both timed as a
    CUDA graph (no launch overhead) beside the plain do_bench median."""
    from profile_ops import cuda_kernel_breakdown, print_kernels  # scripts/profile_ops.py

    q, k, v, do = make_inputs(num_q_heads, num_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)

    def ours():
        out, lse = attention.gqa_attention_fwd(q, k, v, scale)
        return attention.gqa_attention_bwd(do, q, k, v, out, lse, scale)

    cudnn = sdpa_callables(q, k, v, do, SDPBackend.CUDNN_ATTENTION)[1]
    for label, step in (("triton (ours)", ours), ("sdpa cudnn", cudnn)):
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


def write_json(path: Path, payload: dict) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the JSON")
    parser.add_argument("--sweep", action="store_true", help="time block-config candidates")
    parser.add_argument("--head-dims", type=int, nargs="*", default=[16, 32, 64, 128])
    parser.add_argument(
        "--profile", action="store_true", help="kernel breakdown of ours and cuDNN, fwd+bwd"
    )
    parser.add_argument(
        "--kernels",
        nargs="*",
        default=[],
        choices=list(SWEEP_CANDIDATES),
        help="with --sweep, only these kernels (default: all)",
    )
    parser.add_argument(
        "--then-bench",
        action="store_true",
        help="after --sweep, run the benchmark with the fastest configs found",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gqa_attention.py needs a CUDA GPU")
    warm_up_gpu()
    if args.profile:
        for num_q_heads, num_kv_heads, head_dim in CONFIGS:
            if head_dim in args.head_dims:
                profile_head_dim(num_q_heads, num_kv_heads, head_dim)
    elif args.sweep:
        run_sweep(args.out, args.head_dims, args.then_bench, args.kernels)
    else:
        run_benchmark(args.out)


if __name__ == "__main__":
    main()
