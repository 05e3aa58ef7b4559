"""Decode-step benchmark: one attention layer decoding with a static KV cache (gpt-fast's
spelling: in-place cache writes, a bool row of a causal table as the mask, K/V repeated
for SDPA as HF does), at ZAYA1's widths (E2048; CCGQA: 8 query / 2 kv heads of d128 in the
compressed space, C=2) against the uncompressed GQA layer of the same width (16 / 4 heads).

Providers: ccgqa (backend="ccgqa"), inductor (default torch.compile) on the CCGQA layer,
and inductor on the uncompressed layer (its SDPA picks its best backend). Each step is one
CUDA-graph replay; time is the median of replays (triton.testing.do_bench). Bytes: the K/V
cache read once plus the weights; GB/s beside each time, and the device's copy bandwidth
measured in the same process.

    python scripts/bench_decode.py --out OUT              # every case, warm then time
    python scripts/bench_decode.py --one ccgqa,16,32768   # one case, JSON on stdout
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

E, D, MAX_NEW = 2048, 128, 8
LAYERS = {"ccgqa": (8, 2), "uncompressed": (16, 4), "step": (8, 2)}  # (query heads, kv heads)
PROVIDERS = {"ccgqa": ("ccgqa", "ccgqa"), "inductor": ("ccgqa", "inductor"),
             "uncompressed": ("uncompressed", "inductor"),
             # the whole CCGQA decode step (conv state, qk-mean, norm, temperature, RoPE)
             "ccgqa-step": ("step", "ccgqa"), "inductor-step": ("step", "inductor")}  # fmt: skip
BATCHES, CONTEXTS = (1, 16, 64), (4096, 32768)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecodeAttention(nn.Module):
    def __init__(self, heads, kv_heads, batch, max_len, dtype):
        super().__init__()
        self.h, self.hkv = heads, kv_heads
        self.q = nn.Linear(E, heads * D, bias=False)
        self.k = nn.Linear(E, kv_heads * D, bias=False)
        self.v = nn.Linear(E, kv_heads * D, bias=False)
        self.o = nn.Linear(heads * D, E, bias=False)
        self.register_buffer("k_cache", torch.randn(batch, kv_heads, max_len, D, dtype=dtype))
        self.register_buffer("v_cache", torch.randn(batch, kv_heads, max_len, D, dtype=dtype))
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril())
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype))
        self.register_buffer("sin", emb.sin().to(dtype))

    def forward(self, x, input_pos):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, D).transpose(1, 2)
        k = self.k(x).view(b, t, self.hkv, D).transpose(1, 2)
        v = self.v(x).view(b, t, self.hkv, D).transpose(1, 2)
        cos, sin = self.cos[input_pos][None, None], self.sin[input_pos][None, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        g = self.h // self.hkv
        kr = self.k_cache[:, :, None].expand(b, self.hkv, g, -1, D).reshape(b, self.h, -1, D)
        vr = self.v_cache[:, :, None].expand(b, self.hkv, g, -1, D).reshape(b, self.h, -1, D)
        mask = self.causal[None, None, input_pos]
        y = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, t, self.h * D))


class DecodeCCGQAStep(DecodeAttention):
    """A whole CCGQA decode step as HF's ZAYA writes it: q/k projections into the
    compressed space, Zyphra's shared causal convs (kernels 2, 2) over the conv state and
    the new column, the qk-mean residual, L2 norm to sqrt(d), a per-kv-head temperature,
    RoPE, the cache write and SDPA over the cache."""

    def __init__(self, heads, kv_heads, batch, max_len, dtype):
        super().__init__(heads, kv_heads, batch, max_len, dtype)
        c = (heads + kv_heads) * D
        self.conv1 = nn.Conv1d(c, c, 2, groups=c)
        self.conv2 = nn.Conv1d(c, c, 2, groups=heads + kv_heads)
        self.temp = nn.Parameter(torch.zeros(kv_heads))
        self.register_buffer("conv_state", torch.randn(batch, c, 2, dtype=dtype))

    def forward(self, x, input_pos):
        b, t, _ = x.shape
        g = self.h // self.hkv
        qp, kp = self.q(x), self.k(x)
        q_res = (qp.view(b, t, self.h, D) + kp.view(b, t, self.hkv, D).repeat_interleave(g, 2)) * 0.5
        k_res = q_res.view(b, t, self.hkv, g, D).mean(-2)
        window = torch.cat([self.conv_state, torch.cat([qp, kp], -1).transpose(1, 2)], -1)
        self.conv_state.copy_(window[..., -2:])
        y = self.conv2(self.conv1(window)).transpose(1, 2)
        q = y[..., : self.h * D].view(b, t, self.h, D) + q_res
        k = y[..., self.h * D :].view(b, t, self.hkv, D) + k_res
        q = F.normalize(q, dim=-1) * D**0.5
        k = F.normalize(k, dim=-1) * D**0.5 * self.temp.exp().view(1, 1, -1, 1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v(x).view(b, t, self.hkv, D).transpose(1, 2)
        cos, sin = self.cos[input_pos][None, None], self.sin[input_pos][None, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        mask = self.causal[None, None, input_pos]
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask,
                                           enable_gqa=True)  # fmt: skip
        return self.o(y.transpose(1, 2).reshape(b, t, self.h * D))


def one(provider: str, batch: int, context: int) -> dict:
    import triton

    import ccgqa_compile

    ccgqa_compile.reset_report()
    torch.manual_seed(0)
    layer_kind, backend = PROVIDERS[provider]
    heads, kv_heads = LAYERS[layer_kind]
    dtype = torch.bfloat16
    build = DecodeCCGQAStep if layer_kind == "step" else DecodeAttention
    model = build(heads, kv_heads, batch, context, dtype).cuda().to(dtype)
    x = torch.randn(batch, 1, E, device="cuda", dtype=dtype)
    pos = torch.tensor([context - MAX_NEW], device="cuda")
    compiler = ccgqa_compile.ccgqa_backend if backend == "ccgqa" else "inductor"
    step = torch.compile(model, backend=compiler, fullgraph=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        step(x, pos)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        for _ in range(3):
            step(x, pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(x, pos)
    ms = triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
    cache_bytes = 2 * batch * kv_heads * context * D * 2
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2
    big = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_ms = triton.testing.do_bench(lambda: big.clone(), warmup=10, rep=100, return_mode="median")
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    gbs = (cache_bytes + weight_bytes) / ms / 1e6
    rep = ccgqa_compile.report() if backend == "ccgqa" else None
    return {
        "provider": provider, "batch": batch, "context": context, "ms": ms,
        "tokens_per_s": batch / ms * 1e3, "gb_per_s": gbs, "copy_gb_per_s": copy_gbs,
        "fraction_of_copy": gbs / copy_gbs, "kv_bytes_per_token": 2 * kv_heads * D * 2,
        "compile_s": compile_s, "counts": rep.counts() if rep else None,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--out", default=".")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--in-process", action="store_true", help="one process, in order")
    ap.add_argument("--deadline-s", type=float, default=1e9)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--cases", help="B:context,... (default: every batch and context)")
    ap.add_argument("--record", metavar="JSON", help="append a run's JSON to the results files")
    ap.add_argument("--commit", default="unknown", help="with --record: the commit measured")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="with --record")
    args = ap.parse_args()
    if args.record:
        from ccgqa_compile.bench import results as res

        rows = result_rows(json.load(open(args.record)), args.commit, args.date, "NVIDIA H200")
        res.record(res.default_dir(), "NVIDIA H200", rows)
        return
    if args.one:
        p, b, c = args.one.split(",")
        print("RESULT " + json.dumps(one(p, int(b), int(c))))
        return
    order = [(16, 32768), (64, 32768), (1, 4096), (64, 4096), (1, 32768), (16, 4096)]
    if args.cases:
        order = [tuple(int(x) for x in case.split(":")) for case in args.cases.split(",")]
    cases = [(p, b, c) for b, c in order for p in args.providers.split(",")]
    if args.in_process:  # one process, cases in order until the deadline
        start, results = time.perf_counter(), []
        for case in cases:
            if time.perf_counter() - start > args.deadline_s:
                break
            torch._dynamo.reset()
            try:
                r = one(*case)
            except Exception as why:  # noqa: BLE001 - report and go on
                r = {"case": case, "error": repr(why)[:500]}
            r["first_call_cold_s"] = r.get("compile_s")
            print("CASE", json.dumps(r), flush=True)
            results.append(r)
            torch.cuda.empty_cache()
        _print(results, args.out)
        return

    def run(case):
        cmd = [sys.executable, __file__, "--one", ",".join(map(str, case))]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            return {"case": case, "error": out.stderr[-1500:]}
        return json.loads(lines[0][7:])

    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:  # warm the caches
        cold = list(pool.map(run, cases))
    results = [run(case) for case in cases]  # then time one process at a time
    for r, c in zip(results, cold):
        r["first_call_cold_s"] = c.get("compile_s")
    _print(results, args.out)


def result_rows(results: list[dict], commit: str, date: str, device: str) -> list[dict]:
    """The run as rows of the results files (docs/benchmarks/results/), ratios against
    Inductor default on the same layer code."""
    rows = []
    for r in results:
        if "error" in r:
            continue
        b = _baseline(results, r)
        ratio = b["ms"] / r["ms"] if b is not None and b is not r else None
        rows.append({
            "date": date, "commit": commit, "device": device, "dtype": "bfloat16", "op": "decode",
            "case": f"B{r['batch']} context {r['context']}", "provider": r["provider"],
            "fwd_ms": f"{r['ms']:.5g}", "rate": f"{r['gb_per_s']:.0f} GB/s",
            "baseline": b["provider"] if ratio else "", "ratio": f"{ratio:.5g}" if ratio else "",
            "first_call_s": f"{r['first_call_cold_s']:.1f}" if r.get("first_call_cold_s") else "",
            "note": f"{100 * r['fraction_of_copy']:.0f}% of the copy bandwidth measured in the run "
                    f"({r['copy_gb_per_s']:.0f} GB/s)",
            "source": "scripts/bench_decode.py --in-process",
        })  # fmt: skip
    return rows


def _baseline(results: list[dict], r: dict, name: str | None = None) -> dict | None:
    """Inductor default on the same layer code (``name``: another provider), same case."""
    name = name or ("inductor-step" if r["provider"].endswith("-step") else "inductor")
    return next((x for x in results if x.get("provider") == name
                 and (x["batch"], x["context"]) == (r["batch"], r["context"])), None)  # fmt: skip


def _print(results: list[dict], out_dir: str) -> None:
    json.dump(results, open(os.path.join(out_dir, "bench_decode.json"), "w"), indent=1)
    print("provider        B  context     ms   tok/s    GB/s  %copy  vs inductor  vs uncompressed  compile s")
    for r in results:
        if "error" in r:
            print("ERROR", r["case"], r["error"])
            continue
        base, unc = _baseline(results, r), _baseline(results, r, "uncompressed")
        vs_base = f"{base['ms'] / r['ms']:10.2f}x" if base else "         -"
        vs_unc = f"{unc['ms'] / r['ms']:14.2f}x" if unc else "             -"
        print(f"{r['provider']:<14} {r['batch']:>2} {r['context']:>8} {r['ms']:7.4f} {r['tokens_per_s']:8.0f} "
              f"{r['gb_per_s']:7.0f} {100 * r['fraction_of_copy']:5.1f}  {vs_base} {vs_unc}  "
              f"{r.get('first_call_cold_s') or 0:8.1f}")  # fmt: skip
    for r in results:
        if r.get("counts"):
            print(f"counts ({r['provider']}):", r["counts"])


if __name__ == "__main__":
    main()
