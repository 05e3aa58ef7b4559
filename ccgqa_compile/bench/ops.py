"""The default command, ``python -m ccgqa_compile.bench [--ops ...]``: eager vs Inductor vs
backend="ccgqa" (vs SDPA, Liger) on fused ops, the CCGQA block and Hugging Face models.

Same process, warm (the compiling call is never timed), medians. On CUDA it times CUDA-graph
replays and records peak memory; on CPU it uses a wall clock over small sizes so a new user
sees it work without a GPU. Writes JSON (and PNG charts with --plot) to --save and appends
its rows to the device's results file (``--results``). Bytes are the minimum traffic (each
input read once, each output written once); attention reports causal TFLOP/s.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import ccgqa_compile

from . import results
from .common import DTYPES, as_tuple, device_name, rel_err, timer, warm_up_gpu

OPS = (
    "rmsnorm", "swiglu", "rope", "attention", "ccgqa-block",
    "zaya-attention", "zaya-lm", "llama-lm",
)  # fmt: skip
# whole-block cases: (E, hq, hkv, C); the first is the product's target, the second the seed's
BLOCK_CONFIGS = ((2048, 16, 4, 4), (512, 8, 2, 4))
BLOCK_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
BLOCK_TOKENS = 32768  # tokens per step: batch = BLOCK_TOKENS // T (2 at T = 16384)


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


class UncompressedGQABlock(torch.nn.Module):
    """The baseline CCGQA must beat: a plain GQA block of the same width (head dim E / hq),
    RoPE on q and k, ``F.scaled_dot_product_attention`` (cuDNN on the H100) with GQA."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.h_q, self.h_kv, self.d = heads, kv_heads, dim // heads
        self.q_proj = torch.nn.Linear(dim, dim, bias=False)
        self.k_proj = torch.nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v_proj = torch.nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o_proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h_q, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.h_kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.h_kv, self.d).transpose(1, 2)
        with torch.no_grad():
            inv = 1.0 / (10000 ** (torch.arange(0, self.d, 2, device=x.device).float() / self.d))
            emb = torch.outer(torch.arange(t, device=x.device).float(), inv).repeat(1, 2)
            cos, sin = emb.cos().to(x.dtype)[None], emb.sin().to(x.dtype)[None]
        q, k = hf_rope(q, k, cos, sin)
        o = sdpa_gqa(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


def _ccgqa_block(dim: int, heads: int, kv_heads: int, compression: int, attention: str):
    try:
        from patterns.ccgqa import CCGQAttention
    except ImportError as err:  # patterns/ is the repository's corpus, not in the wheel
        raise SystemExit(
            "--ops ccgqa-block times patterns/ccgqa.py, the repository's corpus module, which "
            "the wheel does not ship: run it from a checkout's root (or put one on PYTHONPATH)"
        ) from err
    head_dim = dim // compression // heads
    return CCGQAttention(dim, heads, kv_heads, head_dim, attention=attention)


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
    total_flops: float = 0.0  # fwd+bwd
    extra: dict = field(default_factory=dict)
    # a module case: ``fn`` is this module (its parameters get gradients too) and the float64
    # reference is a copy of it; None for plain functions
    module: torch.nn.Module | None = None
    providers: tuple[str, ...] = ()  # restrict to these providers (default: all)
    # compare with a float64 reference (skipped where the reference itself would not fit:
    # a hand-written float64 attention at T = 8192 materialises 17 GB per score tensor)
    check: bool = True
    # extra providers "ccgqa-no-<fusion>": the backend with that fusion off
    variants: tuple[str, ...] = ()


def cases(
    op: str,
    device: str,
    dtype: torch.dtype,
    quick: bool,
    seq_lens: list[int],
    block_configs: tuple[tuple[int, int, int, int], ...] = (),
):
    big = device == "cuda" and not quick
    es = dtype.itemsize
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    if op in ("zaya-attention", "zaya-lm", "llama-lm"):
        from . import hf

        small = quick or device != "cuda"
        if op == "zaya-attention":
            yield from hf.zaya_attention_cases(
                device, dtype, small, seq_lens, Case, UncompressedGQABlock)  # fmt: skip
        elif op == "zaya-lm":
            yield from hf.zaya_lm_cases(device, dtype, small, seq_lens, Case)
        else:
            yield from hf.llama_lm_cases(device, dtype, small, seq_lens, Case)
        return
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
                total_flops=3.5 * flops,  # backward = 2.5 x forward (FlashAttention's count)
                extra={"seq_len": t},
            )
    elif op == "ccgqa-block":
        yield from _block_cases(device, dtype, big, seq_lens, block_configs)


