"""Tune the attention core's launch tables (CUDA only): time candidate block configs of each
kernel separately for each head dim (Hq=16, Hkv=4, B=2, T=8192, bf16) and report the
fastest, printed as the tables in ccgqa_compile/kernels/gqa_attention.py. How those tables
were chosen; rerun it on a new GPU.

    python scripts/sweep_gqa_attention.py [--out DIR] [--head-dims 16 32] [--kernels fwd dq]
                                          [--then-bench]

``--then-bench`` then runs the core benchmark (``python -m ccgqa_compile.bench core``) with
the fastest configs found. Writes sweep_gqa_attention.json to --out.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout's ccgqa_compile

from ccgqa_compile.bench import core, rel_err, warm_up_gpu  # noqa: E402

Tensor = torch.Tensor
attention = core.kernels()

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
    q, k, v, do = core.make_inputs(num_q_heads, num_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    shapes = attention._check_inputs(q, k, v, scale)
    out, lse = attention.gqa_attention_fwd(q, k, v, scale)
    dq, dk, _ = attention.gqa_attention_bwd(do, q, k, v, out, lse, scale)
    delta = attention._launch_backward_preprocess(do, out, shapes)
    fwd_flops = core.forward_flops(core.BATCH, num_q_heads, core.SEQ_LEN, head_dim)
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
                error = rel_err(launch(kernel, config), expected[kernel])
                ms = core.bench_ms(lambda k=kernel, c=config: launch(k, c), warmup=10, rep=50)
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
    core.write_json(out_dir / "sweep_gqa_attention.json", {"results": results})

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
        core.benchmark(out_dir, source="scripts/sweep_gqa_attention.py --then-bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the JSON")
    parser.add_argument("--sweep", action="store_true", help="(the default; kept for old commands)")
    parser.add_argument("--head-dims", type=int, nargs="*", default=[16, 32, 64, 128])
    parser.add_argument(
        "--kernels",
        nargs="*",
        default=[],
        choices=list(SWEEP_CANDIDATES),
        help="only these kernels (default: all)",
    )
    parser.add_argument(
        "--then-bench",
        action="store_true",
        help="then run the core benchmark with the fastest configs found",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_gqa_attention.py needs a CUDA GPU")
    warm_up_gpu()
    run_sweep(args.out, args.head_dims, args.then_bench, args.kernels)


if __name__ == "__main__":
    main()
