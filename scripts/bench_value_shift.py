"""What the value shift costs a compiled CCGQA block, and what moving it onto V saves
(CUDA only).

    python scripts/bench_value_shift.py [--configs 2048:16:4:4,512:8:2:4] [--seq-len 2048]

For each config, the block (patterns/ccgqa.py ``CCGQAttention``, hand-written core) under
``backend="ccgqa"``, fwd+bwd timed in one process as CUDA-graph medians:
  * with the value shift, rewritten onto V (passes/value_shift.py, the default), V's
    two halves then one matmul; and the same with the two matmuls kept;
  * with the value shift as written (``ccgqa_disable=["value_shift"]``);
  * without a value shift (one V projection of the same width: the same FLOPs), the
    bound on what any fold of the shift can save;
plus the kernels of each shifted variant whose names show the shift (``constant_pad_nd`` /
``slice``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # patterns/

import ccgqa_compile  # noqa: E402,F401  (registers backend="ccgqa")
from ccgqa_compile.bench import cuda_kernel_breakdown  # noqa: E402
from ccgqa_compile.passes import value_shift  # noqa: E402
from patterns.ccgqa import CCGQAttention  # noqa: E402

merge_halves = value_shift._merge_with_sibling_projection

TOKENS = 32768


def block_step(dim, heads, kv_heads, compression, seq_len, value_shift, disable):
    head_dim = dim // compression // heads
    model = CCGQAttention(dim, heads, kv_heads, head_dim, value_shift=value_shift)
    model = model.to("cuda", torch.bfloat16)
    compiled = torch.compile(model, backend="ccgqa", options={"ccgqa_disable": disable})
    x = torch.randn(max(1, TOKENS // seq_len), seq_len, dim, device="cuda", dtype=torch.bfloat16)
    x.requires_grad_()
    grad = torch.randn_like(x)
    params = [x, *model.parameters()]

    def step():
        compiled(x).backward(grad)

    step()
    step()
    return step, params


# (label, value shift, fusions disabled, V's halves merged into one matmul)
VARIANTS = (
    ("shift moved, one V mm", True, [], True),
    ("shift moved, two V mm", True, [], False),
    ("shift as written", True, ["value_shift"], False),
    ("no shift", False, [], False),
)


def never(*_args) -> bool:
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="2048:16:4:4,512:8:2:4")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    for spec in args.configs.split(","):
        dim, heads, kv_heads, compression = (int(p) for p in spec.split(":"))
        print(f"E{dim} hq{heads} hkv{kv_heads} C{compression} T{args.seq_len}, fwd+bwd:")
        for label, shift, disable, merge in VARIANTS:
            # the merge is part of the value_shift rewrite, with no switch of its own
            value_shift._merge_with_sibling_projection = merge_halves if merge else never
            step, params = block_step(
                dim, heads, kv_heads, compression, args.seq_len, shift, disable
            )
            ms = triton.testing.do_bench_cudagraph(step, grad_to_none=params, return_mode="median")
            print(f"  {label:20s} {ms:.3f} ms")
            if shift:
                events, _total = cuda_kernel_breakdown(step, steps=5)
                for e in events:
                    if "constant_pad_nd" in e.key or "slice" in e.key:
                        print(f"      {e.device_time_total / 5 / 1e3:.4f} ms  {e.key[:100]}")
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
