"""Generate text with the corpus CCGQA LM over static caches, compiled with backend="ccgqa".

The model is the main job's (``examples/train_ccgqa_lm.py``: CCGQA attention, RMSNorm,
SwiGLU, byte-level tokens), loaded from ``--checkpoint`` (a ``torch.save``d state dict; its
sizes are read off the weights), else a fresh model with the main job's defaults and seed.

Decoding is written in plain PyTorch, gpt-fast style, beside the trained modules and on
their parameters (``CCGQADecoder``): per layer a static K/V cache ``(B, Hkv, max_len, d)``
updated with ``index_copy_``, the conv state (the last (k1-1)+(k2-1) pre-conv q/k columns:
a one-token step runs both convolutions over ``cat(conv_state, new columns)``, unpadded)
and the value-shift state (the previous token's delayed V projection). ``prefill`` runs
the prompt through the model's own forward and fills them; ``decode`` takes one token:
new q/k columns, convs over the state, qk-mean, L2 norm, temperature, RoPE at the token's
position, cache write, SDPA over the whole cache with a bool row of a causal table. The
position is a tensor, so every decode step runs the one compiled graph.

The run checks the decode path against the model's full-sequence forward (logits at every
position, eager float64), generates greedily with ``prefill`` and ``decode`` each compiled
by ``torch.compile(..., backend="ccgqa")`` (``mode="reduce-overhead"``, CUDA graphs, on a
GPU), prints what fused in the prefill and decode graphs, checks that the greedy tokens are
eager's token by token, and prints tokens/s of warm calls (the compiling ones excluded).
CPU by default (about a minute on two cores, most of it compiling), CUDA when asked.

    python examples/generate_ccgqa.py
    python examples/generate_ccgqa.py --compare --new-tokens 100
    python examples/generate_ccgqa.py --device cuda --dtype bf16 --checkpoint model.pt
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import pathlib
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ccgqa_compile  # noqa: E402
from examples.train_ccgqa_lm import CCGQALM, no_compile_caches, synchronize  # noqa: E402
from patterns.ccgqa import CCGQAttention, _l2norm  # noqa: E402
from patterns.rope import rotary_tables  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# where the main job's model would be saved (its --out); read when present
DEFAULT_CHECKPOINT = pathlib.Path("runs/train_ccgqa_lm/model.pt")
PROMPT = "From fairest creatures"
# decode calls before the timed run: the first compiles, CUDA graphs record on a later one
WARMUP_DECODE_CALLS = 3


# ------------------------------------------------------------------- the decode path


class CachedCCGQAttention(nn.Module):
    """One trained ``CCGQAttention`` (its parameters, not a copy) with the decode state."""

    def __init__(self, attn: CCGQAttention, batch: int, max_len: int):
        super().__init__()
        unsupported = {
            "qk_concat": attn.qk_concat,
            "causal": not attn.causal,
            "conv_padding": attn.conv_padding != "causal",
            "value_shift_tokens": attn.value_shift and attn.value_shift_tokens != 1,
            "mean_grouping": attn.mean_grouping != "contiguous",
        }
        if any(unsupported.values()):
            bad = [name for name, flag in unsupported.items() if flag]
            raise ValueError(f"decode path written for canonical CCGQA; not for {bad}")
        self.attn = attn
        weight = attn.q_proj.weight
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.state_len = (attn.k1 - 1) + (attn.k2 - 1)
        self.register_buffer(
            "k_cache", torch.zeros(batch, attn.h_kv, max_len, attn.d, **kw), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(batch, attn.h_kv, max_len, attn.d, **kw), persistent=False
        )
        self.register_buffer(
            "conv_state",
            torch.zeros(batch, attn.e_q + attn.e_kv, self.state_len, **kw),
            persistent=False,
        )
        v_prev = torch.zeros(batch, 1, attn.e_kv // 2 if attn.value_shift else 0, **kw)
        self.register_buffer("v_prev", v_prev, persistent=False)

    def reset(self) -> None:
        for buf in (self.k_cache, self.v_cache, self.conv_state, self.v_prev):
            buf.zero_()

    def _norm_temperature(self, q, k):
        a = self.attn
        q = _l2norm(q, a.l2norm) * math.sqrt(a.d)
        k = _l2norm(k, a.l2norm) * math.sqrt(a.d)
        if a.temp is not None:
            beta = a.temp.exp() if a.temperature == "exp" else a.temp
            k = k * beta.view(1, 1, a.h_kv, 1)
        return q, k

    def prefill(self, x, input_pos, cos, sin):
        """The trained module's forward over the prompt (positions ``input_pos``, from 0),
        writing the K/V caches, the conv state and the value-shift state on the way."""
        a = self.attn
        b, t, _ = x.shape
        if t < a.k2 - 1 and a.q_conv1.bias is not None:
            # the state keeps pre-conv columns: conv1's output before the start (zero
            # padding, not conv1's bias) would be lost to the decode steps after
            raise ValueError(f"a prompt of {t} tokens is shorter than conv2's reach {a.k2 - 1}")
        q_pre, k_pre = a.q_proj(x), a.k_proj(x)
        if a.value_shift:
            x_prev = F.pad(x, (0, 0, 1, 0))[:, :t]  # x_{t-1}, zero before the start
            v = torch.cat((a.v_proj_now(x), a.v_proj_prev(x_prev)), dim=-1)
            self.v_prev.copy_(a.v_proj_prev(x[:, -1:]))
        else:
            v = a.v_proj(x)
        columns = torch.cat((q_pre, k_pre), dim=-1).transpose(1, 2)  # (B, eq + ekv, T)
        self.conv_state.copy_(F.pad(columns, (self.state_len, 0))[..., -self.state_len :])
        q, k = a._conv_qk(q_pre, k_pre)
        q, k = q.view(b, t, a.h_q, a.d), k.view(b, t, a.h_kv, a.d)
        if a.qk_mean:
            m_q, m_k = a._qk_mean(q_pre, k_pre, b, t)
            q, k = q + m_q, k + m_k
        q, k = self._norm_temperature(q, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, d)
        v = v.view(b, t, a.h_kv, a.d).transpose(1, 2)
        if a.rotary_dim:
            q, k = a._rope(q, cos, sin), a._rope(k, cos, sin)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        o = a._attend(q, k, v)
        return a.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def decode(self, x, input_pos, cos, sin, mask):
        """One new token ``x`` (B, 1, E) at position ``input_pos`` (a 1-element tensor)."""
        a = self.attn
        b = x.shape[0]
        q_pre, k_pre = a.q_proj(x), a.k_proj(x)
        if a.value_shift:
            v = torch.cat((a.v_proj_now(x), self.v_prev), dim=-1)
            self.v_prev.copy_(a.v_proj_prev(x))
        else:
            v = a.v_proj(x)
        # both causal convs over the state and the new column, unpadded: one output column
        columns = torch.cat((q_pre, k_pre), dim=-1).transpose(1, 2)  # (B, eq + ekv, 1)
        window = torch.cat((self.conv_state, columns), dim=-1)
        self.conv_state.copy_(window[..., 1:])
        outs = []
        for part, conv1, conv2 in zip(
            window.split((a.e_q, a.e_kv), dim=1),
            (a.q_conv1, a.k_conv1),
            (a.q_conv2, a.k_conv2),
        ):
            y = F.conv1d(part, conv1.weight, conv1.bias, groups=conv1.groups)
            outs.append(F.conv1d(y, conv2.weight, conv2.bias, groups=conv2.groups))
        q = outs[0].transpose(1, 2).reshape(b, 1, a.h_q, a.d)
        k = outs[1].transpose(1, 2).reshape(b, 1, a.h_kv, a.d)
        if a.qk_mean:
            m_q, m_k = a._qk_mean(q_pre, k_pre, b, 1)
            q, k = q + m_q, k + m_k
        q, k = self._norm_temperature(q, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, 1, d)
        v = v.view(b, 1, a.h_kv, a.d).transpose(1, 2)
        if a.rotary_dim:
            q, k = a._rope(q, cos, sin), a._rope(k, cos, sin)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        o = F.scaled_dot_product_attention(
            q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=a.h_q > a.h_kv
        )
        return a.o_proj(o.transpose(1, 2).reshape(b, 1, -1))

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "k_cache": self.k_cache,
            "v_cache": self.v_cache,
            "conv_state": self.conv_state,
            "v_prev": self.v_prev,
        }


class CCGQADecoder(nn.Module):
    """A trained ``CCGQALM`` (shared, not copied) with static caches for ``batch``
    sequences of up to ``max_len`` tokens: ``prefill`` then one ``decode`` per token."""

    def __init__(self, lm: CCGQALM, batch: int, max_len: int):
        super().__init__()
        self.lm, self.batch, self.max_len = lm, batch, max_len
        self.layers = nn.ModuleList(CachedCCGQAttention(b.attn, batch, max_len) for b in lm.blocks)
        weight = lm.head.weight
        attn = lm.blocks[0].attn
        rotary_dim = attn.rotary_dim or 2  # tables unused without RoPE
        # the same tables the module computes for a whole sequence (float32, then cast)
        cos, sin = rotary_tables(max_len, rotary_dim, weight.device, weight.dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=weight.device).tril()
        self.register_buffer("causal", causal, persistent=False)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def prefill(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of the prompt ``tokens`` (B, T) at positions ``input_pos``
        (``arange(T)``); fills every layer's caches."""
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        x = self.lm.embed(tokens)
        for block, layer in zip(self.lm.blocks, self.layers):
            x = x + layer.prefill(block.attn_norm(x), input_pos, cos, sin)
            x = x + block.mlp(block.mlp_norm(x))
        return self.lm.head(self.lm.norm(x))

    def decode(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, vocab) of one new ``token`` (B, 1) at ``input_pos`` (shape (1,))."""
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        mask = self.causal[input_pos][None, None]  # (1, 1, 1, max_len): positions <= pos
        x = self.lm.embed(token)
        for block, layer in zip(self.lm.blocks, self.layers):
            x = x + layer.decode(block.attn_norm(x), input_pos, cos, sin, mask)
            x = x + block.mlp(block.mlp_norm(x))
        return self.lm.head(self.lm.norm(x))

    def state(self) -> list[dict[str, torch.Tensor]]:
        return [layer.state() for layer in self.layers]


@torch.no_grad()
def decode_path_error(lm: CCGQALM, tokens: torch.Tensor, prompt_len: int) -> float:
    """Largest |difference| between the logits of prefill(tokens[:, :prompt_len]) then one
    decode per further token, and the model's forward over all of ``tokens``, relative to
    the largest logit; eager float64 on a copy of ``lm``."""
    lm64 = copy.deepcopy(lm).double().eval()
    for block in lm64.blocks:
        # the same function, all in float64: the hand-written core takes its softmax in
        # float32 (x.float()), which would be the error measured here
        block.attn.attention = "sdpa"
    b, t = tokens.shape
    decoder = CCGQADecoder(lm64, b, t)
    want = lm64(tokens)
    got = [decoder.prefill(tokens[:, :prompt_len], torch.arange(prompt_len, device=tokens.device))]
    for pos in range(prompt_len, t):
        got.append(
            decoder.decode(tokens[:, pos : pos + 1], torch.tensor([pos], device=tokens.device))
        )
    got = torch.cat(got, dim=1)
    return ((got - want).abs().max() / want.abs().max()).item()


# -------------------------------------------------------------------------- generation


def greedy(
    decoder: CCGQADecoder,
    prefill: Callable,
    decode: Callable,
    prompt: torch.Tensor,
    new_tokens: int,
    timed: bool = False,
    keep_states: bool = False,
) -> dict:
    """Greedy tokens (B, new_tokens) after ``prompt`` (B, P), through the given prefill and
    decode functions (the decoder's methods, compiled or not); per-call seconds; with
    ``keep_states``, a copy of the caches after each call (outside the timed region)."""
    device = prompt.device
    decoder.reset()
    p = prompt.shape[1]
    if p + new_tokens - 1 > decoder.max_len:
        raise ValueError(f"{p} + {new_tokens} - 1 tokens do not fit a cache of {decoder.max_len}")
    seconds, margins, states = [], [], []

    def keep():
        if keep_states:
            states.append([{k: v.clone() for k, v in s.items()} for s in decoder.state()])

    def pick(logits):
        top2 = logits.float().topk(2, dim=-1).values  # how close the greedy choice was
        margins.append((top2[..., 0] - top2[..., 1]).min().item())
        return logits.argmax(-1, keepdim=True)

    with torch.no_grad():
        synchronize(str(device))
        start = time.perf_counter()
        token = pick(prefill(prompt, torch.arange(p, device=device))[:, -1])
        synchronize(str(device))
        seconds.append(time.perf_counter() - start)
        keep()
        out = [token]
        for pos in range(p, p + new_tokens - 1):
            input_pos = torch.tensor([pos], device=device)
            start = time.perf_counter()
            token = pick(decode(token, input_pos)[:, -1])
            if timed:
                synchronize(str(device))
            seconds.append(time.perf_counter() - start)
            keep()
            out.append(token)
        synchronize(str(device))
    out = torch.cat(out, dim=1)
    return {"tokens": out, "seconds": seconds, "margins": margins, "states": states}


def compile_decoder(decoder: CCGQADecoder, backend: str, mode: str | None):
    """``prefill`` and ``decode`` compiled apart, whole graphs, static shapes."""
    kwargs = {"backend": backend, "fullgraph": True, "dynamic": False}
    prefill = torch.compile(decoder.prefill, **kwargs)
    decode = torch.compile(decoder.decode, mode=mode if mode != "default" else None, **kwargs)
    return prefill, decode


def graph_counts(graphs) -> dict[str, int]:
    out: Counter = Counter()
    for g in graphs:
        for (fusion, _idiom), n in g.fused.items():
            out[fusion] += n * g.sites
    return dict(sorted(out.items()))


def run_provider(
    provider: str, decoder, prompt, new_tokens: int, mode: str, keep_states: bool = False
) -> dict:
    """Warm up (compiles), then a timed greedy run. For "ccgqa", which graphs were the
    prefill's and which the decode's, from the fusion report. ``keep_states``: the caches
    after every call of the timed run, in ``"states"``."""
    torch._dynamo.reset()
    if provider == "eager":
        prefill, decode = decoder.prefill, decoder.decode
    else:
        prefill, decode = compile_decoder(decoder, provider, mode)
    if provider == "ccgqa":
        ccgqa_compile.reset_report()
    phases, report = {}, ""
    with no_compile_caches():
        start = time.perf_counter()
        with torch.no_grad():
            prefill(prompt, torch.arange(prompt.shape[1], device=prompt.device))
        n_prefill = len(ccgqa_compile.report().graphs)
        warm = greedy(decoder, prefill, decode, prompt, 1 + WARMUP_DECODE_CALLS)
        warmup_s = time.perf_counter() - start
        run = greedy(decoder, prefill, decode, prompt, new_tokens, True, keep_states)
    if provider == "ccgqa":  # any recompile in the timed run would show here too
        graphs = ccgqa_compile.report().graphs
        phases = {"prefill": graphs[:n_prefill], "decode": graphs[n_prefill:]}
        report = str(ccgqa_compile.report())
    decode_s = run["seconds"][1:]
    b = prompt.shape[0]
    return {
        "tokens": run["tokens"],
        "warm_tokens": warm["tokens"],
        "margins": run["margins"],
        "warmup_s": warmup_s,
        "prefill_ms": run["seconds"][0] * 1e3,
        "decode_ms": statistics.median(decode_s) * 1e3 if decode_s else float("nan"),
        "tokens_per_s": b * len(decode_s) / sum(decode_s) if decode_s else float("nan"),
        "phases": phases,
        "report": report,
        "states": run["states"],
    }


# --------------------------------------------------------------------------- the model


def infer_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The ``CCGQALM`` sizes a state dict was saved from, read off its weights."""
    layers = 0
    while f"blocks.{layers}.attn.q_proj.weight" in state:
        layers += 1
    if not layers:
        raise ValueError("not a CCGQALM state dict: no blocks.0.attn.q_proj.weight")
    e_q = state["blocks.0.attn.q_proj.weight"].shape[0]
    e_kv = state["blocks.0.attn.k_proj.weight"].shape[0]
    head_dim = state["blocks.0.attn.q_conv2.weight"].shape[1]  # grouped per head
    vocab, dim = state["embed.weight"].shape
    return {
        "vocab": vocab,
        "dim": dim,
        "layers": layers,
        "heads": e_q // head_dim,
        "kv_heads": e_kv // head_dim,
        "head_dim": head_dim,
    }


def load_model(args: argparse.Namespace) -> tuple[CCGQALM, str]:
    path = args.checkpoint
    if path is None and DEFAULT_CHECKPOINT.exists():
        path = str(DEFAULT_CHECKPOINT)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # a bare state dict or {"model": ..., ...}
        sizes = infer_sizes(state)
        lm = CCGQALM(**sizes, attention=args.attention)
        lm.load_state_dict(state)
        source = f"checkpoint {path}"
    else:
        torch.manual_seed(args.seed)
        head_dim = args.dim // (args.heads * args.compression)
        lm = CCGQALM(
            256, args.dim, args.layers, args.heads, args.kv_heads, head_dim, args.attention
        )
        source = f"fresh model (seed {args.seed}, untrained: its text is noise)"
    return lm.to(device=args.device, dtype=DTYPES[args.dtype]).eval(), source


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Greedy generation with the CCGQA LM over static caches, "
        "torch.compile(backend='ccgqa').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--prompt", default=PROMPT, help="prompt text (byte-level tokens)")
    ap.add_argument("--new-tokens", type=int, default=64, help="bytes to generate")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument(
        "--mode",
        choices=("default", "reduce-overhead"),
        default=None,
        help="torch.compile mode of the decode step (default: reduce-overhead on CUDA, "
        "default on CPU)",
    )
    ap.add_argument(
        "--checkpoint",
        default=None,
        help=f"a saved CCGQALM state dict (default: {DEFAULT_CHECKPOINT} when present, else "
        "a fresh model)",
    )
    ap.add_argument(
        "--compare",
        action="store_true",
        help="also time eager and Inductor default; print every provider's text and tokens/s",
    )
    model = ap.add_argument_group("fresh model (the main job's defaults)")
    model.add_argument("--dim", type=int, default=128)
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--kv-heads", type=int, default=2)
    model.add_argument("--compression", type=int, default=2)
    model.add_argument("--attention", choices=("handwritten", "sdpa"), default="handwritten")
    model.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    args = ap.parse_args(argv)

    if args.new_tokens < 1:
        ap.error(f"--new-tokens must be positive, got {args.new_tokens}")
    if not args.prompt:
        ap.error("--prompt must not be empty")
    args.prompt_bytes = args.prompt.encode("utf-8")
    kind, _, index = args.device.lower().partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        ap.error(f"unknown device {args.device!r}: use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device} asked for, but torch sees no CUDA GPU; use cpu")
    args.device = args.device.lower()
    if args.mode is None:
        args.mode = "reduce-overhead" if kind == "cuda" else "default"
    if args.checkpoint is None:
        latent = args.heads * args.compression
        if args.heads % args.kv_heads or args.dim % latent or (args.dim // latent) % 2:
            ap.error(
                "need heads % kv-heads == 0 and an even head dim = dim / (heads * compression)"
            )
    elif not pathlib.Path(args.checkpoint).is_file():
        ap.error(f"--checkpoint {args.checkpoint} is not a file")
    return args


def text(tokens: torch.Tensor) -> str:
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None, keep_states: bool = False) -> dict:
    """Run the example; returns what it printed, as values. ``keep_states`` (the tests):
    every provider's caches after each prefill and decode call, in ``runs[name]["states"]``."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, keep_states)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, keep_states: bool = False) -> dict:
    if args.device == "cpu":
        # a CPU demo: fuse anyway so the report shows the fusions (on CPU the fused ops run
        # their exact composite fallback, not faster than Inductor's own CPU code)
        os.environ.setdefault("CCGQA_FUSE_ON_CPU", "1")
    lm, source = load_model(args)
    a = lm.blocks[0].attn
    prompt = torch.tensor([list(args.prompt_bytes)], device=args.device)
    p = prompt.shape[1]
    print(
        f"CCGQA LM: {lm.layers} layers, width {lm.embed.weight.shape[1]}, {a.h_q} query / "
        f"{a.h_kv} kv heads of dim {a.d}, {sum(x.numel() for x in lm.parameters()) / 1e6:.2f} M "
        f"parameters; {source}\nprompt {p} bytes, {args.new_tokens} new; {args.dtype} on "
        f"{args.device}, decode mode {args.mode}"
    )

    # 1. the decode path computes the model's function: logits at every position
    check = torch.cat((prompt, torch.randint(0, 256, (1, 8), device=args.device)), dim=1)
    err = decode_path_error(lm, check, p)
    print(f"decode path vs the full forward, eager float64: max |diff| / max |logit| {err:.1e}")
    if not err < 1e-9:
        raise SystemExit(f"the decode path does not reproduce the model's forward ({err:.1e})")

    # 2. greedy generation: compiled (and the others), each over its own static caches
    providers = ("ccgqa", "eager", "inductor") if args.compare else ("ccgqa", "eager")
    runs = {}
    for provider in providers:
        decoder = CCGQADecoder(lm, 1, p + max(args.new_tokens, 1 + WARMUP_DECODE_CALLS))
        runs[provider] = run_provider(
            provider, decoder, prompt, args.new_tokens, args.mode, keep_states
        )

    fused = runs["ccgqa"]
    print(f"\n{fused['report']}")
    counts = {phase: graph_counts(graphs) for phase, graphs in fused["phases"].items()}
    for phase, graphs in fused["phases"].items():
        ids = ", ".join(g.compile_id for g in graphs)
        print(f"{phase} graph(s) {ids}: {counts[phase]}")

    want, got = runs["eager"]["tokens"][0], fused["tokens"][0]
    same = torch.equal(want, got)
    differ = (want != got).nonzero()
    first = differ[0].item() if len(differ) else None
    print(f"\n{args.prompt!r} + ccgqa: {text(got)!r}")
    if args.compare or not same:
        for name in providers[1:]:
            print(f"{args.prompt!r} + {name}: {text(runs[name]['tokens'][0])!r}")
    if same:
        print(f"greedy tokens equal eager's: all {len(got)}, token by token")
    else:
        margin = runs["eager"]["margins"][first]
        print(f"greedy tokens differ from eager's from token {first} (eager's top-2 logit margin "
              f"there {margin:.2e})")  # fmt: skip

    print(f"\n{'provider':<9} {'warm-up s':>9} {'prefill ms':>10} {'decode ms':>9} {'tokens/s':>9}")
    for name in providers if args.compare else ("ccgqa",):
        r = runs[name]
        print(
            f"{name:<9} {r['warmup_s']:>9.1f} {r['prefill_ms']:>10.2f} {r['decode_ms']:>9.2f} "
            f"{r['tokens_per_s']:>9.0f}"
        )
    print("(warm calls only: the warm-up compiles; decode ms: median step; tokens/s: decode)")
    if args.device == "cpu":
        print(
            "(on CPU the fused ops run their exact composite fallback, so ccgqa's speed says "
            "little here; the Triton kernels run on CUDA)"
        )
    if not same and DTYPES[args.dtype] == torch.float32:
        raise SystemExit("greedy tokens of the compiled model differ from eager's in fp32")
    return {
        "decode_path_error": err,
        "tokens": {name: r["tokens"] for name, r in runs.items()},
        "tokens_equal": same,
        "fusions": counts,
        "tokens_per_s": {name: r["tokens_per_s"] for name, r in runs.items()},
        "runs": runs,
    }


if __name__ == "__main__":
    main()
