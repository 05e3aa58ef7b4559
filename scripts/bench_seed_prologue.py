"""The seed variant's q/k prologue: our Triton kernels vs the seed's code under Inductor.

    python scripts/bench_seed_prologue.py [--out DIR] [--configs N] [--sweep] [--block]

For each config (B*T = 32768, T = 2048, bf16, conv kernels 3/3 as the seed's default):
checks the kernels' q, k and every gradient against the float64 reference, and the same
for Inductor's compile of the seed's own spelling (so both errors stand side by side), then
times forward and forward+backward of
  * ours: ccgqa_seed_prologue_fwd, then ccgqa_seed_prologue_bwd;
  * the prologue exactly as patterns/ccgqa.py ``CCGQAAttentionSeed`` writes it (bf16
    throughout) compiled by Inductor default, backward through autograd.
Three figures per row, all medians in one process, warm:
  * "graph ms": replays of a CUDA graph of many steps (``do_bench_cudagraph``, as the block
    benchmark): the GPU work alone, what a compiled model sees;
  * "kernels ms": the sum of the CUDA kernel times per step (torch.profiler);
  * "events ms": plain ``do_bench``, host launch overhead included. Our kernels called
    eagerly go through ``wrap_triton``'s dispatch, so this column is the host's speed, not
    the kernels' (the 2026-11-25 morning figures were this column: see
    docs/benchmarks/README.md).
The floor counts q_pre, k_pre read once and q, k written once (forward), plus dq, dk read
and d q_pre, d k_pre written once (backward), at ~3 TB/s; the convs' FLOPs are far below
the byte time. ``--sweep`` also times our launches over tile heights and warps. ``--block``
times the whole ``CCGQAAttentionSeed`` module (E512, hq8, hkv2, C4, B16 T2048) under eager,
Inductor default, ``backend="ccgqa"`` as shipped (our prologue kernels in inference graphs,
Inductor's in training graphs: the policy) and ``backend="ccgqa"`` with the policy off
(ours in both), forward and forward+backward, with peak memory, and checks which prologue
ran.
Prints each row as it is measured and writes bench_seed_prologue.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccgqa_compile.bench import (  # noqa: E402
    cuda_kernel_breakdown,
    print_kernels,
    rel_err,
    timer,
    warm_up_gpu,
)
from ccgqa_compile.kernels.ccgqa_seed_prologue import (  # noqa: E402
    ccgqa_seed_prologue_bwd,
    ccgqa_seed_prologue_fwd,
    ccgqa_seed_prologue_reference,
)

TOKENS = 32768
SEQ_LEN = 2048
# (E, hq, hkv, C) with the seed's d = E / C / hq; E512 is the seed config
CONFIGS = [(512, 8, 2, 4), (512, 4, 1, 4)]
COPY_BYTES_PER_S = 3.0e12
DEVICE = "cuda"


def make(b, t, hq, hkv, d, dtype, k=3):
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)

    e_q, e_kv = hq * d, hkv * d
    # a fused qkv projection's column slices, as the seed's split gives them
    qkv = r(b, t, e_q + 2 * e_kv)
    freqs = torch.arange(t, device=DEVICE)[:, None] / 10000 ** (
        torch.arange(0, d, 2, device=DEVICE) / d
    )
    angles = freqs.repeat_interleave(2, dim=-1)  # the seed's interleaved tables
    tensors = [
        qkv[..., :e_q],
        qkv[..., e_q : e_q + e_kv],
        r(e_q, d, k, scale=1 / math.sqrt(d * k)),
        r(e_q, e_q, k, scale=1 / math.sqrt(e_q * k)),
        r(e_kv, d, k, scale=1 / math.sqrt(d * k)),
        r(e_kv, e_kv, k, scale=1 / math.sqrt(e_kv * k)),
        torch.tensor(math.sqrt(d), device=DEVICE, dtype=dtype),
        angles.cos().to(dtype),
        angles.sin().to(dtype),
    ]
    return tensors, [hq, hkv, 1e-12, True]


def seed_prologue(q_pre, k_pre, q_w1, q_w2, k_w1, k_w2, temp, cos, sin, hq, hkv, eps, inter):
    """``CCGQAAttentionSeed.forward`` from the split to the rotated q, k, as written."""
    b, t, _ = q_pre.shape
    d = q_pre.shape[-1] // hq

    def conv(x, w1, w2, heads):
        y = x.transpose(1, 2)
        y = F.conv1d(F.pad(y, (w1.shape[-1] - 1, 0)), w1, groups=heads)
        return F.conv1d(F.pad(y, (w2.shape[-1] - 1, 0)), w2).transpose(1, 2)

    q = conv(q_pre, q_w1, q_w2, hq).view(b, t, hq, d)
    k = conv(k_pre, k_w1, k_w2, hkv).view(b, t, hkv, d)
    q = q + 0.5 * k_pre.reshape(b, t, hkv, d).mean(dim=2, keepdim=True)
    k = k + 0.5 * q_pre.reshape(b, t, hq, d).mean(dim=2, keepdim=True)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1) * temp
    q, k = q.transpose(1, 2), k.transpose(1, 2)

    def rope(x):
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * cos + rotated * sin

    return rope(q), rope(k)


def errors_vs_fp64(tensors, scalars, q, k, dq, dk, grads) -> tuple[float, float]:
    """Worst relative error over q, k and the 6 tensor gradients against float64, and the
    temperature gradient's apart: one sum over every element with heavy cancellation, its
    relative error moves with the random upstream gradient (use the kernel tests)."""
    leaves = [x.detach().double().requires_grad_(i < 7) for i, x in enumerate(tensors)]
    q_r, k_r = ccgqa_seed_prologue_reference(*leaves, *scalars)
    ref = torch.autograd.grad((q_r, k_r), leaves[:7], (dq.double(), dk.double()))
    errors = [rel_err(q, q_r), rel_err(k, k_r)] + [
        rel_err(g, r) for g, r in zip(grads[:6], ref[:6])
    ]
    return max(errors), rel_err(grads[6], ref[6])


def _bench_config(e, hq, hkv, c, dtype, sweep: bool) -> list[dict]:
    d = e // c // hq
    b = TOKENS // SEQ_LEN
    tensors, scalars = make(b, SEQ_LEN, hq, hkv, d, dtype)
    label = f"E{e} hq{hq} hkv{hkv} C{c} d{d} (widths {hq * d}+{hkv * d}) B{b} T{SEQ_LEN}"
    q, k = ccgqa_seed_prologue_fwd(*tensors, *scalars)
    gen = torch.Generator().manual_seed(1)
    dq = torch.randn(q.shape, generator=gen).to(q)
    dk = torch.randn(k.shape, generator=gen).to(k)
    grads = ccgqa_seed_prologue_bwd(dq, dk, *tensors, *scalars)
    err_ours = errors_vs_fp64(tensors, scalars, q, k, dq, dk, grads)

    compiled = torch.compile(seed_prologue)
    train_in = [x.detach().requires_grad_(i < 7) for i, x in enumerate(tensors)]

    def inductor_fwd():
        with torch.no_grad():
            return compiled(*tensors, *scalars)

    def inductor_train():
        q, k = compiled(*train_in, *scalars)
        return torch.autograd.grad((q, k), train_in[:7], (dq, dk))

    q_i, k_i = compiled(*train_in, *scalars)
    err_inductor = errors_vs_fp64(
        tensors, scalars, q_i, k_i, dq, dk, torch.autograd.grad((q_i, k_i), train_in[:7], (dq, dk))
    )
    inductor_fwd()

    def ours(block_t=None, num_warps=None):
        launch = dict(block_t=block_t, num_warps=num_warps)

        def fwd():
            return ccgqa_seed_prologue_fwd(*tensors, *scalars, **launch)

        def train():
            ccgqa_seed_prologue_fwd(*tensors, *scalars, **launch)
            return ccgqa_seed_prologue_bwd(dq, dk, *tensors, *scalars, **launch)

        return fwd, train

    io = (b * SEQ_LEN * (hq + hkv) * d) * tensors[0].element_size() * 2
    providers = [("ccgqa kernels", *ours()), ("inductor", inductor_fwd, inductor_train)]
    if sweep:
        providers += [
            (f"ours BLOCK_T={bt} warps={w}", *ours(bt, w)) for bt in (32, 64, 128) for w in (4, 8)
        ]
    rows = []
    for name, fwd, train in providers:
        times = _three_timings(fwd, train, train_in[:7] if name == "inductor" else [])
        rows.append(
            {
                "case": label,
                "provider": name,
                **times,
                "fwd_gbs": io / times["fwd_ms"] / 1e6,
                "total_gbs": 2 * io / times["total_ms"] / 1e6,
                "floor_fwd_ms": io / COPY_BYTES_PER_S * 1e3,
                "floor_total_ms": 2 * io / COPY_BYTES_PER_S * 1e3,
                "rel_err_vs_fp64": (err_ours if name != "inductor" else err_inductor)[0],
                "temp_grad_rel_err_vs_fp64": (err_ours if name != "inductor" else err_inductor)[1],
            }
        )
        print(_prologue_row(rows[-1]), flush=True)
    torch._dynamo.reset()
    return rows


def _three_timings(fwd, train, reset) -> dict:
    """CUDA-graph median (the GPU work; "fwd_ms"/"total_ms"), the profiler's kernel sum
    per step, and plain do_bench events (host overhead included)."""
    out = {}
    for key, fn in (("fwd", fwd), ("total", train)):
        out[f"{key}_ms"], out[f"{key}_method"] = timer("cuda", fn, reset)
        events, out[f"{key}_kernels_ms"] = cuda_kernel_breakdown(fn)
        print(f"  {key}: kernels per step", flush=True)
        print_kernels(events, 5, 8)
        out[f"{key}_events_ms"] = triton.testing.do_bench(fn, return_mode="median")
    return out


PROLOGUE_HEADER = (
    "| case | provider | fwd graph ms | fwd+bwd graph ms | kernels ms fwd / fwd+bwd | "
    "events ms fwd / fwd+bwd | fwd+bwd GB/s | floor fwd / fwd+bwd ms | max rel err vs fp64 "
    "(q, k, 6 grads) | temp grad rel err |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _prologue_row(r: dict) -> str:
    return (
        f"| {r['case']} | {r['provider']} | {r['fwd_ms']:.3f} | {r['total_ms']:.3f} | "
        f"{r['fwd_kernels_ms']:.3f} / {r['total_kernels_ms']:.3f} | "
        f"{r['fwd_events_ms']:.3f} / {r['total_events_ms']:.3f} | {r['total_gbs']:.0f} | "
        f"{r['floor_fwd_ms']:.3f} / {r['floor_total_ms']:.3f} | {r['rel_err_vs_fp64']:.1e} | "
        f"{r['temp_grad_rel_err_vs_fp64']:.1e} |"
    )


def _timed(name, label, fwd, train, flops, reset):
    """One row: median fwd and fwd+bwd times (with TFLOP/s of the block's matmul FLOPs)
    and the peak memory of one fwd+bwd step; times are CUDA-graph replays."""
    t_fwd = timer("cuda", fwd, reset)[0]
    t_tot = timer("cuda", train, reset)[0]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    row = {"case": label, "provider": name, "fwd_ms": t_fwd, "total_ms": t_tot}
    row["fwd_tflops"] = flops[0] / t_fwd / 1e9
    row["total_tflops"] = flops[1] / t_tot / 1e9
    row["total_peak_mib"] = peak
    print(
        f"| {label} | {name} | {t_fwd:.3f} ({row['fwd_tflops']:.0f} TFLOP/s) | "
        f"{t_tot:.3f} ({row['total_tflops']:.0f} TFLOP/s) | {peak:.0f} MiB |",
        flush=True,
    )
    return row


def _bench_block() -> list[dict]:
    """The seed module end to end; the prologue must have fused under backend="ccgqa"."""
    import ccgqa_compile
    from patterns.ccgqa import CCGQAAttentionSeed

    dim, hq, hkv, c = 512, 8, 2, 4
    b, t = TOKENS // SEQ_LEN, SEQ_LEN
    # made on the CPU: a CUDA-graph capture that failed (the timer then falls back to
    # events) leaves the default CUDA generator unusable
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = CCGQAAttentionSeed(dim, hq, hkv, c).to(DEVICE, torch.bfloat16)
    x = torch.randn(b, t, dim, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    grad = torch.randn(b, t, dim, generator=gen).to(DEVICE, torch.bfloat16)
    label = f"CCGQAAttentionSeed E{dim} hq{hq} hkv{hkv} C{c} B{b} T{t}"
    d = dim // c // hq
    # causal attention in the compressed space, the qkv and output projections (as
    # ccgqa_compile/bench.py counts a block); the convs are far smaller
    attn = 4 * b * hq * t * t * d / 2
    proj = 2 * b * t * dim * ((hq + 2 * hkv) * d + hq * d)
    flops = (attn + proj, 3.5 * attn + 3 * proj)
    rows = []
    # (name, backend, leave training graphs to Inductor (not SEED_PROLOGUE_IN_TRAINING),
    # prologue fusions expected over the inference and the training graph)
    providers = (
        ("eager", None, None, None),
        ("inductor", "inductor", None, None),
        ("ccgqa as shipped (prologue fused in inference only: policy)", "ccgqa", True, 1),
        ("ccgqa, policy off (our prologue kernels in training too)", "ccgqa", False, 2),
    )
    # the two ccgqa runs differ only in the policy: a cache hit would skip our passes
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    for name, backend, leave_training, expected in providers:
        torch._dynamo.reset()
        ccgqa_compile.reset_report()
        if leave_training is not None:
            ccgqa_compile.config.SEED_PROLOGUE_IN_TRAINING = not leave_training
        fn = module if backend is None else torch.compile(module, backend=backend)

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x)

        def train(fn=fn):
            fn(x).backward(grad)

        fwd(), train()  # compile outside the timing
        rows.append(_timed(name, label, fwd, train, flops, [x, *module.parameters()]))
        if backend == "ccgqa":
            report = ccgqa_compile.report()
            print(report, flush=True)
            fused = report.count("ccgqa_prologue")
            if fused != expected:
                raise SystemExit(f"{name}: the seed prologue fused {fused}x, expected {expected}")
    ccgqa_compile.config.SEED_PROLOGUE_IN_TRAINING = False
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true", help="also time other launches")
    ap.add_argument("--block", action="store_true", help="also time the whole seed module")
    ap.add_argument("--configs", type=int, default=len(CONFIGS), help="how many CONFIGS")
    args = ap.parse_args(argv)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        with open(out / "bench_seed_prologue.json", "w") as fh:
            meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
            json.dump({**meta, "rows": rows}, fh, indent=1)

    warm_up_gpu()
    if args.block:  # first: a failed CUDA-graph capture can upset later CUDA RNG calls
        rows.extend(_bench_block())
        save()
    for config in CONFIGS[: args.configs]:
        rows.extend(_bench_config(*config, torch.bfloat16, args.sweep))
        save()
    print(PROLOGUE_HEADER)
    for r in (r for r in rows if "fwd_gbs" in r):
        print(_prologue_row(r))


if __name__ == "__main__":
    main()
