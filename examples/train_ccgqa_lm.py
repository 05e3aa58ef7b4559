"""Main job: train a small CCGQA language model with backend="ccgqa".

The model is built from the plain-PyTorch pieces in ``patterns/``: HF-Llama RMSNorm, a
SwiGLU MLP and CCGQA attention (``patterns.ccgqa.CCGQAttention``: q/k/v down-projected into
a compressed latent space, causal convolutions, qk-mean coupling, L2 norm with a learnable
temperature, RoPE, causal GQA attention written by hand or with ``--attention sdpa``,
up-projection). It trains on Shakespeare's Sonnets, shipped in ``examples/data/``
(byte-level tokens, no download).

After the first (compiling) step it prints ``ccgqa_compile.report()``: which fusions fired.
At the end it writes a loss-curve PNG and a JSON log into ``--out``. ``--compare`` trains
the same model on the same batches in eager mode and under Inductor default too and prints
the speed ratios. CPU by default (one to two minutes on two cores, most of it the first,
compiling step), CUDA when present.

    python examples/train_ccgqa_lm.py
    python examples/train_ccgqa_lm.py --compare
    python examples/train_ccgqa_lm.py --device cuda --dtype bf16 --steps 1000 --dim 512

Several processes (gloo on CPU, NCCL on GPUs, one GPU per process): ``--ddp`` wraps the model
in DistributedDataParallel, ``--fsdp`` shards each block and the root with FSDP2's
``fully_shard``, then compiles it. ``--batch`` is per process; each process trains on its
own slice of one global batch; rank 0 prints and writes the outputs.

    torchrun --nproc-per-node 2 examples/train_ccgqa_lm.py --fsdp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ccgqa_compile  # noqa: E402
from patterns import Shape  # noqa: E402
from patterns.ccgqa import CCGQAttention  # noqa: E402
from patterns.rms_norm import LlamaRMSNorm  # noqa: E402
from patterns.swiglu import LlamaMLP  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to a line every tenth of the run
    tqdm = None

CORPUS = ROOT / "examples" / "data" / "sonnets.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("ccgqa", "inductor", "eager")  # --compare runs all three, in this order
KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # head dims the Triton attention kernel covers


# ----------------------------------------------------------------------------- the model


class CCGQABlock(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, dim: int, heads: int, kv_heads: int, head_dim: int, attention: str = "handwritten"
    ):
        super().__init__()
        shape = Shape(hidden=dim, eps=1e-6)
        self.attn_norm, self.mlp_norm = LlamaRMSNorm(shape), LlamaRMSNorm(shape)
        self.attn = CCGQAttention(dim, heads, kv_heads, head_dim, attention=attention)
        self.mlp = LlamaMLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CCGQALM(nn.Module):
    """Byte-level decoder LM whose attention is CCGQA (RoPE is applied inside it)."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        layers: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        attention: str = "handwritten",
    ):
        super().__init__()
        self.layers, self.head_dim, self.attention = layers, head_dim, attention
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            CCGQABlock(dim, heads, kv_heads, head_dim, attention) for _ in range(layers)
        )
        self.norm = LlamaRMSNorm(Shape(hidden=dim, eps=1e-6))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def expected_fusions(self) -> dict[str, int]:
        """What fires in one training graph: two norms per block plus the final one, one
        q/k prologue (convs, qk-mean, norm, temperature, RoPE), one attention core, one
        SwiGLU per block, each block whose prologue feeds a fused attention, and one value
        shift moved onto V per block."""
        from ccgqa_compile import config

        n = self.layers
        # an SDPA core is taken over only at small head dims (above, SDPA's cuDNN is faster)
        small = self.head_dim <= config.SDPA_MAX_HEAD_DIM
        attention = n if self.attention == "handwritten" or small else 0
        return {
            "ccgqa_prologue": n,
            "gqa_attention": attention,
            # a block counts with the core fused or kept on SDPA by policy
            "ccgqa_block": n,
            "rms_norm": 2 * n + 1,
            "swiglu": n,
            "value_shift": n,
        }


def build_model(args: argparse.Namespace) -> CCGQALM:
    return CCGQALM(
        256, args.dim, args.layers, args.heads, args.kv_heads, args.head_dim, args.attention
    )


