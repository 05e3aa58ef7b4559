"""Main job: train a small Llama-style LM a few steps with backend="ccgqa".

Builds ``patterns.blocks.TinyLM`` (RMSNorm, RoPE, GQA attention, SwiGLU as users write
them), trains it on the bytes of this repository's README (byte-level tokens, no download),
prints the fusion report and the step time. CPU by default, CUDA when present.

    python examples/train_small_lm.py [--steps 20] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ccgqa_compile  # noqa: E402
from patterns.blocks import LMConfig, TinyLM  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def byte_batches(text: bytes, batch: int, seq: int, device: str, generator: torch.Generator):
    data = torch.tensor(list(text), dtype=torch.long)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).to(device)
        yield chunk[:, :-1], chunk[:, 1:]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        ap.error(f"unknown device {args.device!r}: use cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch sees no CUDA GPU")
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step compiles)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        # a CPU demo: fuse anyway to show the report (on CPU the fused ops run their exact
        # composite fallback, which is not faster than Inductor's own CPU code)
        os.environ.setdefault("CCGQA_FUSE_ON_CPU", "1")
    try:
        cfg = LMConfig(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    torch.manual_seed(0)
    model = TinyLM(cfg).to(device=args.device, dtype=DTYPES[args.dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    compiled = torch.compile(model, backend="ccgqa")
    text = (ROOT / "README.md").read_bytes()
    batches = byte_batches(
        text, args.batch, args.seq, args.device, torch.Generator().manual_seed(0)
    )

    ccgqa_compile.reset_report()
    losses, times = [], []
    for step in range(args.steps):
        x, y = next(batches)
        start = time.perf_counter()
        logits = compiled(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step == 0:
            print(ccgqa_compile.report())
            print(f"(expected per graph: {model.expected_fusions()})")
        print(f"step {step:3d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:8.1f} ms", flush=True)
    warm = sorted(times[1:])[len(times[1:]) // 2]
    tokens = args.batch * args.seq
    print(f"median warm step {warm * 1e3:.1f} ms, {tokens / warm:.0f} tokens/s on {args.device}")
    return {"losses": losses, "step_ms": warm * 1e3, "fusions": ccgqa_compile.report().counts()}


if __name__ == "__main__":
    main()
