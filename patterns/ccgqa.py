"""CCGQA attention as ../shared/design/ccgqa.md describes it, in plain PyTorch.

Attention inside a compressed latent space: q, k, v are down-projected from the model
width E to hq*d / hkv*d channels, q and k go through two causal convolutions and the
qk-mean coupling, are L2-normalised with a learnable per-kv-head temperature and rotated,
then causal GQA attention runs there and only its output is up-projected.

This is the reference the fused path must reproduce; its hand-written attention core is
already replaced by ``torch.ops.ccgqa.gqa_attention`` (and its RoPE by ``ccgqa.rope``);
recognising the whole block (conv/mean/norm/rope prologue in one kernel) is still to come.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, Shape, hidden_states
from .attention import kv_heads_for, repeat_kv
from .rope import rotary_tables, rotate_half


class CCGQAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        conv_kernels: tuple[int, int] = (2, 2),
        qk_mean: bool = True,
        value_shift: bool = True,
        temperature: str = "exp",  # "exp": beta = exp(t), "raw": beta = t, "none"
        rotary_fraction: float = 1.0,
        attention: str = "handwritten",  # or "sdpa"
    ):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
        if value_shift and (kv_heads * head_dim) % 2:
            raise ValueError("value shift needs an even kv latent width")
        self.h_q, self.h_kv, self.d = heads, kv_heads, head_dim
        self.qk_mean, self.value_shift, self.temperature = qk_mean, value_shift, temperature
        self.attention = attention
        self.rotary_dim = int(head_dim * rotary_fraction) // 2 * 2
        e_q, e_kv = heads * head_dim, kv_heads * head_dim
        self.q_proj = nn.Linear(dim, e_q, bias=False)
        self.k_proj = nn.Linear(dim, e_kv, bias=False)
        if value_shift:
            self.v_proj_now = nn.Linear(dim, e_kv // 2, bias=False)
            self.v_proj_prev = nn.Linear(dim, e_kv // 2, bias=False)
        else:
            self.v_proj = nn.Linear(dim, e_kv, bias=False)
        k1, k2 = conv_kernels
        self.k1, self.k2 = k1, k2
        # q and k convolved separately; each conv causally left-padded
        self.q_conv1 = nn.Conv1d(e_q, e_q, k1, groups=e_q)  # depthwise
        self.q_conv2 = nn.Conv1d(e_q, e_q, k2, groups=heads)  # grouped per head
        self.k_conv1 = nn.Conv1d(e_kv, e_kv, k1, groups=e_kv)
        self.k_conv2 = nn.Conv1d(e_kv, e_kv, k2, groups=kv_heads)
        self.temp = nn.Parameter(torch.zeros(kv_heads)) if temperature != "none" else None
        if temperature == "raw":
            nn.init.ones_(self.temp)
        self.o_proj = nn.Linear(e_q, dim, bias=False)

    def _conv(self, x, conv1, conv2):
        """(B, T, C) -> (B, T, C) through two causal convolutions along T."""
        y = x.transpose(1, 2)
        y = conv1(F.pad(y, (self.k1 - 1, 0)))
        y = conv2(F.pad(y, (self.k2 - 1, 0)))
        return y.transpose(1, 2)

    def forward(self, x):
        b, t, _ = x.shape
        g = self.h_q // self.h_kv
        q_pre, k_pre = self.q_proj(x), self.k_proj(x)
        if self.value_shift:
            x_prev = F.pad(x, (0, 0, 1, 0))[:, :t]  # x_{t-1}, zero before the start
            v = torch.cat((self.v_proj_now(x), self.v_proj_prev(x_prev)), dim=-1)
        else:
            v = self.v_proj(x)
        q = self._conv(q_pre, self.q_conv1, self.q_conv2).view(b, t, self.h_q, self.d)
        k = self._conv(k_pre, self.k_conv1, self.k_conv2).view(b, t, self.h_kv, self.d)
        if self.qk_mean:
            qh = q_pre.view(b, t, self.h_q, self.d)
            kh = k_pre.view(b, t, self.h_kv, self.d).repeat_interleave(g, dim=2)
            m_q = (qh + kh) / 2
            m_k = m_q.view(b, t, self.h_kv, g, self.d).mean(3)
            q, k = q + m_q, k + m_k
        q = F.normalize(q, dim=-1) * math.sqrt(self.d)
        k = F.normalize(k, dim=-1) * math.sqrt(self.d)
        if self.temp is not None:
            beta = self.temp.exp() if self.temperature == "exp" else self.temp
            k = k * beta.view(1, 1, self.h_kv, 1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, d)
        v = v.view(b, t, self.h_kv, self.d).transpose(1, 2)
        if self.rotary_dim:
            with torch.no_grad():
                cos, sin = rotary_tables(t, self.rotary_dim, x.device, q.dtype)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        o = self._attend(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def _rope(self, x, cos, sin):
        rd = self.rotary_dim
        if rd == self.d:
            return (x * cos) + (rotate_half(x) * sin)
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)

    def _attend(self, q, k, v):
        g = self.h_q // self.h_kv
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=g > 1)
        k, v = repeat_kv(k, g), repeat_kv(v, g)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d))
        t = q.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def _build(**options):
    def build(s: Shape) -> nn.Module:
        return CCGQAttention(s.hidden, s.heads, kv_heads_for(s.heads), s.head_dim, **options)

    return build


def _promised(shape: Shape) -> bool:
    return shape.heads >= 2 and shape.seq >= 2 and shape.batch >= 2


ENTRIES = [
    Entry(
        "ccgqa_handwritten_core",
        "gqa_attention",
        1,
        _build(),
        hidden_states,
        "CCGQA block, hand-written causal GQA core",
        (),
        _promised,
    ),
    Entry(
        "ccgqa_partial_rope_no_shift",
        "gqa_attention",
        1,
        _build(value_shift=False, rotary_fraction=0.5, temperature="raw", conv_kernels=(3, 2)),
        hidden_states,
        "CCGQA, half-rotary, no value shift, raw temperature",
        (),
        _promised,
    ),
]
