"""Causal GQA attention written by hand (no SDPA), and near misses that are not causal."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import Entry, Shape, hidden_states


def kv_heads_for(heads: int) -> int:
    return heads // 2 if heads % 2 == 0 else 1


def repeat_kv(x, groups):
    """HF Llama's repeat_kv: expand + reshape."""
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


class HandWrittenGQA(nn.Module):
    """q/k/v projections, repeat_kv, matmul * scale, tril mask, fp32 softmax, matmul, o_proj."""

    def __init__(self, s: Shape):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, kv_heads_for(s.heads), s.head_dim
        self.q_proj = nn.Linear(s.hidden, self.heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden, self.kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden, self.kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * s.head_dim, s.hidden, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        o = self.core(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def core(self, q, k, v):
        groups = self.heads // self.kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        t = q.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, v)


class RepeatInterleaveTriuGQA(HandWrittenGQA):
    """repeat_interleave, division by sqrt(d), triu(1) mask filled with -inf."""

    def core(self, q, k, v):
        groups = self.heads // self.kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        t = q.shape[-2]
        future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=q.device), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)


# ---- near misses ----
class NonCausalGQA(HandWrittenGQA):
    def core(self, q, k, v):
        groups = self.heads // self.kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


class PeeksOneAheadGQA(HandWrittenGQA):
    """tril(1): each query also sees the next token."""

    def core(self, q, k, v):
        groups = self.heads // self.kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril(1)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def _promised(shape: Shape) -> bool:
    # known gap: with a size-1 batch, sequence or head dim the transposed views are
    # contiguous-compatible, the matmuls decompose without their copies, and those graphs
    # are not matched yet (they stay on Inductor's path: correct, not fused)
    return shape.heads >= 2 and shape.seq >= 2 and shape.batch >= 2


def _e(name, cls, expect=1, note=""):
    return Entry(name, "gqa_attention", expect, cls, hidden_states, note, (), _promised)


ENTRIES = [
    _e("attn_repeat_kv_tril", HandWrittenGQA, note="repeat_kv, * scale, ~tril, fp32 softmax"),
    _e(
        "attn_repeat_interleave_triu",
        RepeatInterleaveTriuGQA,
        note="repeat_interleave, / sqrt(d), triu(1)",
    ),
    _e("attn_near_non_causal", NonCausalGQA, 0, "no causal mask"),
    _e("attn_near_peeks_ahead", PeeksOneAheadGQA, 0, "tril(1)"),
]
