"""User-facing switches: which fusions run, and whether the Triton kernels may be used.

Three ways to turn a fusion off, from the most global to the most local:
- the environment variable ``CCGQA_DISABLE=rms_norm,rope`` (read at every compilation);
- ``ccgqa_compile.config.disabled_fusions.add("rope")`` in Python;
- ``torch.compile(model, backend="ccgqa", options={"ccgqa_disable": ["rope"]})`` for one model.

Graphs on CPU are left to Inductor unless ``CCGQA_FUSE_ON_CPU=1`` (see ``fuse_on_cpu``).

``CCGQA_DISABLE_KERNELS=1`` keeps every fusion but makes each op run its exact composite
PyTorch implementation instead of the Triton kernels (useful to bisect a numerical issue).
"""

from __future__ import annotations

import os

# the CCGQA prologue before RoPE: its RoPE is part of it; "value_shift" is a pre-grad
# rewrite (passes/value_shift.py), the others joint-graph patterns
FUSIONS: tuple[str, ...] = (
    "rms_norm",
    "swiglu",
    "ccgqa_prologue",
    "rope",
    "gqa_attention",
    "gqa_decode_attention",
    "value_shift",
)

# Policy: SDPA calls with a head dim above this stay on SDPA, whose own kernels (cuDNN,
# flash) beat ours there (docs/benchmarks); hand-written attention is fused at every head
# dim (it would otherwise materialise the T x T scores), onto SDPA's kernels above it
# (HANDWRITTEN_ATTENTION_CORE).
SDPA_MAX_HEAD_DIM = 32

# Policy for causal hand-written attention (no runtime mask, not a decode step): whose
# kernels run it once recognised. "auto": SDPA's (cuDNN / flash, through
# F.scaled_dot_product_attention) on CUDA where an SDPA call would be left to SDPA (head
# dims above SDPA_MAX_HEAD_DIM, or without a Triton kernel), ours elsewhere; "ccgqa" or
# "sdpa" force one (the tests force "sdpa" on CPU). Either way the T x T scores are gone.
HANDWRITTEN_ATTENTION_CORE = "auto"

# Policy: attention of at most this many new query tokens over a longer KV cache (a decode
# step, or a few tokens when speculating) becomes gqa_decode_attention (split-KV kernel);
# longer query chunks over a cache stay on SDPA, whose prefill kernels suit them.
DECODE_MAX_QUERY_LEN = 16

# Policy: a longer query chunk over a static cache with a mask passed in (gpt-fast's
# prefill: the causal table's rows at the tokens' positions over the whole cache) may
# become gqa_attention_masked, which checks the mask when it runs and uses our causal
# kernel on the prompt's keys at position 0. Off: on the GPU the run-time check and its
# host syncs cost more than SDPA's masked kernel (docs/recognition.md); recognised
# and tested, for when the check moves onto the device.
PREFILL_OVER_CACHE = False

# Probes are drawn in float64; a region whose tensors hold more elements than this (a
# KV cache of a large batch and context) is checked in a cheaper exact way where one
# exists (a repeat of K/V heads: one-byte codes), so recognition never needs tens of GB.
PROBE_MAX_ELEMENTS = 1 << 26

# Policy: the original project's prologue variant fuses in inference graphs; in training
# graphs it is left to Inductor, whose code for it trains faster than our backward
# kernels (docs/benchmarks). True fuses training graphs too.
SEED_PROLOGUE_IN_TRAINING = False

# Names added here are skipped by every later compilation.
disabled_fusions: set[str] = set()


def _split(value: str) -> set[str]:
    return {part.strip() for part in value.split(",") if part.strip()}


def validate_fusion_names(names: set[str]) -> set[str]:
    unknown = names - set(FUSIONS)
    if unknown:
        raise ValueError(
            f"unknown ccgqa fusion name(s) {sorted(unknown)}; known fusions: {list(FUSIONS)}"
        )
    return names


def enabled_fusions(extra_disabled: set[str] | frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The fusions that run for one compilation, in a stable order."""
    off = set(disabled_fusions) | _split(os.environ.get("CCGQA_DISABLE", "")) | set(extra_disabled)
    validate_fusion_names(off)
    return tuple(name for name in FUSIONS if name not in off)


def fuse_on_cpu() -> bool:
    """Off by default: on CPU the ops run their composite fallback, which is exact but
    slower than Inductor's own CPU code, so the passes leave CPU graphs alone. The tests,
    the CPU demo of the main job and ``CCGQA_FUSE_ON_CPU=1`` turn it on."""
    return os.environ.get("CCGQA_FUSE_ON_CPU", "0") not in ("", "0")


def kernels_disabled() -> bool:
    return os.environ.get("CCGQA_DISABLE_KERNELS", "0") not in ("", "0")


def strict() -> bool:
    """``CCGQA_STRICT=1``: an internal error in a recognizer raises (the tests set it)
    instead of being reported and leaving the graph to Inductor."""
    return os.environ.get("CCGQA_STRICT", "0") not in ("", "0")
