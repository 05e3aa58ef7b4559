"""The corpus: plain-PyTorch idioms users write, each tagged with the fusion that must fire.

Every entry builds a small ``nn.Module`` plus inputs. ``expect`` is how many times the
tagged fusion must fire in one compiled graph (training or inference); near misses carry
``expect=0``: the fusion must NOT fire there, and the output must still match eager.
Tests, examples and benchmarks all draw from ``CORPUS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Shape:
    """Sizes an entry is built with (each entry uses the ones it needs)."""

    batch: int = 2
    seq: int = 5
    hidden: int = 16  # model width / normalised dim
    heads: int = 2
    head_dim: int = 8
    eps: float = 1e-6


@dataclass(frozen=True)
class Entry:
    name: str
    fusion: str
    expect: int  # times `fusion` must fire per compiled graph; 0 = near miss, must not fire
    build: Callable[[Shape], nn.Module]
    make_inputs: Callable[[Shape, torch.dtype, str], tuple[torch.Tensor, ...]]
    note: str = ""
    # near misses of one idiom whose genuine core may still fuse as another idiom: these
    # idioms must not appear (e.g. Gemma with (2 + w) must not become the (1 + w) op)
    forbidden_idioms: tuple[str, ...] = ()
    # shapes on which the fusion is promised; elsewhere (degenerate sizes whose graphs
    # decompose differently) it may or may not fire, and the result must still match
    promised: Callable[[Shape], bool] = lambda shape: True
    # expect=0 by policy, not because the idiom differs: the fusion could apply but is
    # deliberately not taken (e.g. SDPA at head dim 64, where cuDNN is faster); says why
    policy: str = ""
    # a near miss of the whole CCGQA block (wrong padding, wrong mean) whose attention
    # core is still genuine, so `expect` counts the core's fusion; the q/k prologue (and
    # so the whole block) must not fuse there
    block_near_miss: bool = False
    # other fusions this entry pins, as (fusion, times per graph on promised shapes); 0 =
    # must not fire (e.g. the CCGQA prologue on a block whose convs see later tokens)
    also: tuple[tuple[str, int], ...] = ()
    # shapes on which the `also` counts are promised (default: those of `promised`)
    also_promised: Callable[[Shape], bool] | None = None
    # a near miss that computes the op itself off the promised shapes (a rotation by the
    # wrong sign at one token, where every angle is 0): how many times it may fire there
    may_fire: int = 0
    # the `also` counts in training graphs, where a policy makes them differ (e.g. the
    # seed's prologue: fused in inference graphs, left to Inductor in training graphs)
    also_in_training: tuple[tuple[str, int], ...] | None = None

    @property
    def near_miss(self) -> bool:
        return self.expect == 0 and not self.policy


def hidden_states(shape: Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    return (torch.randn(shape.batch, shape.seq, shape.hidden, dtype=dtype, device=device),)


def _collect() -> list[Entry]:
    from . import attention, ccgqa, rms_norm, rope, swiglu

    return [
        *rms_norm.ENTRIES,
        *swiglu.ENTRIES,
        *rope.ENTRIES,
        *attention.ENTRIES,
        *ccgqa.ENTRIES,
    ]


CORPUS: list[Entry] = _collect()
BY_NAME: dict[str, Entry] = {e.name: e for e in CORPUS}


def idiom_table() -> str:
    """Markdown table of the corpus (the README's supported-idioms table is made from it)."""
    lines = ["| entry | fusion | must fire | note |", "|---|---|---|---|"]
    for e in CORPUS:
        fire = f"yes (x{e.expect})" if e.expect else "no (near miss)"
        if e.policy:
            fire = f"no (policy: {e.policy})"
        if e.block_near_miss:
            fire += "; block-level near miss"
        if e.forbidden_idioms:
            fire = f"never as {', '.join(e.forbidden_idioms)} (its plain core may fuse)"
        for fusion, times in e.also:
            fire += f"; {fusion}: " + (f"yes (x{times})" if times else "no")
        lines.append(f"| `{e.name}` | {e.fusion} | {fire} | {e.note} |")
    return "\n".join(lines)
