"""Whole transformer blocks built from the corpus idioms (for the example and benchmarks).

``TinyLM`` is a Llama-style decoder: HF RMSNorm, HF RoPE (rotate_half), GQA attention with
``repeat_kv`` and SDPA, SwiGLU MLP. Compiled with ``backend="ccgqa"``, every RMSNorm, RoPE
and SwiGLU instance fuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import Shape
from .rms_norm import LlamaRMSNorm
from .rope import rotary_tables, rotate_half
from .swiglu import LlamaMLP


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 256
    dim: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_seq: int = 256

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"head dim {self.dim // self.heads} must be even for RoPE")


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """HF Llama's repeat_kv: (B, Hkv, T, D) -> (B, Hkv * groups, T, D)."""
    b, h, t, d = x.shape
    if groups == 1:
        return x
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


class GQAAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        groups = self.heads // self.kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        shape = Shape(hidden=cfg.dim, eps=1e-6)
        self.attn_norm, self.mlp_norm = LlamaRMSNorm(shape), LlamaRMSNorm(shape)
        self.attn = GQAAttention(cfg)
        self.mlp = LlamaMLP(Shape(hidden=cfg.dim))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = LlamaRMSNorm(Shape(hidden=cfg.dim, eps=1e-6))
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        with torch.no_grad():
            cos, sin = rotary_tables(
                tokens.shape[1], self.cfg.dim // self.cfg.heads, x.device, x.dtype
            )
        cos, sin = cos[None, None], sin[None, None]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))

    def expected_fusions(self, device: str = "cpu") -> dict[str, int]:
        from ccgqa_compile.config import SDPA_MAX_HEAD_DIM as MAX_HEAD_DIM
        from ccgqa_compile.ops.gqa_attention import KERNEL_HEAD_DIMS

        n = self.cfg.layers
        out = {"rms_norm": 2 * n + 1, "rope": 2 * n, "swiglu": n}
        # the SDPA core is taken by the pre-grad rewrite at small head dims (policy; on
        # CUDA only head dims with a Triton kernel)
        head_dim = self.cfg.dim // self.cfg.heads
        if head_dim <= MAX_HEAD_DIM and (device != "cuda" or head_dim in KERNEL_HEAD_DIMS):
            out["gqa_attention"] = n
        return out