def _block_cases(device: str, dtype: torch.dtype, big: bool, seq_lens: list[int], configs=()):
    configs = configs or (BLOCK_CONFIGS if big else ((64, 4, 2, 2),))
    tokens = BLOCK_TOKENS if big else 128
    for dim, hq, hkv, compression in configs:
        d = dim // compression // hq
        for t in seq_lens or (BLOCK_SEQ_LENS if big else (32, 64)):
            b = max(1, tokens // t)
            make = lambda b=b, t=t, dim=dim: (  # noqa: E731
                torch.randn(b, t, dim, device=device, dtype=dtype),
            )
            extra = {"seq_len": t, "batch": b, "config": f"E{dim} hq{hq} hkv{hkv} C{compression}"}
            # attention FLOPs (causal) in the compressed space, plus the projections
            attn = 4 * b * hq * t * t * d / 2
            proj = 2 * b * t * dim * (2 * hq * d + 2 * hkv * d)
            # float64 scores of the reference: checked where they stay small
            check = b * hq * t * t * 8 <= 2**31
            for attention in ("handwritten", "sdpa"):
                module = _ccgqa_block(dim, hq, hkv, compression, attention)
                module = module.to(device=device, dtype=dtype)
                yield Case(
                    "ccgqa-block",
                    f"{extra['config']} d{d} B{b} T{t} {attention}",
                    module,
                    make,
                    1,
                    module=module,
                    check=check,
                    fwd_flops=attn + proj,
                    total_flops=3.5 * attn + 3 * proj,
                    extra={**extra, "idiom": attention},
                )
            base = UncompressedGQABlock(dim, hq, hkv).to(device=device, dtype=dtype)
            d_full = dim // hq
            attn_full = 4 * b * hq * t * t * d_full / 2
            proj_full = 2 * b * t * dim * 2 * (dim + hkv * d_full)
            yield Case(
                "ccgqa-block",
                f"{extra['config']} uncompressed d{d_full} B{b} T{t} sdpa",
                base,
                make,
                1,
                module=base,
                check=check,
                providers=("eager", "inductor"),
                fwd_flops=attn_full + proj_full,
                total_flops=3.5 * attn_full + 3 * proj_full,
                extra={**extra, "idiom": "uncompressed"},
            )


def providers(case: Case) -> dict[str, Callable]:
    out = {
        "eager": case.fn,
        "inductor": torch.compile(case.fn),
        "ccgqa": torch.compile(case.fn, backend="ccgqa"),
    }
    for variant in case.variants:
        fusion = variant.removeprefix("ccgqa-no-")
        out[variant] = torch.compile(case.fn, backend="ccgqa", options={"ccgqa_disable": [fusion]})
    if case.providers:
        return {name: fn for name, fn in out.items() if name in case.providers}
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


MODES = ("fwd", "fwd+bwd")


def run_case(
    case: Case, device: str, only: set[str] | None = None, modes: tuple[str, ...] = MODES
) -> list[dict]:
    """Every provider of ``case`` (those in ``only``, when given), timed in this process."""
    # every case compiles afresh with static shapes (no automatic-dynamic recompile of the
    # same code at a second size), as a training job with a fixed T does
    torch._dynamo.reset()
    base = case.make()
    params = list(case.module.parameters()) if case.module is not None else []
    # the float64 reference: outputs, then input and parameter gradients
    reference: tuple[tuple, list] | None = None
    grads = None
    if case.check:
        ref_in = [t.detach().double().requires_grad_(i < case.n_grad) for i, t in enumerate(base)]
        ref_fn = copy.deepcopy(case.module).double() if case.module is not None else case.fn
        ref_out = as_tuple(ref_fn(*ref_in))
        grads = tuple(torch.randn_like(o).to(base[0].dtype) for o in ref_out)
        torch.autograd.backward(ref_out, tuple(g.double() for g in grads))
        ref_grads = [r.grad for r in ref_in if r.grad is not None]
        if case.module is not None:
            ref_grads += [p.grad for p in ref_fn.parameters()]
        reference = (ref_out, ref_grads)
        del ref_in, ref_fn
    rows = []
    for name, fn in providers(case).items():
        if only is not None and name not in only:
            continue
        row = {"op": case.op, "case": case.label, "provider": name, **case.extra}
        try:
            _measure(case, device, fn, name, base, grads, reference, params, row, modes)
        except torch.OutOfMemoryError:
            row["oom"] = True
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _measure(case, device, fn, name, base, grads, reference, params, row, modes=MODES) -> None:
    for mode in modes:
        train = mode == "fwd+bwd"
        inputs = [
            t.detach().clone().requires_grad_(train and i < case.n_grad) for i, t in enumerate(base)
        ]
        for p in params:
            p.grad = None
        ccgqa_compile.reset_report()
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter()
        with torch.set_grad_enabled(train):
            out = as_tuple(fn(*inputs))  # warm-up: compiles, never timed
            if grads is None:
                grads = tuple(torch.randn_like(o) for o in out)
            if train:
                torch.autograd.backward(out, grads)
        if device == "cuda":
            torch.cuda.synchronize()
        # the first call: compilation included (the user's cost), forward then backward
        row[f"{'total' if train else 'fwd'}_first_call_s"] = time.perf_counter() - first
        if name == "ccgqa":
            row[f"fused_{mode}"] = ccgqa_compile.report().counts()
        err = None
        if reference is not None:
            ref_out, ref_grads = reference
            err = max(rel_err(o, r) for o, r in zip(out, ref_out))
            if train:
                got = [i.grad for i in inputs if i.grad is not None] + [p.grad for p in params]
                err = max([err] + [rel_err(g, r) for g, r in zip(got, ref_grads)])
        del out

        def step(fn=fn, inputs=inputs, train=train, grads=grads):
            with torch.set_grad_enabled(train):
                o = as_tuple(fn(*inputs))
                if train:
                    torch.autograd.backward(o, grads)

        reset = (inputs[: case.n_grad] + params) if train else []
        key = "fwd" if not train else "total"
        if device == "cuda":  # peak memory of one plain step, outside any CUDA graph
            for t in reset:
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row[f"{key}_peak_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        row[f"{key}_ms"], row[f"{key}_timer"] = timer(device, step, reset)
        row[f"{key}_rel_err_vs_fp64"] = err
    if "fwd_ms" in row and "total_ms" in row:
        row["bwd_ms"] = row["total_ms"] - row["fwd_ms"]
    for key, work in (("fwd", case.fwd_bytes), ("total", case.total_bytes)):
        if work and f"{key}_ms" in row:
            row[f"{key}_gbs"] = work / row[f"{key}_ms"] / 1e6
    for key, work in (("fwd", case.fwd_flops), ("total", case.total_flops)):
        if work and f"{key}_ms" in row:
            row[f"{key}_tflops"] = work / row[f"{key}_ms"] / 1e9


def table(rows: list[dict], device: str = "") -> str:
    """The run's rows as a markdown table; rates beside their fraction of ``device``'s
    ceiling where it is known (``results.DEVICE_PEAKS``)."""
    lines = [
        "| op | case | provider | fwd ms | fwd+bwd ms | rate | peak MiB | vs best(eager, inductor) "
        "| first call s (fwd / fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | OOM | OOM | | | |")
            continue
        key = "total_ms" if "total_ms" in r else "fwd_ms"
        peers = [
            p[key]
            for p in rows
            if p["case"] == r["case"]
            and p["provider"] in ("eager", "inductor")
            and not p.get("oom")
            and key in p
        ]
        ratio = f"{min(peers) / r[key]:.2f}x" if peers else "-"
        kind = "total" if key == "total_ms" else "fwd"
        rate = (
            f"{r[f'{kind}_gbs']:.0f} GB/s"
            if f"{kind}_gbs" in r
            else f"{r.get(f'{kind}_tflops', 0):.1f} TFLOP/s"
        )
        rate = results.with_peak_fraction(rate, device)
        peak = f"{r[f'{kind}_peak_mib']:.0f}" if f"{kind}_peak_mib" in r else "-"

        def ms(name, r=r):
            return f"{r[name]:.4f}" if name in r else "-"

        def first_s(name, r=r):
            return f"{r[name]:.1f}" if name in r else "-"

        first = f"{first_s('fwd_first_call_s')} / {first_s('total_first_call_s')}"
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {ms('fwd_ms')} | "
            f"{ms('total_ms')} | {rate} | {peak} | {ratio} | {first} |"
        )
    return "\n".join(lines)


def block_summary(rows: list[dict]) -> str:
    """CCGQA block under backend="ccgqa" vs Inductor default (same idiom) and vs the
    uncompressed SDPA GQA block of the same width under Inductor, per config and T."""
    blocks = [r for r in rows if r["op"] == "ccgqa-block" and not r.get("oom")]
    if not blocks:
        return ""

    def find(config, t, idiom, provider):
        for r in blocks:
            if (r["config"], r["seq_len"], r["idiom"], r["provider"]) == (
                config,
                t,
                idiom,
                provider,
            ):
                return r
        return None

    lines = [
        "| config | T | idiom | ccgqa fwd+bwd ms | inductor ms | speedup | uncompressed "
        "ms | vs uncompressed | peak MiB ccgqa / inductor / uncompressed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["config"], r["seq_len"]) for r in blocks)
    for config, t in keys:
        base = find(config, t, "uncompressed", "inductor")
        for idiom in ("handwritten", "sdpa"):
            ours, ind = find(config, t, idiom, "ccgqa"), find(config, t, idiom, "inductor")
            if ours is None:
                continue
            ind_ms = f"{ind['total_ms']:.3f}" if ind else "OOM"
            speed = f"{ind['total_ms'] / ours['total_ms']:.2f}x" if ind else "-"
            base_ms = f"{base['total_ms']:.3f}" if base else "-"
            vs = f"{base['total_ms'] / ours['total_ms']:.2f}x" if base else "-"
            mems = [x.get("total_peak_mib") if x else None for x in (ours, ind, base)]
            mem = " / ".join(f"{m:.0f}" if m is not None else "-" for m in mems)
            lines.append(
                f"| {config} | {t} | {idiom} | {ours['total_ms']:.3f} | {ind_ms} | {speed} | "
                f"{base_ms} | {vs} | {mem} |"
            )
    return "\n".join(lines)


def _value(rows: list[dict], case: str, provider: str, key: str) -> float:
    for r in rows:
        if r["case"] == case and r["provider"] == provider and key in r:
            return r[key]
    return float("nan")  # not run for this case, or out of memory


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in sorted({r["op"] for r in rows} - {"ccgqa-block"}):
        sub = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(r["case"] for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            fwd = [_value(sub, c, p, "fwd_ms") for c in cases]
            bwd = [_value(sub, c, p, "bwd_ms") for c in cases]
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
    blocks = [r for r in rows if r["op"] == "ccgqa-block" and not r.get("oom")]
    for config in dict.fromkeys(r["config"] for r in blocks):
        sub = [r for r in blocks if r["config"] == config]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        lines = dict.fromkeys((r["idiom"], r["provider"]) for r in sub)
        for idiom, provider in lines:
            pts = sorted(
                (r["seq_len"], r) for r in sub if (r["idiom"], r["provider"]) == (idiom, provider)
            )
            ts = [t for t, _ in pts]
            label = f"{provider} ({idiom})"
            style = "-" if provider == "ccgqa" else "--" if idiom != "uncompressed" else ":"
            axes[0].plot(ts, [r["total_ms"] for _, r in pts], style, marker="o", label=label)
            axes[1].plot(ts, [r["bwd_ms"] / r["total_ms"] for _, r in pts], style, marker="o")
            axes[2].plot(
                ts, [r.get("total_peak_mib", float("nan")) for _, r in pts], style, marker="o"
            )
        for ax, title in zip(
            axes, ("fwd+bwd ms", "backward share of fwd+bwd", "peak memory, fwd+bwd (MiB)")
        ):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T")
            ax.set_title(title)
        axes[0].set_yscale("log")
        if any("total_peak_mib" in r for r in sub):  # CUDA only
            axes[2].set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"CCGQA block {config}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"bench_ccgqa_block_{config.replace(' ', '_')}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ops", default="rmsnorm,swiglu,rope,attention", help=f"of {', '.join(OPS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--seq-lens", default="", help="attention sequence lengths, e.g. 2048,8192")
    ap.add_argument(
        "--block-configs",
        default="",
        help="ccgqa-block configs E:hq:hkv:C, comma-separated (default 2048:16:4:4,512:8:2:4)",
    )
    ap.add_argument(
        "--providers",
        default="",
        help="time only these providers, comma-separated (e.g. inductor,ccgqa; default: all)",
    )
    ap.add_argument(
        "--modes", default=",".join(MODES), help="fwd, fwd+bwd or both (each compiles apart)"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--save", default="bench-results", help="directory for bench.json, charts")
    ap.add_argument("--plot", action="store_true")
    results.add_results_argument(ap)


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Validate and convert the parsed options (``ap.error`` on a bad one)."""
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
    try:
        args.block_configs = tuple(
            tuple(int(v) for v in c.split(":")) for c in args.block_configs.split(",") if c
        )
    except ValueError:
        ap.error("--block-configs takes E:hq:hkv:C items, e.g. 2048:16:4:4")
    for cfg in args.block_configs:
        if len(cfg) != 4 or cfg[1] % cfg[2] or cfg[0] % (cfg[3] * cfg[1]):
            ap.error(
                f"--block-configs {':'.join(map(str, cfg))}: want E:hq:hkv:C with hq a "
                "multiple of hkv and E divisible by C * hq"
            )
    args.ops = ops
    args.modes = tuple(m for m in MODES if m in args.modes.split(","))
    if not args.modes:
        ap.error(f"--modes takes {', '.join(MODES)}")
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    args.providers = {p.strip() for p in args.providers.split(",") if p.strip()} or None
    return args


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    todo = [
        c
        for op in args.ops
        for c in cases(op, args.device, args.dtype, args.quick, args.seq_lens, args.block_configs)
    ]
    try:
        from tqdm import tqdm

        progress = tqdm(todo, desc="bench", unit="case")
    except ImportError:
        progress = todo
    os.makedirs(args.save, exist_ok=True)
    meta = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "dtype": str(args.dtype),
        "quick": args.quick,
        "time": results.now(),
        "commit": results.current_commit(),
    }
    if args.device == "cuda":
        warm_up_gpu()
    rows = []
    for case in progress:
        rows.extend(run_case(case, args.device, args.providers, args.modes))
        # rewritten after every case: a run cut short by a time limit keeps what it measured
        with open(os.path.join(args.save, "bench.json"), "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    if args.plot:
        plot(rows, args.save)
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['dtype']}")
    print(table(rows, meta["device"]))
    summary = block_summary(rows)
    if summary:
        print("\nCCGQA block, fwd+bwd:\n" + summary)
    common = {"date": meta["time"], "commit": meta["commit"], "device": meta["device"],
              "dtype": str(args.dtype).removeprefix("torch."),
              "source": getattr(args, "source", "python -m ccgqa_compile.bench")}  # fmt: skip
    target = results.results_target(args, args.device, args.quick)
    results.record(target, meta["device"], results.from_ops_rows(rows, **common))
    return rows
