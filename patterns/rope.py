"""RoPE as people write it (inside a q/k projection), and near misses."""

from __future__ import annotations

import torch
from torch import nn

from . import Entry, Shape, hidden_states


def rotary_tables(seq: int, dim: int, device, dtype, base: float = 10000.0):
    """HF-style cos/sin of width ``dim`` (frequencies duplicated for rotate-half)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class QKProjection(nn.Module):
    """x -> q, k of shape (B, H, T, D) as HF attention layers produce them."""

    rotary_fraction = 1.0

    def __init__(self, s: Shape):
        super().__init__()
        self.heads, self.head_dim = s.heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=False)

    def qk(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        return q, k

    def tables(self, x, dim):
        with torch.no_grad():
            cos, sin = rotary_tables(x.shape[1], dim, x.device, x.dtype)
        return cos[None, None], sin[None, None]  # (1, 1, T, dim)

    def forward(self, x):
        q, k = self.qk(x)
        cos, sin = self.tables(x, self.head_dim)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        return q * k  # something that uses both


class HFRotateHalf(QKProjection):
    def rotate(self, x, cos, sin):
        return (x * cos) + (rotate_half(x) * sin)


class NeoXPartialRotary(QKProjection):
    def forward(self, x):
        q, k = self.qk(x)
        rd = self.head_dim // 2
        cos, sin = self.tables(x, rd)
        out = []
        for t in (q, k):
            t_rot, t_pass = t[..., :rd], t[..., rd:]
            t_rot = (t_rot * cos) + (rotate_half(t_rot) * sin)
            out.append(torch.cat((t_rot, t_pass), dim=-1))
        return out[0] * out[1]


class GPTJInterleaved(QKProjection):
    def tables(self, x, dim):
        cos, sin = super().tables(x, dim)
        half = dim // 2
        # interleaved layout: each frequency repeated for its pair
        return cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)

    def rotate(self, x, cos, sin):
        x1, x2 = x[..., ::2], x[..., 1::2]
        rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return (x * cos) + (rot * sin)


class MetaComplexRope(QKProjection):
    """Meta Llama: q, k in (B, T, H, D), multiplied by complex freqs_cis."""

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim)
        with torch.no_grad():
            d = self.head_dim
            inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=x.device).float() / d))
            freqs = torch.outer(torch.arange(t, device=x.device).float(), inv)
            freqs_cis = torch.polar(torch.ones_like(freqs), freqs).view(1, t, 1, d // 2)

        def apply(v):
            v_c = torch.view_as_complex(v.float().reshape(*v.shape[:-1], -1, 2))
            return torch.view_as_real(v_c * freqs_cis).flatten(3).type_as(v)

        return apply(q) * apply(k)


class GQAKVCacheRope(QKProjection):
    """HF Llama attention shape: fewer k heads than q heads, k also returned (the KV cache).

    q and k share cos/sin, and RoPE's backward touches nothing else of its forward, so a
    loose joint match can pair q's forward with k's backward. This module does not trigger
    that ordering; tests/test_hf_llama.py does (it fails with the seq_nr guard removed).
    """

    def __init__(self, s: Shape):
        super().__init__(s)
        self.kv_heads = max(1, s.heads // 2)
        self.k_proj = nn.Linear(s.hidden, self.kv_heads * s.head_dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.tables(x, self.head_dim)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        group = self.heads // self.kv_heads
        k_rep = k[:, :, None].expand(b, self.kv_heads, group, t, self.head_dim)
        k_rep = k_rep.reshape(b, self.kv_heads * group, t, self.head_dim)
        scores = q @ k_rep[:, : self.heads].transpose(-1, -2)
        return scores.sum(-1, keepdim=True) * q + k.sum(1, keepdim=True)


class InlineHalves(HFRotateHalf):
    """The halves sliced inline, second half first: autograd then sums their gradients in
    the other order than HF's rotate_half does (the backward must still fuse)."""

    def rotate(self, x, cos, sin):
        h = x.shape[-1] // 2
        return (x * cos) + (torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin)


class InlinePairs(GPTJInterleaved):
    """GPT-J pairs sliced inline, odd elements first."""

    def rotate(self, x, cos, sin):
        rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return (x * cos) + (rot * sin)


class NegativeAnglesRotateHalf(HFRotateHalf):
    """rotate_half written cat(x2, -x1): every pair turns by -angle (x*cos - rot(x)*sin),
    a rotation still."""

    def rotate(self, x, cos, sin):
        h = x.shape[-1] // 2
        return (x * cos) + (torch.cat((x[..., h:], -x[..., :h]), dim=-1) * sin)


# ---- near misses ----
class QuarterSplitRotation(HFRotateHalf):
    """Splits at a quarter instead of the half."""

    def rotate(self, x, cos, sin):
        h = x.shape[-1] // 4
        return (x * cos) + (torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin)


class NegativeAnglesPairs(GPTJInterleaved):
    """GPT-J pairs rotated by -angle: stack(x_odd, -x_even)."""

    def rotate(self, x, cos, sin):
        x1, x2 = x[..., ::2], x[..., 1::2]
        rot = torch.stack((x2, -x1), dim=-1).flatten(-2)
        return (x * cos) + (rot * sin)


def _e(name, cls, expect=2, note=""):
    return Entry(name, "rope", expect, cls, hidden_states, note)


def _several_tokens(shape: Shape) -> bool:
    return shape.seq > 1


def _near(name, cls, note):
    """A wrong rotation: at one token every angle is 0 and it is the identity, as RoPE is."""
    return Entry(name, "rope", 0, cls, hidden_states, note, promised=_several_tokens, may_fire=2)


ENTRIES = [
    _e("rope_hf_rotate_half", HFRotateHalf, note="q*cos + rotate_half(q)*sin"),
    _e("rope_neox_partial", NeoXPartialRotary, note="half the head dims rotated"),
    _e("rope_gptj_interleaved", GPTJInterleaved, note="stack(-x_odd, x_even)"),
    _e("rope_meta_complex", MetaComplexRope, note="view_as_complex * freqs_cis"),
    _e("rope_gqa_kv_cache", GQAKVCacheRope, note="HF GQA shapes, k also an output"),
    _e("rope_inline_halves", InlineHalves, note="cat((-x[..., h:], x[..., :h]))"),
    _e("rope_inline_pairs", InlinePairs, note="stack((-x[..., 1::2], x[..., ::2]))"),
    _e("rope_negative_angles_rotate_half", NegativeAnglesRotateHalf, note="cat(x2, -x1)"),
    _e("rope_negative_angles_pairs", NegativeAnglesPairs, note="stack(x_odd, -x_even)"),
    _near("rope_near_quarter_split", QuarterSplitRotation, "split at D/4"),
]
