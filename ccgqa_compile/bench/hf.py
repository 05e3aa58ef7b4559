"""Benchmark cases on Hugging Face models, unmodified (``python -m ccgqa_compile.bench``).

- ``zaya-attention``: ``transformers.models.zaya.ZayaAttention`` (Zyphra's CCA, SDPA
  interface) at ZAYA1's widths (E2048, 8 query / 2 kv heads, d128, C=2) and at d32
  (E2048, 16/4 heads), beside the uncompressed GQA block of the same width and heads;
- ``zaya-lm``: a 2-layer ``ZayaForCausalLM`` at ZAYA1's widths, one training step;
- ``llama-lm``: a 2-layer ``LlamaForCausalLM`` at Llama-3-8B's widths, one training step,
  also with each fusion turned off (which of them pays).

Needs transformers >= 5.24 (``models.zaya``); randomly initialised, nothing downloaded.
"""

from __future__ import annotations

import torch

ZAYA_ATTENTION_CONFIGS = (
    # (E, hq, hkv, d): ZAYA1's widths, then the same width compressed to d32
    (2048, 8, 2, 128),
    (2048, 16, 4, 32),
)


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - an optional dependency
        raise SystemExit("these cases need transformers >= 5.24") from err
    return transformers


def zaya_config(dim: int, heads: int, kv_heads: int, head_dim: int, layers: int, **extra):
    transformers = _transformers()
    if not hasattr(transformers, "ZayaConfig"):
        raise SystemExit("transformers has no models.zaya: install transformers >= 5.24")
    cfg = transformers.ZayaConfig(
        hidden_size=dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        **extra,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


class ZayaAttentionCall(torch.nn.Module):
    """One ``ZayaAttention`` as its decoder layer calls it: RoPE tables computed in the
    forward, no mask (SDPA's is_causal), the attention output only."""

    def __init__(self, cfg):
        super().__init__()
        from transformers.models.zaya.modeling_zaya import ZayaAttention, ZayaRotaryEmbedding

        self.attn = ZayaAttention(cfg, 0)
        self.rotary = ZayaRotaryEmbedding(cfg)
        with torch.no_grad():  # ZAYA initialises the temperature at 0: use a trained-like one
            self.attn.qk_norm.temp.uniform_(0.5, 1.5)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = self.rotary(x, positions, "hybrid")
        return self.attn(x, attention_mask=None, position_embeddings=(cos, sin))[0]


class LanguageModelStep(torch.nn.Module):
    """A causal LM's forward to logits from token ids (``use_cache=False``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


ZAYA_ATTENTION_TOKENS = 16384


def zaya_attention_cases(device, dtype, quick, seq_lens, case_cls, uncompressed_cls):
    """ZayaAttention vs the uncompressed SDPA GQA block, 16384 tokens per step (B4 T4096
    by default, B1 at T16384)."""
    configs = ZAYA_ATTENTION_CONFIGS if not quick else ((64, 4, 2, 16),)
    for dim, hq, hkv, d in configs:
        for t in seq_lens or ((4096,) if not quick else (32,)):
            b = max(1, ZAYA_ATTENTION_TOKENS // t) if not quick else 2
            cfg = zaya_config(dim, hq, hkv, d, 1)
            module = ZayaAttentionCall(cfg).to(device=device, dtype=dtype)
            make = lambda b=b, t=t, dim=dim: (  # noqa: E731
                torch.randn(b, t, dim, device=device, dtype=dtype),
            )
            eq, ekv = hq * d, hkv * d
            attn = 4 * b * hq * t * t * d / 2
            proj = 2 * b * t * dim * (eq + 2 * ekv + eq)
            label = f"ZayaAttention E{dim} hq{hq} hkv{hkv} d{d} B{b} T{t}"
            extra = {"seq_len": t, "batch": b, "config": f"E{dim} hq{hq} hkv{hkv} d{d}"}
            check = b * hq * t * t * 8 <= 2**31
            yield case_cls(
                "zaya-attention", label, module, make, 1, module=module, check=check,
                fwd_flops=attn + proj, total_flops=3.5 * attn + 3 * proj,
                extra={**extra, "idiom": "hf_zaya"},
            )  # fmt: skip
            base = uncompressed_cls(dim, hq, hkv).to(device=device, dtype=dtype)
            d_full = dim // hq
            attn_full = 4 * b * hq * t * t * d_full / 2
            proj_full = 2 * b * t * dim * 2 * (dim + hkv * d_full)
            yield case_cls(
                "zaya-attention", f"uncompressed E{dim} hq{hq} hkv{hkv} d{d_full} B{b} T{t}",
                base, make, 1, module=base, check=check, providers=("eager", "inductor"),
                fwd_flops=attn_full + proj_full, total_flops=3.5 * attn_full + 3 * proj_full,
                extra={**extra, "idiom": "uncompressed"},
            )  # fmt: skip


def _lm_case(case_cls, op, label, model, vocab, b, t, device, extra, flops, variants=()):
    model = LanguageModelStep(model)
    make = lambda: (torch.randint(0, vocab, (b, t), device=device),)  # noqa: E731
    return case_cls(
        op, label, model, make, 0, module=model, check=False,
        fwd_flops=flops, total_flops=3 * flops, extra=extra, variants=variants,
    )  # fmt: skip


def zaya_lm_cases(device, dtype, quick, seq_lens, case_cls):
    """A 2-layer ZAYA1 (E2048, 8/2 heads, d128, 16 experts, vocab 262k): one training step."""
    b, t = (1, seq_lens[0] if seq_lens else 4096) if not quick else (2, 32)
    if quick:
        cfg = zaya_config(64, 4, 2, 16, 2, vocab_size=100, moe_intermediate_size=32,
                          router_hidden_size=16, num_experts=2, eos_token_id=1)  # fmt: skip
    else:
        cfg = zaya_config(2048, 8, 2, 128, 2)
    cfg._experts_implementation = "eager" if device == "cpu" else None
    model = _transformers().ZayaForCausalLM(cfg).to(device=device, dtype=dtype)
    dim, vocab = cfg.hidden_size, cfg.vocab_size
    flops = 2 * b * t * dim * vocab  # the head dominates; attention and experts add to it
    extra = {"seq_len": t, "batch": b, "config": f"ZAYA1 2 layers E{dim}"}
    yield _lm_case(case_cls, "zaya-lm", f"ZayaForCausalLM 2 layers B{b} T{t}", model, vocab,
                   b, t, device, extra, flops)  # fmt: skip


def llama_lm_cases(device, dtype, quick, seq_lens, case_cls):
    """A 2-layer Llama at Llama-3-8B's widths (4096, 32/8 heads, d128, MLP 14336, vocab
    128256), B2 T4096: one training step, with every fusion and with each one off."""
    transformers = _transformers()
    if quick:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=2, vocab_size=100)  # fmt: skip
        b, t = 2, 32
    else:
        cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336,
                                       num_attention_heads=32, num_key_value_heads=8,
                                       num_hidden_layers=2, vocab_size=128256,
                                       max_position_embeddings=8192)  # fmt: skip
        b, t = 2, seq_lens[0] if seq_lens else 4096
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    dim, vocab = cfg.hidden_size, cfg.vocab_size
    per_layer = 2 * b * t * (dim * (dim + 2 * 1024 + dim) + 3 * dim * cfg.intermediate_size)
    attn = 4 * b * cfg.num_attention_heads * t * t * (dim // cfg.num_attention_heads) / 2
    flops = 2 * (per_layer + attn) + 2 * b * t * dim * vocab
    extra = {"seq_len": t, "batch": b, "config": f"Llama-3-8B widths, 2 layers E{dim}"}
    variants = tuple(f"ccgqa-no-{f}" for f in ("rms_norm", "swiglu", "rope"))
    yield _lm_case(case_cls, "llama-lm", f"LlamaForCausalLM 2 layers B{b} T{t}", model, vocab,
                   b, t, device, extra, flops, variants)  # fmt: skip