# ------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train a small CCGQA language model with torch.compile(backend='ccgqa').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = ap.add_argument_group("model (head dim = dim / (heads * compression))")
    model.add_argument("--dim", type=int, default=128, help="model width E")
    model.add_argument("--layers", type=int, default=2, help="decoder blocks")
    model.add_argument("--heads", type=int, default=4, help="query heads")
    model.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    model.add_argument(
        "--compression", type=int, default=2, help="query compression C1 = dim / (heads * d)"
    )
    model.add_argument(
        "--attention",
        choices=("handwritten", "sdpa"),
        default="handwritten",
        help="the attention core as written in the model: softmax(q k^T) v by hand, or "
        "F.scaled_dot_product_attention(enable_gqa=True)",
    )
    train = ap.add_argument_group("training")
    train.add_argument("--steps", type=int, default=300, help="optimizer steps; the first compiles")
    train.add_argument("--batch", type=int, default=8, help="sequences per step")
    train.add_argument("--seq", type=int, default=128, help="tokens (bytes) per sequence")
    train.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    train.add_argument("--seed", type=int, default=0, help="weights and batch order")
    run = ap.add_argument_group("run")
    run.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N",
    )
    run.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations"
    )
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch; 0: torch's default (one per core). This model's ops are "
        "too small to gain from more than one, and on a busy machine idle OpenMP threads spin: "
        "2 threads ran 5x slower than 1 on a loaded 2-core box",
    )
    run.add_argument(
        "--compare",
        action="store_true",
        help="also train in eager mode and under Inductor default; print speed ratios",
    )
    parallel = run.add_mutually_exclusive_group()
    parallel.add_argument(
        "--ddp",
        action="store_true",
        help="under torchrun: DistributedDataParallel (gloo on CPU, NCCL on GPUs)",
    )
    parallel.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: FSDP2, fully_shard on each block and the root",
    )
    run.add_argument("--out", default="runs/train_ccgqa_lm", help="folder for the PNG, the JSON log and the trained model (model.pt)")
    run.add_argument(
        "--sample", type=int, default=200, help="bytes of text to generate at the end (0: none)"
    )
    args = ap.parse_args(argv)

    for name in ("dim", "layers", "heads", "kv_heads", "compression", "batch", "seq"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.steps < 2:
        ap.error(f"--steps must be at least 2 (the first step compiles), got {args.steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        ap.error(f"--lr must be a positive number, got {args.lr}")
    if args.threads < 0:
        ap.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.sample < 0:
        ap.error(f"--sample must be 0 or more, got {args.sample}")
    if args.heads % args.kv_heads:
        ap.error(
            f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}: "
            "each key/value head serves a whole group of query heads"
        )
    latent = args.heads * args.compression
    if args.dim % latent:
        ap.error(
            f"--dim {args.dim} is not divisible by --heads x --compression = {latent}: "
            "the head dim is dim / (heads * compression)"
        )
    args.head_dim = args.dim // latent
    if args.head_dim % 2:
        ap.error(
            f"head dim {args.head_dim} (= dim / (heads * compression)) must be even for RoPE; "
            "change --dim, --heads or --compression"
        )

    args.device = args.device.lower()
    kind, _, index = args.device.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        ap.error(f"unknown device {args.device!r}: use cpu, cuda or cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            ap.error(f"--device {args.device} asked for, but torch sees no CUDA GPU; use cpu")
        if index and int(index) >= torch.cuda.device_count():
            ap.error(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible")

    corpus_bytes = CORPUS.stat().st_size if CORPUS.exists() else 0
    if corpus_bytes == 0:
        ap.error(f"training text {CORPUS} is missing or empty")
    if args.seq + 1 > corpus_bytes:
        ap.error(f"--seq {args.seq} is longer than the corpus ({corpus_bytes} bytes) allows")

    args.parallel = "ddp" if args.ddp else "fsdp" if args.fsdp else None
    if args.parallel:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            ap.error(
                f"--{args.parallel} runs one process per device under torchrun: "
                f"torchrun --nproc-per-node N examples/train_ccgqa_lm.py --{args.parallel}"
            )
        if args.compare:
            ap.error(f"--compare runs in one process, not with --{args.parallel}")
        if kind == "cuda":
            if index:
                ap.error(f"--device {args.device}: with --{args.parallel} each process "
                         "takes the GPU of its local rank; pass --device cuda")  # fmt: skip
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                ap.error(f"local rank {local}: only {torch.cuda.device_count()} GPU(s) visible")
            args.device = f"cuda:{local}"

    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out {args.out} exists and is not a folder")
    return args


# ---------------------------------------------------------------------- several processes


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def parallelize(model: CCGQALM, args: argparse.Namespace) -> nn.Module:
    """``--ddp``: the model wrapped in DDP (to be compiled whole; DDPOptimizer splits the
    graph at DDP's bucket boundaries). ``--fsdp``: each block, then the root, sharded with
    FSDP2 in place (Dynamo then compiles one graph per block code, run for every block)."""
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(args.device).index] if args.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


# --------------------------------------------------------------------------- data, timing


def batch_starts(corpus_len: int, args: argparse.Namespace) -> list[torch.Tensor]:
    """Offsets of every batch of the run, drawn once so that every provider sees the same.
    Under torchrun: one global batch of world x --batch per step, this rank's slice."""
    rank, world = rank_and_world()
    generator = torch.Generator().manual_seed(args.seed)
    high = corpus_len - args.seq  # a window of seq + 1 bytes: inputs and shifted targets
    mine = slice(rank * args.batch, (rank + 1) * args.batch)
    return [
        torch.randint(0, high, (args.batch * world,), generator=generator)[mine]
        for _ in range(args.steps)
    ]


def get_batch(data: torch.Tensor, starts: torch.Tensor, seq: int, device: str):
    idx = starts[:, None] + torch.arange(seq + 1)
    chunk = data[idx].to(device, non_blocking=True)
    return chunk[:, :-1], chunk[:, 1:]


class PlainProgress:
    """What the loop needs of tqdm, printing a line every tenth of the run."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.every = max(1, total // 10)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            print(f"{self.desc}: {self.n}/{self.total} {self.postfix}", flush=True)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


class Silent(PlainProgress):
    """The progress of a rank other than 0: nothing printed."""

    def __init__(self):
        super().__init__(1, "")

    def update(self, n: int = 1) -> None:
        pass

    def write(self, text: str) -> None:
        pass


def progress(total: int, desc: str):
    if rank_and_world()[0] != 0:
        return Silent()
    if tqdm is None:
        return PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


@contextlib.contextmanager
def no_compile_caches():
    """A graph served from Inductor's caches skips the ccgqa passes and leaves no record in
    the fusion report; compile afresh so the report always shows what fired (and compile
    times of the two compiled providers compare like for like)."""
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ training


def train(provider: str, args: argparse.Namespace, data: torch.Tensor, starts) -> dict:
    """Train a fresh model (same seed, same batches) with one provider; per-step records."""
    torch._dynamo.reset()  # each provider compiles from scratch
    torch.manual_seed(args.seed)
    model = build_model(args).to(device=args.device, dtype=DTYPES[args.dtype])
    step_model = parallelize(model, args) if args.parallel else model
    if provider == "ccgqa":
        step_model = torch.compile(step_model, backend="ccgqa")
        ccgqa_compile.reset_report()
    elif provider == "inductor":
        step_model = torch.compile(step_model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rank, world = rank_and_world()
    tokens = args.batch * args.seq * world
    losses, seconds = [], []
    bar = progress(args.steps, desc=f"{provider:>8}")
    with no_compile_caches():
        for step in range(args.steps):
            x, y = get_batch(data, starts[step], args.seq, args.device)
            synchronize(args.device)
            start = time.perf_counter()
            logits = step_model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if world > 1:  # the global batch's loss: the mean of the ranks'
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            losses.append(loss.item())  # .item() waits for the device
            seconds.append(time.perf_counter() - start)
            bar.set_postfix_str(f"loss {losses[-1]:.3f}  {tokens / seconds[-1]:,.0f} tok/s")
            bar.update()
            if step == 0 and provider == "ccgqa":
                bar.write(f"first step (compiles) took {seconds[0]:.1f} s")
                bar.write(str(ccgqa_compile.report()))
                bar.write(f"expected per training graph: {model.expected_fusions()}")
    bar.close()
    if rank == 0 and not all(math.isfinite(v) for v in losses):
        print(f"warning: {provider} loss went non-finite; try a lower --lr", file=sys.stderr)
    warm = statistics.median(seconds[1:])
    tail = losses[-max(1, args.steps // 10) :]
    return {
        "model": model,
        "losses": losses,
        "step_seconds": seconds,
        "step_tokens_per_s": [tokens / s for s in seconds],
        "first_step_s": seconds[0],
        "median_step_ms": warm * 1e3,
        "tokens_per_s": tokens / warm,
        "total_s": sum(seconds),
        "final_loss": losses[-1],
        "final_loss_mean_last_10pct": sum(tail) / len(tail),
    }


@torch.no_grad()
def generate(model: CCGQALM, prompt: bytes, n: int, seq: int, device: str, seed: int) -> str:
    """Sample n bytes (temperature 0.8) from the trained model, run eagerly."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    for _ in range(n):
        logits = model(tokens[:, -seq:])[:, -1].float() / 0.8
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        tokens = torch.cat((tokens, nxt), dim=1)
    model.train()
    return bytes(tokens[0].tolist()).decode("ascii", errors="replace")


# ------------------------------------------------------------------------------- outputs


def plot(runs: dict[str, dict], path: pathlib.Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return False
    fig, (ax_loss, ax_speed) = plt.subplots(
        1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.2, 1]}
    )
    styles = ("-", "--", ":")  # the curves nearly coincide: dashes keep each one visible
    for i, (name, run) in enumerate(runs.items()):
        label = name
        if name != "eager" and "loss_max_abs_diff_vs_eager" in run:
            label += f" (max |diff| vs eager {run['loss_max_abs_diff_vs_eager']:.1e})"
        steps = range(len(run["losses"]))
        ax_loss.plot(steps, run["losses"], styles[i % 3], color=f"C{i}", label=label, lw=1.3)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats per byte)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    names = list(runs)
    colors = [f"C{i}" for i in range(len(names))]
    bars = ax_speed.bar(names, [runs[n]["tokens_per_s"] for n in names], color=colors)
    ax_speed.bar_label(bars, fmt="%.0f")
    ax_speed.set_ylabel("tokens/s (median step after the first)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parallel:
        if args.device.startswith("cuda"):
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        if rank_and_world()[0] == 0:
            return run_job(args)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return run_job(args)  # every rank trains (and samples: FSDP2 gathers weights)
    finally:
        torch.set_num_threads(threads)
        if args.parallel:
            dist.destroy_process_group()


def run_job(args: argparse.Namespace) -> dict:
    if args.device == "cpu":
        # a CPU demo: fuse anyway so the report shows the fusions (on CPU the fused ops run
        # their exact composite fallback, which is not faster than Inductor's own CPU code)
        os.environ.setdefault("CCGQA_FUSE_ON_CPU", "1")
    text = CORPUS.read_bytes()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    starts = batch_starts(len(data), args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    n_params = sum(p.numel() for p in build_model(args).parameters())
    device_name = torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu"
    print(
        f"CCGQA LM: {args.layers} layers, width {args.dim}, {args.heads} query / "
        f"{args.kv_heads} kv heads of dim {args.head_dim} (latent q {args.heads * args.head_dim}"
        f", kv {args.kv_heads * args.head_dim}), {n_params / 1e6:.2f} M parameters\n"
        f"data: {CORPUS.name}, {len(text):,} bytes; {args.steps} steps of {args.batch} x "
        f"{args.seq} bytes; {args.dtype} on {device_name}"
        + (f", {torch.get_num_threads()} CPU thread(s)" if args.device == "cpu" else "")
    )
    rank, world = rank_and_world()
    if args.parallel:
        print(
            f"{args.parallel.upper()} over {world} processes ({dist.get_backend()}): each step "
            f"{world} x {args.batch} sequences; the report and outputs are rank 0's"
        )
    if args.device != "cpu" and args.head_dim not in KERNEL_HEAD_DIMS:
        print(f"note: head dim {args.head_dim} runs the attention op's composite, not Triton")

    providers = PROVIDERS if args.compare else ("ccgqa",)
    runs = {}
    for provider in providers:
        runs[provider] = train(provider, args, data, starts)
        if provider == "ccgqa":
            fusions = ccgqa_compile.report().counts()
            idioms = {f"{f}/{i}": n for (f, i), n in ccgqa_compile.report().idioms().items()}
            expected = runs[provider]["model"].expected_fusions()

    header = (
        f"{'provider':<9} {'1st step s':>10} {'step ms':>9} {'tokens/s':>10} {'final loss':>11}"
    )
    print(f"\n{header}")
    for name, run in runs.items():
        print(
            f"{name:<9} {run['first_step_s']:>10.1f} {run['median_step_ms']:>9.1f} "
            f"{run['tokens_per_s']:>10.0f} {run['final_loss_mean_last_10pct']:>11.4f}"
        )
    print("(step ms and tokens/s: median over the steps after the first; final loss: mean of")
    print(" the last tenth of the steps)")
    ratios = {}
    if args.compare:
        speed = {name: run["tokens_per_s"] for name, run in runs.items()}
        best = max(speed["eager"], speed["inductor"])
        ratios = {
            "ccgqa_vs_eager": speed["ccgqa"] / speed["eager"],
            "ccgqa_vs_inductor": speed["ccgqa"] / speed["inductor"],
            "ccgqa_vs_best_baseline": speed["ccgqa"] / best,
            "inductor_vs_eager": speed["inductor"] / speed["eager"],
        }
        print(
            "speed (tokens/s) ratios: "
            + ", ".join(f"{k.replace('_vs_', ' / ')} {v:.2f}x" for k, v in ratios.items())
        )
        if args.device == "cpu":
            print(
                "(on CPU the fused ops run their exact composite fallback, so these ratios say "
                "little; the Triton kernels run on CUDA)"
            )
        eager = runs["eager"]["losses"]
        for run in runs.values():
            run["loss_max_abs_diff_vs_eager"] = max(
                abs(a - b) for a, b in zip(run["losses"], eager)
            )
        print(
            "same batches, same initial weights; largest loss difference from eager over the run: "
            + ", ".join(f"{n} {runs[n]['loss_max_abs_diff_vs_eager']:.1e}" for n in PROVIDERS[:2])
        )

    sample = ""
    if args.sample:
        prompt = b"From fairest creatures"
        sample = generate(runs["ccgqa"]["model"], prompt, args.sample, args.seq, args.device, 0)
        print(f"\nsample from the trained model:\n{sample}\n")

    # the --ddp / --fsdp switches are logged when used (a plain run's log stays as it was)
    switches = () if args.parallel else ("ddp", "fsdp", "parallel")
    config = {k: v for k, v in vars(args).items() if k not in switches}
    title = (
        f"CCGQA LM {args.layers}x{args.dim}, heads {args.heads}/{args.kv_heads}, d "
        f"{args.head_dim}, {args.batch}x{args.seq} bytes, {args.dtype} on {device_name}"
    )
    png = out / "loss_curve.png"
    wrote_png = rank == 0 and plot(runs, png, title)
    log = {
        "script": "examples/train_ccgqa_lm.py",
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "parameters": n_params,
        "corpus": {"file": str(CORPUS.relative_to(ROOT)), "bytes": len(text)},
        "device": args.device,
        "device_name": device_name,
        "torch_version": torch.__version__,
        "ccgqa_compile_version": ccgqa_compile.__version__,
        "python_version": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "fuse_on_cpu": os.environ.get("CCGQA_FUSE_ON_CPU", ""),
        "fusions": fusions,
        "fusion_idioms": idioms,
        "fusions_expected": expected,
        "providers": {
            name: {k: v for k, v in run.items() if k != "model"} for name, run in runs.items()
        },
        "speed_ratios": ratios,
        "sample": sample,
        "loss_curve_png": str(png) if wrote_png else None,
    }
    if args.parallel:
        log["distributed"] = {
            "mode": args.parallel,
            "world_size": world,
            "backend": dist.get_backend(),
        }
    if rank == 0:
        log_path = out / "train_log.json"
        log_path.write_text(json.dumps(log, indent=1) + "\n")
        print(f"wrote {log_path}" + (f" and {png}" if wrote_png else ""))
    if rank == 0 and not args.parallel:  # examples/generate_ccgqa.py reads it
        trained = runs["ccgqa"]["model"]
        trained = getattr(trained, "_orig_mod", trained)
        torch.save({"model": trained.state_dict()}, out / "model.pt")
    return log


if __name__ == "__main__":
    main()
