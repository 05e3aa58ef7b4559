"""CCGQA attention as ../shared/design/ccgqa.md describes it, in plain PyTorch.

Attention inside a compressed latent space: q, k, v are down-projected from the model
width E to hq*d / hkv*d channels, q and k go through two causal convolutions and the
qk-mean coupling, are L2-normalised with a learnable per-kv-head temperature and rotated,
then causal GQA attention runs there and only its output is up-projected.

This is the reference the fused path must reproduce. Under ``backend="ccgqa"`` its q/k
prologue (convs, qk mean, L2 norm, temperature, RoPE) becomes
``torch.ops.ccgqa.ccgqa_prologue`` and its attention core (hand-written, or SDPA at head
dims <= 32) ``torch.ops.ccgqa.gqa_attention``; the entries' ``prologue`` counts say which
spellings the prologue fusion covers so far.

The options spell the block the ways users write it (ccgqa.md, "What users write"); the
defaults are the canonical form. ``CCGQAAttentionSeed`` is the original project's variant.
Block-level near misses (``block_near_miss`` entries: symmetric conv padding, a mean over
the wrong heads) keep a genuine causal attention core, which fuses; the q/k prologue
fusion, and so the whole-block line, must not fire on them. A value shift by two tokens is
no near miss of ours: V's shift stays Inductor's code, so the block fuses as written.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, Shape, hidden_states
from .attention import kv_heads_for, repeat_kv, sdpa_promised
from .rope import rotary_tables, rotate_half


def _l2norm(x, how: str):
    if how == "normalize":
        return F.normalize(x, dim=-1)
    # not quite F.normalize: that clamps the norm by eps, this divides a zero vector by 0
    # (NaN); the same on every input a trained model sees, and fine for the corpus
    return x / x.norm(dim=-1, keepdim=True)


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
        attention: str = "handwritten",  # "sdpa" (enable_gqa), "sdpa_repeat_kv"
        kv_repeat: str = "repeat_kv",  # hand-written core: or "repeat_interleave"
        conv_style: str = "module",  # nn.Conv1d modules, or "functional": F.pad + F.conv1d
        qk_concat: bool = False,  # Zyphra: q and k channels concatenated, convolved once
        l2norm: str = "normalize",  # F.normalize, or "norm_div": x / x.norm(...)
        # near-miss switches (the defaults are CCGQA)
        causal: bool = True,
        conv_padding: str = "causal",  # or "symmetric"
        value_shift_tokens: int = 1,
        mean_grouping: str = "contiguous",  # or "strided": a mean over the wrong heads
    ):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
        if value_shift and (kv_heads * head_dim) % 2:
            raise ValueError("value shift needs an even kv latent width")
        self.h_q, self.h_kv, self.d = heads, kv_heads, head_dim
        self.qk_mean, self.value_shift, self.temperature = qk_mean, value_shift, temperature
        self.attention, self.kv_repeat, self.causal = attention, kv_repeat, causal
        self.conv_style, self.qk_concat, self.conv_padding = conv_style, qk_concat, conv_padding
        self.l2norm, self.value_shift_tokens = l2norm, value_shift_tokens
        self.mean_grouping = mean_grouping
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
        self.e_q, self.e_kv = e_q, e_kv
        if qk_concat:
            e_qk = e_q + e_kv
            self.qk_conv1 = nn.Conv1d(e_qk, e_qk, k1, groups=e_qk)  # depthwise
            self.qk_conv2 = nn.Conv1d(e_qk, e_qk, k2, groups=heads + kv_heads)  # per head
        else:
            # q and k convolved separately; each conv causally left-padded
            self.q_conv1 = nn.Conv1d(e_q, e_q, k1, groups=e_q)  # depthwise
            self.q_conv2 = nn.Conv1d(e_q, e_q, k2, groups=heads)  # grouped per head
            self.k_conv1 = nn.Conv1d(e_kv, e_kv, k1, groups=e_kv)
            self.k_conv2 = nn.Conv1d(e_kv, e_kv, k2, groups=kv_heads)
        self.temp = nn.Parameter(torch.zeros(kv_heads)) if temperature != "none" else None
        if temperature == "raw":
            nn.init.ones_(self.temp)
        self.o_proj = nn.Linear(e_q, dim, bias=False)

    def _pad(self, kernel):
        if self.conv_padding == "causal":
            return (kernel - 1, 0)
        left = (kernel - 1) // 2  # near miss: centred, so each output sees later tokens
        return (left, kernel - 1 - left)

    def _apply_conv(self, y, conv, padding):
        """One Conv1d on (B, C, T), as a module call or as F.pad + F.conv1d."""
        if self.conv_style == "functional":
            return F.conv1d(F.pad(y, padding), conv.weight, conv.bias, groups=conv.groups)
        return conv(F.pad(y, padding))

    def _conv(self, x, conv1, conv2):
        """(B, T, C) -> (B, T, C) through two causal convolutions along T."""
        y = x.transpose(1, 2)
        y = self._apply_conv(y, conv1, self._pad(self.k1))
        y = self._apply_conv(y, conv2, self._pad(self.k2))
        return y.transpose(1, 2)

    def _conv_qk(self, q_pre, k_pre):
        if not self.qk_concat:
            q = self._conv(q_pre, self.q_conv1, self.q_conv2)
            return q, self._conv(k_pre, self.k_conv1, self.k_conv2)
        # Zyphra: one left pad of (k1-1)+(k2-1), then both convs unpadded. The same as
        # padding each conv when conv1 has no bias; with one, the first k2-1 outputs also
        # see conv1's bias applied to the padding (a function of its own: the prologue
        # fusion folds that bias into conv2's, passes/ccgqa_prologue.py)
        y = torch.cat((q_pre, k_pre), dim=-1).transpose(1, 2)
        y = F.pad(y, self._pad(self.k1 + self.k2 - 1))  # the near miss centres it
        y = self.qk_conv2(self.qk_conv1(y)).transpose(1, 2)
        return y.split((self.e_q, self.e_kv), dim=-1)

    def _qk_mean(self, q_pre, k_pre, b, t):
        g = self.h_q // self.h_kv
        qh = q_pre.view(b, t, self.h_q, self.d)
        kh = k_pre.view(b, t, self.h_kv, self.d).repeat_interleave(g, dim=2)
        m_q = (qh + kh) / 2
        if self.mean_grouping == "contiguous":
            m_k = m_q.view(b, t, self.h_kv, g, self.d).mean(3)
        else:  # near miss: groups taken with a stride (heads j, j + hkv, ...)
            m_k = m_q.view(b, t, g, self.h_kv, self.d).mean(2)
        return m_q, m_k

    def forward(self, x):
        b, t, _ = x.shape
        q_pre, k_pre = self.q_proj(x), self.k_proj(x)
        if self.value_shift:
            shift = self.value_shift_tokens
            x_prev = F.pad(x, (0, 0, shift, 0))[:, :t]  # x_{t-1}, zero before the start
            v = torch.cat((self.v_proj_now(x), self.v_proj_prev(x_prev)), dim=-1)
        else:
            v = self.v_proj(x)
        q, k = self._conv_qk(q_pre, k_pre)
        q, k = q.view(b, t, self.h_q, self.d), k.view(b, t, self.h_kv, self.d)
        if self.qk_mean:
            m_q, m_k = self._qk_mean(q_pre, k_pre, b, t)
            q, k = q + m_q, k + m_k
        q = _l2norm(q, self.l2norm) * math.sqrt(self.d)
        k = _l2norm(k, self.l2norm) * math.sqrt(self.d)
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
        causal = self.causal
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=g > 1)
        if self.kv_repeat == "repeat_interleave":
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        else:
            k, v = repeat_kv(k, g), repeat_kv(v, g)
        if self.attention == "sdpa_repeat_kv":
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d))
        if causal:
            t = q.shape[-2]
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


class CCGQAAttentionSeed(nn.Module):
    """The original project's variant (ccgqa.md, "The original project's variant").

    Compression shrinks the head dim (d = dim / C / n_heads); one fused qkv projection;
    conv1 grouped per head, conv2 dense across heads, kernel 3, no bias, each causally
    left-padded; q gets half the mean over ALL key heads of k_pre and k half the mean over
    ALL query heads of q_pre (no self term, not per group); L2 norm without sqrt(d); k times
    one scalar temperature initialised to sqrt(d); full interleaved (pairwise) RoPE after
    the norm; SDPA with enable_gqa and is_causal, default 1/sqrt(d) scale.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        compression_factor: int,
        conv_kernel_size: int = 3,
        mean_scale: float = 0.5,
    ):
        super().__init__()
        # mean_scale: the seed's 1/2; another value is a near miss the patterns must skip
        self.mean_scale = mean_scale
        if dim % (compression_factor * n_heads) or n_heads % n_kv_heads:
            raise ValueError("dim must divide into heads after compression; hq % hkv == 0")
        self.h_q, self.h_kv = n_heads, n_kv_heads
        self.d = dim // compression_factor // n_heads
        self.kernel = conv_kernel_size
        e_q, e_kv = n_heads * self.d, n_kv_heads * self.d
        self.e_q, self.e_kv = e_q, e_kv
        self.qkv_proj = nn.Linear(dim, e_q + 2 * e_kv, bias=False)
        ks = conv_kernel_size
        self.q_conv1 = nn.Conv1d(e_q, e_q, ks, groups=n_heads, bias=False)
        self.q_conv2 = nn.Conv1d(e_q, e_q, ks, bias=False)
        self.k_conv1 = nn.Conv1d(e_kv, e_kv, ks, groups=n_kv_heads, bias=False)
        self.k_conv2 = nn.Conv1d(e_kv, e_kv, ks, bias=False)
        self.temperature = nn.Parameter(torch.tensor(math.sqrt(self.d)))
        self.o_proj = nn.Linear(e_q, dim, bias=False)

    def _conv(self, x, conv1, conv2):
        y = x.transpose(1, 2)
        y = conv2(F.pad(conv1(F.pad(y, (self.kernel - 1, 0))), (self.kernel - 1, 0)))
        return y.transpose(1, 2)

    @staticmethod
    def _rope_interleaved(x, cos, sin):
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return x * cos + rotated * sin

    def forward(self, x):
        b, t, _ = x.shape
        q_pre, k_pre, v = self.qkv_proj(x).split((self.e_q, self.e_kv, self.e_kv), dim=-1)
        q = self._conv(q_pre, self.q_conv1, self.q_conv2).view(b, t, self.h_q, self.d)
        k = self._conv(k_pre, self.k_conv1, self.k_conv2).view(b, t, self.h_kv, self.d)
        q_heads = q_pre.reshape(b, t, self.h_q, self.d)
        k_heads = k_pre.reshape(b, t, self.h_kv, self.d)
        q = q + self.mean_scale * k_heads.mean(dim=2, keepdim=True)
        k = k + self.mean_scale * q_heads.mean(dim=2, keepdim=True)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1) * self.temperature
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(b, t, self.h_kv, self.d).transpose(1, 2)
        with torch.no_grad():
            cos, sin = rotary_tables(t, self.d, x.device, q.dtype)
            half = self.d // 2
            cos = cos[:, :half].repeat_interleave(2, dim=-1)
            sin = sin[:, :half].repeat_interleave(2, dim=-1)
        q, k = self._rope_interleaved(q, cos, sin), self._rope_interleaved(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


SEED_COMPRESSION = 2


def _seed_dim(s: Shape) -> int:
    return SEED_COMPRESSION * s.heads * s.head_dim


def _build_seed(s: Shape) -> nn.Module:
    return CCGQAAttentionSeed(_seed_dim(s), s.heads, kv_heads_for(s.heads), SEED_COMPRESSION)


def _seed_inputs(s: Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    return (torch.randn(s.batch, s.seq, _seed_dim(s), dtype=dtype, device=device),)


def _build(head_dim: int | None = None, **options):
    def build(s: Shape) -> nn.Module:
        d = s.head_dim if head_dim is None else head_dim
        return CCGQAttention(s.hidden, s.heads, kv_heads_for(s.heads), d, **options)

    return build


def _promised(shape: Shape) -> bool:
    return True


BLOCK_NEAR_MISS = "block-level near miss: the q/k prologue must not fuse"


def _block_counts(prologue: int, causal: int) -> tuple[tuple[str, int], ...]:
    """The prologue's count, and the whole block's: reported when one prologue feeds the
    q and k of one causal attention, fused or kept on SDPA by policy (passes/blocks.py)."""
    return (("ccgqa_prologue", prologue), ("ccgqa_block", prologue if causal else 0))


def _hand(name, build, expect=1, note="", block_near_miss=False, prologue=0):
    """An entry whose attention core is hand-written (joint-graph patterns). ``prologue``:
    times the q/k prologue fusion must fire (0: must not, or not one of its idioms yet)."""
    return Entry(
        name,
        "gqa_attention",
        expect,
        build,
        hidden_states,
        note,
        promised=_promised,
        block_near_miss=block_near_miss,
        also=_block_counts(prologue, expect),
    )


def _sdpa(name, build, expect=1, note="", policy="", inputs=hidden_states, block=False, prologue=0):
    """An entry whose attention core is SDPA (the pre-grad rewrite)."""
    return Entry(
        name,
        "gqa_attention",
        expect,
        build,
        inputs,
        note,
        promised=sdpa_promised,
        policy=policy,
        block_near_miss=block,
        also=_block_counts(prologue, expect or policy),
        # one query head (hq = hkv = 1) traces the prologue differently again; the SDPA
        # core's promise covers it, the prologue's does not (it may fuse, must match)
        also_promised=_promised,
    )


# Some entries run without the learnable temperature: its gradient is one sum over every
# logit of a head, so ill-conditioned that in half precision eager's own error against
# float64 reaches tens of percent and the equivalence check (compiled within 2x eager's
# error) turns into a coin toss. The temperature is covered by the entries that keep it.
ENTRIES = [
    _hand(
        "ccgqa_handwritten_core",
        _build(),
        note="CCGQA block, hand-written causal GQA core",
        prologue=1,
    ),
    _hand(
        "ccgqa_partial_rope_no_shift",
        _build(value_shift=False, rotary_fraction=0.5, temperature="raw", conv_kernels=(3, 2)),
        note="CCGQA, half-rotary, no value shift, raw temperature",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_sdpa_repeat_kv",
        _build(attention="sdpa_repeat_kv", l2norm="norm_div"),
        note="CCGQA, SDPA on repeat_kv K/V, x / x.norm() (F.normalize clamps by eps)",
        prologue=1,
    ),
    _hand(
        "ccgqa_functional_conv_repeat_interleave",
        _build(conv_style="functional", kv_repeat="repeat_interleave", temperature="none"),
        note="CCGQA, F.pad + F.conv1d, hand-written core with repeat_interleave, no temperature",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_zyphra_qk_concat_conv",
        _build(qk_concat=True, attention="sdpa", temperature="raw"),
        note="CCGQA, q and k concatenated and convolved once (Zyphra: one pad, so conv1's "
        "bias reaches conv2's padding), raw temperature",
        prologue=1,
    ),
    _hand(
        "ccgqa_zyphra_norm_div_no_temperature",
        _build(qk_concat=True, l2norm="norm_div", temperature="none", rotary_fraction=0.5),
        note="CCGQA, Zyphra's concatenated convs, x / x.norm(), no temperature, half-rotary, "
        "hand-written core",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_zyphra_no_mean",
        _build(qk_concat=True, qk_mean=False, attention="sdpa", value_shift=False),
        note="CCGQA, Zyphra's concatenated convs without qk-mean, exp temperature",
        prologue=1,
    ),
    _hand(
        "ccgqa_no_mean_no_temperature",
        _build(qk_mean=False, temperature="none", value_shift=False, l2norm="norm_div"),
        note="CCGQA without qk-mean, temperature or value shift",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_no_mean_partial_rope",
        _build(qk_mean=False, attention="sdpa", rotary_fraction=0.5),
        note="CCGQA without qk-mean, exp temperature, half-rotary",
        prologue=1,
    ),
    _hand(
        "ccgqa_norm_div_raw_temperature",
        _build(l2norm="norm_div", temperature="raw", rotary_fraction=0.5),
        note="CCGQA, x / x.norm(), raw temperature, half-rotary",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_sdpa_norm_div_no_temperature",
        _build(attention="sdpa", l2norm="norm_div", temperature="none"),
        note="CCGQA, SDPA, x / x.norm(), no temperature",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_sdpa_d16",
        _build(head_dim=16, attention="sdpa", temperature="none"),
        note="CCGQA, SDPA, d=16, no temperature",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_sdpa_d32_partial_rope",
        _build(head_dim=32, attention="sdpa", rotary_fraction=0.5),
        note="CCGQA, SDPA, d=32, half-rotary",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_sdpa_d64",
        _build(head_dim=64, attention="sdpa"),
        0,
        "CCGQA, SDPA, d=64",
        policy="head dim 64 > 32: SDPA (cuDNN) is faster",
        prologue=1,
    ),
    _sdpa(
        "ccgqa_sdpa_d128",
        _build(head_dim=128, attention="sdpa"),
        0,
        "CCGQA, SDPA, d=128 (ZAYA's head dim): the prologue fuses, the core stays on SDPA",
        policy="head dim 128 > 32: SDPA (cuDNN) is faster",
        prologue=1,
    ),
    dataclasses.replace(
        _sdpa(
            "ccgqa_seed_variant",
            _build_seed,
            note="original project's CCGQAAttentionSeed: fused qkv, per-head + dense convs, "
            "all-heads qk-mean, scalar temperature, interleaved RoPE, SDPA enable_gqa; its "
            "prologue fuses in inference graphs and is left to Inductor in training graphs "
            "(policy config.SEED_PROLOGUE_IN_TRAINING: our backward kernels are slower)",
            inputs=_seed_inputs,
            prologue=1,
        ),
        also_in_training=_block_counts(0, 1),
        # at one token its RoPE tables have no time axis to be told from other constants
        also_promised=lambda s: s.seq > 1,
    ),
    # ---- near misses ----
    _sdpa(
        "ccgqa_near_non_causal",
        _build(attention="sdpa", causal=False),
        0,
        "CCGQA with non-causal attention: the core must not fuse (its prologue does)",
        prologue=1,
    ),
    _hand(
        "ccgqa_near_symmetric_conv_padding",
        _build(conv_padding="symmetric", conv_kernels=(3, 3), temperature="none"),
        note=f"convs padded on both sides (see later tokens); {BLOCK_NEAR_MISS}",
        block_near_miss=True,
    ),
    _sdpa(
        "ccgqa_near_value_shift_two",
        _build(attention="sdpa", value_shift_tokens=2),
        note="value shift by two tokens: not CCGQA's, but the value_shift rewrite is exact "
        "for any shift (the fused ops never see it), so the genuine q/k prologue and "
        "attention fuse",
        prologue=1,
    ),
    _hand(
        "ccgqa_near_no_mean_symmetric_conv_padding",
        _build(qk_mean=False, conv_padding="symmetric", conv_kernels=(3, 3), temperature="none"),
        note=f"no qk-mean, convs padded on both sides; {BLOCK_NEAR_MISS}",
        block_near_miss=True,
    ),
    _sdpa(
        "ccgqa_near_zyphra_symmetric_conv_padding",
        _build(qk_concat=True, attention="sdpa", temperature="raw", conv_padding="symmetric"),
        note=f"Zyphra's concatenated convs padded on both sides; {BLOCK_NEAR_MISS}",
        block=True,
    ),
    _sdpa(
        "ccgqa_near_zyphra_no_mean_symmetric_conv_padding",
        _build(
            qk_concat=True,
            qk_mean=False,
            temperature="none",
            attention="sdpa",
            conv_padding="symmetric",
        ),  # fmt: skip
        note=f"Zyphra's convs without qk-mean or temperature, padded on both sides; "
        f"{BLOCK_NEAR_MISS}",
        block=True,
    ),
    dataclasses.replace(
        _hand(
            "ccgqa_near_mean_wrong_heads",
            _build(mean_grouping="strided"),
            note=f"qk-mean over strided (wrong) head groups; {BLOCK_NEAR_MISS} (with one kv "
            "head, or one query head per group, the strided mean is the right one: may fuse)",
            block_near_miss=True,
        ),
        also_promised=lambda s: kv_heads_for(s.heads) > 1 and s.heads > kv_heads_for(s.heads),
    ),
]
