"""Causal GQA attention as users write it: by hand (matmul, mask, softmax, matmul) or with
``F.scaled_dot_product_attention``, and near misses (not causal, a mask tensor, dropout,
query and key lengths that differ)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


# ---- F.scaled_dot_product_attention ----
class SdpaEnableGQA(HandWrittenGQA):
    """SDPA shares the kv heads itself (torch >= 2.5)."""

    def core(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class SdpaRepeatKV(HandWrittenGQA):
    """HF Llama's sdpa path: K/V repeated by repeat_kv, then SDPA."""

    def core(self, q, k, v):
        groups = self.heads // self.kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SdpaRepeatInterleave(HandWrittenGQA):
    def core(self, q, k, v):
        groups = self.heads // self.kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)


class SdpaMuPScale(HandWrittenGQA):
    """An explicit scale (muP's 1/d instead of 1/sqrt(d))."""

    def core(self, q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=1.0 / self.head_dim, enable_gqa=True
        )


class SdpaDropoutEval(HandWrittenGQA):
    """Attention dropout that is off in eval mode (the entry builds the module in eval)."""

    attn_dropout = 0.1

    def core(self, q, k, v):
        p = self.attn_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)


def _eval(cls):
    def build(s: Shape) -> nn.Module:
        return cls(s).eval()

    return build


def _with_head_dim(cls, head_dim: int):
    def build(s: Shape) -> nn.Module:
        return cls(Shape(s.batch, s.seq, s.hidden, s.heads, head_dim, s.eps))

    return build


# ---- SDPA near misses ----
class SdpaNonCausal(HandWrittenGQA):
    def core(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class SdpaAlibiMask(HandWrittenGQA):
    """Causal plus an ALiBi-like distance bias, passed as a float attn_mask."""

    def core(self, q, k, v):
        t = q.shape[-2]
        pos = torch.arange(t, device=q.device)
        distance = (pos[:, None] - pos[None, :]).to(q.dtype)
        bias = (-0.5 * distance).masked_fill(distance < 0, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


class SdpaDropoutTrain(HandWrittenGQA):
    """Dropout in training mode. p is tiny so that compiled and eager outputs stay
    comparable (nothing is dropped in practice); any p > 0 must be rejected."""

    def core(self, q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=1e-30, is_causal=True, enable_gqa=True
        )


class SdpaLastTokenQuery(HandWrittenGQA):
    """Only the last token queries keys over a learned memory token plus the sequence.

    T_q = 1 < T_k: SDPA's is_causal mask is then aligned top-left (the query sees key 0
    only), a different function from our op's (which needs T_q == T_k).
    """

    def __init__(self, s: Shape):
        super().__init__(s)
        self.memory = nn.Parameter(torch.randn(1, 1, s.hidden))

    def forward(self, x):
        b, t, _ = x.shape
        kv_in = torch.cat((self.memory.expand(b, 1, -1), x), dim=1)
        q = self.q_proj(x[:, -1:]).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv_in).view(b, t + 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv_in).view(b, t + 1, self.kv_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, 1, -1))


def _promised(shape: Shape) -> bool:
    # hand-written attention is recognised by what it computes, at every size
    return True


def sdpa_promised(shape: Shape) -> bool:
    """SDPA is rewritten whatever the sizes, except a single token (the output is v) and,
    by policy, head dims above 32 (config.SDPA_MAX_HEAD_DIM)."""
    return shape.seq >= 2 and shape.head_dim <= 32


def _e(name, cls, expect=1, note=""):
    return Entry(name, "gqa_attention", expect, cls, hidden_states, note, (), _promised)


def _near_causal(name, cls, note):
    """A mask that differs from the causal one only off the diagonal: at one token it is."""
    return Entry(
        name, "gqa_attention", 0, cls, hidden_states, note, promised=lambda s: s.seq > 1,
        may_fire=1,
    )  # fmt: skip


def _sdpa(name, build, expect=1, note="", policy=""):
    return Entry(
        name, "gqa_attention", expect, build, hidden_states, note, (), sdpa_promised, policy
    )


ENTRIES = [
    _e("attn_repeat_kv_tril", HandWrittenGQA, note="repeat_kv, * scale, ~tril, fp32 softmax"),
    _e(
        "attn_repeat_interleave_triu",
        RepeatInterleaveTriuGQA,
        note="repeat_interleave, / sqrt(d), triu(1)",
    ),
    _near_causal("attn_near_non_causal", NonCausalGQA, "no causal mask"),
    _near_causal("attn_near_peeks_ahead", PeeksOneAheadGQA, "tril(1)"),
    _sdpa("attn_sdpa_enable_gqa", SdpaEnableGQA, note="SDPA is_causal, enable_gqa"),
    _sdpa("attn_sdpa_repeat_kv", SdpaRepeatKV, note="SDPA is_causal on repeat_kv K/V (HF)"),
    _sdpa(
        "attn_sdpa_repeat_interleave",
        SdpaRepeatInterleave,
        note="SDPA on repeat_interleave K/V, positional args",
    ),
    _sdpa("attn_sdpa_mup_scale", SdpaMuPScale, note="SDPA scale=1/d"),
    _sdpa("attn_sdpa_dropout_eval", _eval(SdpaDropoutEval), note="dropout_p=0 in eval mode"),
    _sdpa(
        "attn_sdpa_head_dim_64",
        _with_head_dim(SdpaEnableGQA, 64),
        0,
        "SDPA enable_gqa at head dim 64",
        policy="head dim 64 > 32: SDPA (cuDNN) is faster",
    ),
    _sdpa("attn_sdpa_near_non_causal", SdpaNonCausal, 0, "SDPA is_causal=False"),
    _sdpa("attn_sdpa_near_alibi_mask", SdpaAlibiMask, 0, "SDPA with a float attn_mask (ALiBi)"),
    _sdpa(
        "attn_sdpa_near_dropout_train",
        SdpaDropoutTrain,
        0,
        "SDPA dropout_p > 0 in training",
    ),
    _sdpa(
        "attn_sdpa_near_last_token_query",
        SdpaLastTokenQuery,
        0,
        "SDPA is_causal with T_q = 1 < T_k (top-left aligned)",
    ),
]
