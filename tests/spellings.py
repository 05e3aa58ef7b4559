"""Layers as other people write them, for tests/test_generality.py.

Written independently of ``patterns/`` (the package's own reference spellings): each
module spells RMSNorm, SwiGLU, RoPE, causal GQA attention or a whole CCGQA block (see
../shared/design/ccgqa.md) the way some public codebase or textbook does, so that the tests
check recognition by what the code computes, not by how it is written. The ``Near*``
classes are mutations that compute ANOTHER function (another constant, a pad on the wrong
side, a non-causal mask, a mean over the wrong heads...): they must never fuse.

Every module takes hidden states ``x`` of shape (B, T, DIM) (``DIM`` a class attribute)
and returns one tensor. Parameters are initialised away from special values (a zero
temperature, unit norm weights) so that every gradient is informative.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from torch import nn


def _near_one(n: int) -> nn.Parameter:
    return nn.Parameter(1.0 + 0.1 * torch.randn(n))


# =========================================================================================
# RMSNorm: y = x / sqrt(mean(x^2, -1) + eps) * w
# =========================================================================================


class RMSMeanOfProduct(nn.Module):
    """torch.mean(x * x) as a function, rsqrt, the weight last."""

    DIM = 40

    def __init__(self):
        super().__init__()
        self.scale = _near_one(self.DIM)
        self.eps = 1e-6

    def forward(self, x):
        ms = torch.mean(x * x, dim=-1, keepdim=True)
        return x * torch.rsqrt(ms + self.eps) * self.scale


class RMSPowOperatorDivSqrt(nn.Module):
    """``x ** 2``, the mean over a positive dim index, division by sqrt."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.g = _near_one(self.DIM)

    def forward(self, x):
        return x / torch.sqrt((x**2).mean(dim=2, keepdim=True) + 1e-5) * self.g


class RMSReciprocalOfSqrt(nn.Module):
    """``x * (1.0 / torch.sqrt(...))`` with ``square()``, weight first."""

    DIM = 32

    def __init__(self):
        super().__init__()
        self.weight = _near_one(self.DIM)

    def forward(self, x):
        inv = 1.0 / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
        return self.weight * (x * inv)


class RMSExpOfLog(RMSReciprocalOfSqrt):
    """The inverse root as ``exp(-0.5 * log(ms + eps))`` (log-domain code)."""

    def forward(self, x):
        ms = x.pow(2).mean(-1, keepdim=True)
        return x * torch.exp(-0.5 * torch.log(ms + 1e-6)) * self.weight


class RMSSumOverWidth(nn.Module):
    """The mean spelled as a sum divided by the width, weight folded into the factor."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        ms = x.pow(2).sum(-1, keepdim=True) / x.shape[-1]
        return x * (self.w * torch.rsqrt(ms + 1e-5))


class RMSNormTimesRsqrtWidth(nn.Module):
    """RMS = ||x|| / sqrt(D) with no eps at all (``x.norm(dim=-1) * D**-0.5``)."""

    DIM = 32

    def __init__(self):
        super().__init__()
        self.gamma = _near_one(self.DIM)

    def forward(self, x):
        rms = x.norm(dim=-1, keepdim=True) * self.DIM**-0.5
        return x / rms * self.gamma


class RMSVectorNormSquared(nn.Module):
    """``linalg.vector_norm`` squared over D, eps inside the root."""

    DIM = 40

    def __init__(self):
        super().__init__()
        self.weight = _near_one(self.DIM)

    def forward(self, x):
        n2 = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square()
        return x * torch.rsqrt(n2 / self.DIM + 1e-6) * self.weight


class RMSMulMethodUpcast(nn.Module):
    """T5-style: ``.to(float32)`` variance, ``.mul(w)`` method, ``type_as`` back."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.weight = _near_one(self.DIM)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = x * torch.rsqrt(variance + self.variance_epsilon)
        return h.type_as(x).mul(self.weight)


class RMSTorchModule(nn.Module):
    """``nn.RMSNorm`` between two linear layers."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(self.DIM, 40)
        self.norm = nn.RMSNorm(40, eps=1e-5)
        nn.init.normal_(self.norm.weight, 1.0, 0.1)
        self.down = nn.Linear(40, self.DIM)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


class RMSPerHeadQKNorm(nn.Module):
    """Qwen3/OLMo-style q/k norm: RMSNorm over each head's D, on (B, T, H, D)."""

    DIM = 32
    HEADS = 4

    def __init__(self):
        super().__init__()
        d = self.DIM // self.HEADS
        self.q = nn.Linear(self.DIM, self.DIM, bias=False)
        self.k = nn.Linear(self.DIM, self.DIM, bias=False)
        self.q_w, self.k_w = _near_one(d), _near_one(d)

    @staticmethod
    def _rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x):
        b, t, _ = x.shape
        q = self._rms(self.q(x).view(b, t, self.HEADS, -1), self.q_w)
        k = self._rms(self.k(x).view(b, t, self.HEADS, -1), self.k_w)
        return (q * k).flatten(2)


class RMSParallelBlockNorms(nn.Module):
    """Two norms reading the same residual stream (a parallel attention/MLP block)."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = _near_one(self.DIM), _near_one(self.DIM)
        self.a = nn.Linear(self.DIM, self.DIM, bias=False)
        self.m = nn.Linear(self.DIM, self.DIM, bias=False)

    def forward(self, x):
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        n1 = x * inv * self.w1
        inv2 = torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + 1e-6)
        n2 = self.w2 * x * inv2
        return x + self.a(n1) + self.m(n2)


class RMSKeepdimFalse(nn.Module):
    """The mean without keepdim, the factor unsqueezed back."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        ms = x.pow(2).mean(-1)
        return x * torch.rsqrt(ms + 1e-6).unsqueeze(-1) * self.w


class RMSEpsInsideMean(nn.Module):
    """eps added to every square before the mean: mean(x^2 + eps) = mean(x^2) + eps."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        return x * torch.rsqrt((x * x + 1e-6).mean(-1, keepdim=True)) * self.w


class RMSOfCentered(nn.Module):
    """A bias-free LayerNorm: an RMSNorm of ``x - mean(x)`` (that RMSNorm is genuine)."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w


class _WeightedRMS(nn.Module):
    DIM = 32

    def __init__(self):
        super().__init__()
        self.weight = _near_one(self.DIM)


class RMSEinsumSelfContraction(_WeightedRMS):
    """The mean square as an einsum of x with itself over the channels, divided by D."""

    DIM = 32

    def forward(self, x):
        ms = torch.einsum("...d,...d->...", x, x) / x.shape[-1]
        return x * torch.rsqrt(ms + 1e-6).unsqueeze(-1) * self.weight


class RMSSquareTimesMeanVector(_WeightedRMS):
    """The mean square as the square times a (D, 1) column of 1/D made in the forward."""

    DIM = 24

    def forward(self, x):
        d = x.shape[-1]
        avg = torch.full((d, 1), 1.0 / d, device=x.device, dtype=x.dtype)
        return x / torch.sqrt(x.pow(2) @ avg + 1e-5) * self.weight


class RMSVariancePlusMeanSquared(_WeightedRMS):
    """The mean square as the biased variance plus the squared mean."""

    DIM = 32

    def forward(self, x):
        ms = x.var(-1, unbiased=False, keepdim=True) + x.mean(-1, keepdim=True) ** 2
        return x * torch.rsqrt(ms + 1e-6) * self.weight


class NearRMSVarianceOnly(RMSVariancePlusMeanSquared):
    """Divides by the root of the variance alone (a LayerNorm that does not centre)."""

    def forward(self, x):
        return x * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6) * self.weight


class NearRMSEinsumOverTokens(RMSEinsumSelfContraction):
    """The einsum contracts the tokens, not the channels."""

    def forward(self, x):
        ms = torch.einsum("btd,btd->bd", x, x) / x.shape[1]
        return x * torch.rsqrt(ms + 1e-6).unsqueeze(1) * self.weight


# ---- RMSNorm near misses -----------------------------------------------------------------


class NearRMSEpsOutsideNorm(nn.Module):
    """``x / (||x|| / sqrt(D) + eps)``: eps outside the root (a common spelling, not RMSNorm)."""

    DIM = 32

    def __init__(self):
        super().__init__()
        self.gamma = _near_one(self.DIM)

    def forward(self, x):
        rms = x.norm(dim=-1, keepdim=True) * self.DIM**-0.5
        return x / (rms + 1e-2) * self.gamma


class NearRMSNoRoot(nn.Module):
    """Divides by the mean square itself, not its root."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


class NearRMSMeanOverHeads(nn.Module):
    """On (B, T, H, D), the mean over the heads (dim 2) instead of the head dim."""

    DIM = 32
    HEADS = 4

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM // self.HEADS)

    def forward(self, x):
        b, t, _ = x.shape
        h = x.view(b, t, self.HEADS, -1)
        y = h * torch.rsqrt(h.pow(2).mean(2, keepdim=True) + 1e-6) * self.w
        return y.flatten(2)


class NearRMSPerTokenGain(nn.Module):
    """A per-position gain (T, 1) after a genuine unweighted RMSNorm: the core may fuse,
    the gain must never be taken for a per-channel weight."""

    DIM = 24
    SEQ = 7

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(1.0 + 0.1 * torch.randn(self.SEQ, 1))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain


class NearRMSClampInsteadOfEps(nn.Module):
    """``x / max(rms, eps)``: a clamp, not eps inside the root (they differ at small rms);
    the op's clamped form."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        return x / rms.clamp_min(1e-3) * self.w


class NearRMSStatsOfScaledInput(nn.Module):
    """The statistic of ``x * w`` normalising ``x`` itself."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        xw = x * self.w
        return x * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + 1e-6)


class RMSSumOverWidthPlusOne(nn.Module):
    """sum(x^2) / (D + 1): equals sqrt((D+1)/D) * RMSNorm with eps * (D+1)/D, so fusing
    it is allowed only if exact (not a near miss, not a promised idiom either)."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        ms = x.pow(2).sum(-1, keepdim=True) / (self.DIM + 1)
        return x * torch.rsqrt(ms + 1e-5) * self.w


# =========================================================================================
# SwiGLU: silu(gate) * up
# =========================================================================================


class _TwoProj(nn.Module):
    DIM = 24
    INTER = 37

    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(self.DIM, self.INTER, bias=False)
        self.w3 = nn.Linear(self.DIM, self.INTER, bias=False)
        self.w2 = nn.Linear(self.INTER, self.DIM, bias=False)


class SwiGLUSigmoidFirst(_TwoProj):
    """``torch.sigmoid(a) * a * b``: silu written out, the sigmoid first."""

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(torch.sigmoid(a) * a * b)


class SwiGLUUpTimesSwish(_TwoProj):
    """``b * (a * a.sigmoid())`` with method calls, the up projection first."""

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(b * (a * a.sigmoid()))


class SwiGLURolesSwapped(_TwoProj):
    """``a * sigmoid(b) * b`` is silu(b) * a: the same function with w3 as the gate."""

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(a * torch.sigmoid(b) * b)


class _Packed(nn.Module):
    DIM = 24
    INTER = 32

    def __init__(self):
        super().__init__()
        self.w13 = nn.Linear(self.DIM, 2 * self.INTER, bias=False)
        self.w2 = nn.Linear(self.INTER, self.DIM, bias=False)


class SwiGLUTorchSplit(_Packed):
    def forward(self, x):
        gate, up = torch.split(self.w13(x), [self.INTER, self.INTER], dim=-1)
        return self.w2(F.silu(gate) * up)


class SwiGLUSlices(_Packed):
    """Halves by slicing; the second half is the gate."""

    def forward(self, x):
        h = self.w13(x)
        return self.w2(h[..., : self.INTER] * F.silu(h[..., self.INTER :]))


class SwiGLUInterleavedHalves(_Packed):
    """Gate and up interleaved column by column (even / odd)."""

    def forward(self, x):
        h = self.w13(x)
        return self.w2(F.silu(h[..., ::2]) * h[..., 1::2])


class SwiGLUUnbind(_Packed):
    """``view(..., 2, I).unbind(-2)``."""

    def forward(self, x):
        b, t, _ = x.shape
        gate, up = self.w13(x).view(b, t, 2, self.INTER).unbind(-2)
        return self.w2(F.silu(gate).mul(up))


class SwiGLUEinsum(nn.Module):
    """Raw weight matrices and einsum projections."""

    DIM = 24
    INTER = 40

    def __init__(self):
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(self.INTER, self.DIM) / self.DIM**0.5)
        self.W3 = nn.Parameter(torch.randn(self.INTER, self.DIM) / self.DIM**0.5)
        self.W2 = nn.Parameter(torch.randn(self.DIM, self.INTER) / self.INTER**0.5)

    def forward(self, x):
        a = torch.einsum("btd,fd->btf", x, self.W1)
        b = torch.einsum("btd,fd->btf", x, self.W3)
        return torch.einsum("btf,df->btd", nn.functional.silu(a) * b, self.W2)


class SwiGLUModuleFp32(_TwoProj):
    """``nn.SiLU()`` on an fp32 upcast, cast back with ``type_as``."""

    def __init__(self):
        super().__init__()
        self.act = nn.SiLU()

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(self.act(a.float()).type_as(b) * b)


class SwiGLUExpSpelling(_TwoProj):
    """silu without sigmoid: ``a / (1 + exp(-a))``."""

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(a / (1 + torch.exp(-a)) * b)


class SwiGLUInPlace(_TwoProj):
    """``nn.SiLU(inplace=True)`` on the gate projection, then ``gate.mul_(up)``."""

    def __init__(self):
        super().__init__()
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        gate = self.act(self.w1(x))
        gate.mul_(self.w3(x))
        return self.w2(gate)


# ---- SwiGLU near misses ------------------------------------------------------------------


class NearSwiGLUQuickGelu(_TwoProj):
    """``a * sigmoid(1.702 a) * b``: quick-GELU gating, not SiLU."""

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(a * torch.sigmoid(1.702 * a) * b)


class NearSwiGLUSwishBeta(_TwoProj):
    """Swish-beta with a learnable beta (initialised away from 1)."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(a * torch.sigmoid(self.beta * a) * b)


class NearSwiGLUDetachedSigmoid(_TwoProj):
    """The same forward as SwiGLU, but no gradient through the sigmoid."""

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(a * torch.sigmoid(a.detach()) * b)


class NearSwiGLUSum(_TwoProj):
    """``silu(a) + b``: a sum, not a product."""

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(F.silu(a) + b)


# =========================================================================================
# RoPE
# =========================================================================================


def _inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


class _QK(nn.Module):
    """Projections to q, k of (B, T, H, D); the output joins both rotated tensors."""

    DIM = 24
    HEADS = 3
    HEAD_DIM = 8

    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(self.DIM, self.HEADS * self.HEAD_DIM, bias=False)
        self.wk = nn.Linear(self.DIM, self.HEADS * self.HEAD_DIM, bias=False)

    def qk(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.HEADS, self.HEAD_DIM)
        k = self.wk(x).view(b, t, self.HEADS, self.HEAD_DIM)
        return q, k

    @staticmethod
    def join(q, k):
        """(B, T, H, D) pair -> (B, T, 2*H*D)."""
        return torch.cat((q.flatten(2), k.flatten(2)), dim=-1)


class RopeGptFast(_QK):
    """gpt-fast: freqs_cis (T, D/2, 2) stacked cos/sin, ``torch.stack([...], -1).flatten(3)``."""

    def forward(self, x):
        q, k = self.qk(x)
        t = x.shape[1]
        freqs = torch.outer(torch.arange(t, device=x.device).float(), _inv_freq(self.HEAD_DIM))
        freqs_cis = torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1)
        return self.join(self.apply_rotary_emb(q, freqs_cis), self.apply_rotary_emb(k, freqs_cis))

    @staticmethod
    def apply_rotary_emb(x, freqs_cis):
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
        freqs_cis = freqs_cis.view(1, xshaped.size(1), 1, xshaped.size(3), 2)
        x_out2 = torch.stack(
            [
                xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
                xshaped[..., 1] * freqs_cis[..., 0] + xshaped[..., 0] * freqs_cis[..., 1],
            ],
            -1,
        )
        return x_out2.flatten(3).type_as(x)


class RopeComplexHeadsFirst(_QK):
    """Complex multiplication on (B, H, T, D) with ``torch.complex(cos, sin)`` tables."""

    def forward(self, x):
        q, k = self.qk(x)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        t = x.shape[1]
        angles = torch.arange(t, device=x.device).float()[:, None] * _inv_freq(self.HEAD_DIM)
        rot = torch.complex(torch.cos(angles), torch.sin(angles))  # (T, D/2)

        def apply(v):
            vc = torch.view_as_complex(v.float().unflatten(-1, (-1, 2)).contiguous())
            return torch.view_as_real(vc * rot).flatten(-2).to(v.dtype)

        return self.join(apply(q).transpose(1, 2), apply(k).transpose(1, 2))


class RopeMetaTokensFirst(_QK):
    """Meta Llama layout: complex rotation on (B, T, H, D), freqs_cis reshaped for
    broadcast as (1, T, 1, D/2) with ``unsqueeze``."""

    HEADS = 2
    HEAD_DIM = 16

    def forward(self, x):
        q, k = self.qk(x)
        t = x.shape[1]
        freqs = torch.outer(torch.arange(t, device=x.device).float(), _inv_freq(self.HEAD_DIM))
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs).unsqueeze(0).unsqueeze(2)
        q_c = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        k_c = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
        q = torch.view_as_real(q_c * freqs_cis).flatten(3).type_as(q)
        k = torch.view_as_real(k_c * freqs_cis).flatten(3).type_as(k)
        return self.join(q, k)


class RopeHFChunkNoGrad(_QK):
    """Hugging Face style: tables from position ids under ``torch.no_grad()`` (batched
    (B, T, D) tables), rotate_half by ``chunk``, applied on (B, H, T, D)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", _inv_freq(self.HEAD_DIM), persistent=False)

    def rotary(self, x, position_ids):
        with torch.no_grad():
            inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
            pos = position_ids[:, None, :].float()
            freqs = (inv @ pos).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    @staticmethod
    def rotate_half(v):
        v1, v2 = v.chunk(2, dim=-1)
        return torch.cat((-v2, v1), dim=-1)

    def forward(self, x):
        b, t, _ = x.shape
        position_ids = torch.arange(t, device=x.device)[None].expand(b, t)
        cos, sin = self.rotary(x, position_ids)
        q, k = self.qk(x)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        return self.join(q.transpose(1, 2), k.transpose(1, 2))


class RopePartialSplit(_QK):
    """Partial rotary (half the head dims) with ``split``, tables repeated by ``.repeat``,
    applied on (B, T, H, D) with tables unsqueezed at the head dim."""

    HEAD_DIM = 16

    def forward(self, x):
        q, k = self.qk(x)
        rd = self.HEAD_DIM // 2
        t = x.shape[1]
        f = torch.arange(t, device=x.device).float()[:, None] * _inv_freq(rd)[None, :]
        cos, sin = f.cos().repeat(1, 2)[:, None, :], f.sin().repeat(1, 2)[:, None, :]

        def apply(v):
            v_rot, v_pass = torch.split(v, [rd, self.HEAD_DIM - rd], dim=-1)
            a, b = v_rot[..., : rd // 2], v_rot[..., rd // 2 :]
            v_rot = v_rot * cos + torch.cat((-b, a), dim=-1) * sin
            return torch.cat([v_rot, v_pass], dim=-1)

        return self.join(apply(q), apply(k))


class RopeHalfTablesExplicit(_QK):
    """The rotation written out on the halves with half-width tables (no rotate_half)."""

    def forward(self, x):
        q, k = self.qk(x)
        t = x.shape[1]
        f = torch.arange(t, device=x.device).float()[:, None] * _inv_freq(self.HEAD_DIM)
        cos, sin = f.cos()[:, None], f.sin()[:, None]  # (T, 1, D/2)

        def apply(v):
            h = v.shape[-1] // 2
            v1, v2 = v[..., :h], v[..., h:]
            return torch.cat((v1 * cos - v2 * sin, v2 * cos + v1 * sin), dim=-1)

        return self.join(apply(q), apply(k))


class RopeEinopsInterleaved(_QK):
    """rotary-embedding-torch style: einops ``rearrange``/``repeat`` and pairwise rotation."""

    def forward(self, x):
        q, k = self.qk(x)
        q, k = (einops.rearrange(v, "b t h d -> b h t d") for v in (q, k))
        t = x.shape[1]
        pos = torch.arange(t, device=x.device).float()
        freqs = torch.einsum("t,f->tf", pos, _inv_freq(self.HEAD_DIM))
        freqs = einops.repeat(freqs, "... n -> ... (n r)", r=2)
        q = q * freqs.cos() + self.rotate_half(q) * freqs.sin()
        k = k * freqs.cos() + self.rotate_half(k) * freqs.sin()
        q, k = (einops.rearrange(v, "b h t d -> b t h d") for v in (q, k))
        return self.join(q, k)

    @staticmethod
    def rotate_half(v):
        v = einops.rearrange(v, "... (d r) -> ... d r", r=2)
        v1, v2 = v.unbind(dim=-1)
        v = torch.stack((-v2, v1), dim=-1)
        return einops.rearrange(v, "... d r -> ... (d r)")


# ---- RoPE near misses --------------------------------------------------------------------


class RopeNegativeAngles(RopeHFChunkNoGrad):
    """rotate_half written the other way, cat(x2, -x1): every pair turns by -angle, a
    rotation still (scores depend on the positions' difference, mirrored)."""

    @staticmethod
    def rotate_half(v):
        v1, v2 = v.chunk(2, dim=-1)
        return torch.cat((v2, -v1), dim=-1)


class RopeSignBakedInSin(_QK):
    """The rotation a plain swap, ``cat((x2, x1))``, and the quarter turn's sign baked into
    the sin buffer, ``cat((-sin, sin))`` (no negation on the activations); (T, 1, D)
    buffers sliced per call, applied on (B, T, H, D)."""

    MAX_T = 16

    def __init__(self):
        super().__init__()
        f = torch.outer(torch.arange(self.MAX_T).float(), _inv_freq(self.HEAD_DIM))
        self.register_buffer("cos", torch.cat((f.cos(), f.cos()), -1)[:, None], persistent=False)
        self.register_buffer("sin_signed", torch.cat((-f.sin(), f.sin()), -1)[:, None], persistent=False)

    @staticmethod
    def swap(v):
        v1, v2 = v.chunk(2, dim=-1)
        return torch.cat((v2, v1), dim=-1)

    def forward(self, x):
        t = x.shape[1]
        q, k = self.qk(x)
        cos, sin = self.cos[:t].to(x.dtype), self.sin_signed[:t].to(x.dtype)
        return self.join(q * cos + self.swap(q) * sin, k * cos + self.swap(k) * sin)


class RopePairsSignBakedInSin(RopeSignBakedInSin):
    """Interleaved pairs swapped, ``stack((x1, x0))``, the sign in the sin table's even
    entries."""

    def __init__(self):
        super().__init__()
        f = torch.outer(torch.arange(self.MAX_T).float(), _inv_freq(self.HEAD_DIM))
        self.cos = f.cos().repeat_interleave(2, -1)[:, None]
        self.sin_signed = torch.stack((-f.sin(), f.sin()), -1).flatten(-2)[:, None]

    @staticmethod
    def swap(v):
        return torch.stack((v[..., 1::2], v[..., 0::2]), dim=-1).flatten(-2)


class RopeRollSignTable(RopeSignBakedInSin):
    """``roll(x, D/2) * sign * sin`` with the sign a buffer of its own."""

    def __init__(self):
        super().__init__()
        f = torch.outer(torch.arange(self.MAX_T).float(), _inv_freq(self.HEAD_DIM))
        self.register_buffer("sin", torch.cat((f.sin(), f.sin()), -1)[:, None], persistent=False)
        half = self.HEAD_DIM // 2
        self.register_buffer("sign", torch.cat((-torch.ones(half), torch.ones(half))), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        q, k = self.qk(x)
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        half = self.HEAD_DIM // 2

        def rotary(v):
            return v * cos + torch.roll(v, shifts=half, dims=-1) * self.sign * sin

        return self.join(rotary(q), rotary(k))


class NearRopeSignBakedNoSwap(RopeSignBakedInSin):
    """Near miss: the halves joined in their own order (no swap): x * (cos + sin), a
    scaling, no rotation."""

    @staticmethod
    def swap(v):
        v1, v2 = v.chunk(2, dim=-1)
        return torch.cat((v1, v2), dim=-1)


class NearRopeGptFastSign(RopeGptFast):
    """gpt-fast with one sign flipped: [[c, -s], [-s, c]] is no rotation."""

    @staticmethod
    def apply_rotary_emb(x, freqs_cis):
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
        freqs_cis = freqs_cis.view(1, xshaped.size(1), 1, xshaped.size(3), 2)
        x_out2 = torch.stack(
            [
                xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
                xshaped[..., 1] * freqs_cis[..., 0] - xshaped[..., 0] * freqs_cis[..., 1],
            ],
            -1,
        )
        return x_out2.flatten(3).type_as(x)


class NearRopeMixedLayouts(RopeHFChunkNoGrad):
    """Odd/even elements concatenated as halves: a pairwise split with a half-split
    reassembly, which rotates no pair."""

    @staticmethod
    def rotate_half(v):
        return torch.cat((-v[..., 1::2], v[..., ::2]), dim=-1)


class NearRopeComplexWrongFlatten(RopeComplexHeadsFirst):
    """Meta's complex product, flattened (imag, real)-major: the pairs turned, laid out as
    halves (real parts first), which is DeepSeek-V3's RoPE."""

    def forward(self, x):
        q, k = self.qk(x)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        t = x.shape[1]
        angles = torch.arange(t, device=x.device).float()[:, None] * _inv_freq(self.HEAD_DIM)
        rot = torch.complex(torch.cos(angles), torch.sin(angles))

        def apply(v):
            vc = torch.view_as_complex(v.float().unflatten(-1, (-1, 2)).contiguous())
            return torch.view_as_real(vc * rot).transpose(-1, -2).flatten(-2).to(v.dtype)

        return self.join(apply(q).transpose(1, 2), apply(k).transpose(1, 2))


class NearRopeRotatesTheOtherTensor(RopeHFChunkNoGrad):
    """``q * cos + rotate_half(k) * sin``: q's rotation built from k (a copy-paste bug)."""

    def forward(self, x):
        b, t, _ = x.shape
        position_ids = torch.arange(t, device=x.device)[None].expand(b, t)
        cos, sin = self.rotary(x, position_ids)
        q, k = self.qk(x)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q2 = q * cos + self.rotate_half(k) * sin
        k2 = k * cos + self.rotate_half(q) * sin
        return self.join(q2.transpose(1, 2), k2.transpose(1, 2))


# =========================================================================================
# Causal GQA attention
# =========================================================================================


class _QKV(nn.Module):
    """q, k, v projections and an output projection; ``core`` is the attention."""

    DIM = 32
    HEADS = 4
    KV_HEADS = 2
    HEAD_DIM = 8

    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(self.DIM, self.HEADS * self.HEAD_DIM, bias=False)
        self.wk = nn.Linear(self.DIM, self.KV_HEADS * self.HEAD_DIM, bias=False)
        self.wv = nn.Linear(self.DIM, self.KV_HEADS * self.HEAD_DIM, bias=False)
        self.wo = nn.Linear(self.HEADS * self.HEAD_DIM, self.DIM, bias=False)

    @property
    def groups(self):
        return self.HEADS // self.KV_HEADS

    def forward(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.HEADS, self.HEAD_DIM)
        k = self.wk(x).view(b, t, self.KV_HEADS, self.HEAD_DIM)
        v = self.wv(x).view(b, t, self.KV_HEADS, self.HEAD_DIM)
        return self.wo(self.core(q, k, v).reshape(b, t, -1))

    def core(self, q, k, v):
        """(B, T, H, D) in, (B, T, H, D) out."""
        raise NotImplementedError


def _expand_heads(x, groups):
    """(B, Hkv, T, D) -> (B, Hkv*G, T, D), each kv head G times in a row."""
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


class AttnEinsumExpand(_QKV):
    """einsum on (B, H, T, D), expand+reshape GQA, ``* D**-0.5``, ``masked_fill(~tril)``."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.HEAD_DIM**-0.5
        t = q.shape[2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v).transpose(1, 2)


class AttnEinsumTokensFirst(_QKV):
    """einsum straight on (B, T, H, D), ``repeat_interleave`` on dim 2, ``/ math.sqrt(d)``,
    ``triu(1)`` bool mask."""

    def core(self, q, k, v):
        k = k.repeat_interleave(self.groups, dim=2)
        v = v.repeat_interleave(self.groups, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.HEAD_DIM)
        t = q.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        p = s.masked_fill(future, float("-inf")).softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", p, v)


class AttnBmmFlat(_QKV):
    """bmm on (B*H, T, D) with an additive float -inf mask."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        k = k.repeat_interleave(self.groups, dim=2)
        v = v.repeat_interleave(self.groups, dim=2)
        q, k, v = (y.transpose(1, 2).reshape(b * h, t, d) for y in (q, k, v))
        mask = torch.full((t, t), float("-inf"), device=q.device).triu(1)
        s = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(d)) + mask
        o = torch.bmm(F.softmax(s, dim=-1), v)
        return o.view(b, h, t, d).transpose(1, 2)


class AttnScaleSplitWhere(_QKV):
    """The scale split between q and k (``d**-0.25`` each), ``torch.where(keep, s, -inf)``,
    fp32 softmax cast back, einops.repeat GQA, ``@``."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k = einops.repeat(k, "b h t d -> b (h g) t d", g=self.groups)
        v = einops.repeat(v, "b h t d -> b (h g) t d", g=self.groups)
        c = self.HEAD_DIM**-0.25
        s = (q * c) @ (k * c).transpose(-2, -1)
        t = q.shape[2]
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        s = torch.where(keep, s, float("-inf"))
        p = F.softmax(s.float(), dim=-1).to(q.dtype)
        return (p @ v).transpose(1, 2)


class AttnSoftmaxTypeAs(_QKV):
    """The fp32 probabilities cast back with ``.type_as(q)`` (q read for its dtype only)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        s = torch.matmul(q, k.transpose(-1, -2)) * self.HEAD_DIM**-0.5
        t = q.shape[2]
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        p = F.softmax(s.masked_fill(~keep, float("-inf")).float(), dim=-1).type_as(q)
        return torch.matmul(p, v).transpose(1, 2)


class AttnScaledQueryArangeMask(_QKV):
    """q divided by sqrt(d) beforehand, a mask from ``arange`` comparisons."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        q = q / math.sqrt(self.HEAD_DIM)
        s = q @ k.transpose(2, 3)
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return torch.matmul(s.softmax(-1), v).transpose(1, 2)


class AttnMatrixTranspose(_QKV):
    """k transposed with the ``.mT`` property."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        s = (q @ k.mT) * self.HEAD_DIM**-0.5
        t = q.shape[2]
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        return (s.masked_fill(future, float("-inf")).softmax(-1) @ v).transpose(1, 2)


class AttnMuPScale(_QKV):
    """muP's 1/d scale (another scale is still attention), softmax over dim=3, scale
    applied after the mask."""

    def core(self, q, k, v):
        q, k, v = (y.permute(0, 2, 1, 3) for y in (q, k, v))
        k = k.repeat_interleave(self.groups, dim=1)
        v = v.repeat_interleave(self.groups, dim=1)
        t = q.shape[2]
        future = torch.triu(torch.ones(t, t, device=q.device), diagonal=1).bool()
        s = torch.matmul(q, k.transpose(2, 3)).masked_fill(future, float("-inf"))
        s = s * (1.0 / self.HEAD_DIM)
        return torch.matmul(F.softmax(s, dim=3), v).permute(0, 2, 1, 3)


class AttnHFEagerMinMask(_QKV):
    """HF eager style: additive ``finfo.min`` causal mask, softmax(dtype=float32), dropout
    with p=0."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        mask = torch.full((t, t), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
        mask = mask.triu(1)[None, None]
        w = torch.matmul(q, k.transpose(2, 3)) * self.HEAD_DIM**-0.5 + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.0, training=self.training)
        return torch.matmul(w, v).transpose(1, 2).contiguous()


class AttnFp32Scores(_QKV):
    """q and k upcast before the product, probabilities cast back to v's dtype."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / self.HEAD_DIM**0.5
        t = q.shape[2]
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(s.masked_fill(keep.logical_not(), float("-inf")), -1).to(v.dtype)
        return (p @ v).transpose(1, 2)


class AttnNanoGPT(nn.Module):
    """nanoGPT's CausalSelfAttention: fused c_attn, ``split``, a registered tril buffer
    compared ``== 0`` (no GQA)."""

    DIM = 32
    HEADS = 4
    MAX_T = 16

    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(self.DIM, 3 * self.DIM)
        self.c_proj = nn.Linear(self.DIM, self.DIM)
        self.register_buffer(
            "bias",
            torch.tril(torch.ones(self.MAX_T, self.MAX_T)).view(1, 1, self.MAX_T, self.MAX_T),
        )

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.DIM, dim=2)
        nh = self.HEADS
        k = k.view(B, T, nh, C // nh).transpose(1, 2)
        q = q.view(B, T, nh, C // nh).transpose(1, 2)
        v = v.view(B, T, nh, C // nh).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class AttnNanoGPTWindowBuffer(AttnNanoGPT):
    """nanoGPT with a sliding-window (3 tokens) buffer instead of tril: the mask is only
    known at run time, where it is not causal."""

    def __init__(self):
        super().__init__()
        ones = torch.ones(self.MAX_T, self.MAX_T)
        self.bias.copy_((torch.tril(ones) * torch.triu(ones, diagonal=-2)).view_as(self.bias))


class AttnManualSoftmax(_QKV):
    """softmax written out: exp(s - max) / sum."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        s = q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5
        t = q.shape[2]
        s = s.masked_fill(
            ~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf")
        )
        e = torch.exp(s - s.amax(dim=-1, keepdim=True))
        return ((e / e.sum(dim=-1, keepdim=True)) @ v).transpose(1, 2)


class AttnManualSoftmaxExp2(_QKV):
    """softmax written out in fp32 with exp2: a detached ``max(...).values`` shift, the
    log2(e) factor folded into the scale, a multiply by the reciprocal of the row sum."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        s = (q.float() @ k.float().transpose(-1, -2)) * (1.4426950408889634 / self.HEAD_DIM**0.5)
        s = torch.where(torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), s, -torch.inf)
        e = torch.exp2(s - torch.max(s, dim=-1, keepdim=True).values.detach())
        p = e * e.sum(dim=-1, keepdim=True).reciprocal()
        return (p.to(v.dtype) @ v).transpose(1, 2)


class AttnManualSoftmaxLogsumexp(_QKV):
    """softmax written as ``exp(s - logsumexp(s))``, einsum scores, an additive mask."""

    def core(self, q, k, v):
        k, v = k.repeat_interleave(self.groups, dim=2), v.repeat_interleave(self.groups, dim=2)
        t = q.shape[1]
        s = torch.einsum("bqhd,bkhd->bhqk", q / self.HEAD_DIM**0.5, k)
        s = s + torch.full((t, t), float("-inf"), device=q.device, dtype=s.dtype).triu(1)
        p = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))
        return torch.einsum("bhqk,bkhd->bqhd", p, v)


class AttnManualSoftmaxMaskAfterExp(_QKV):
    """No max shift; the causal mask applied after the exponential as a 0/1 factor, then
    the rows normalised: the same causal softmax."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        tril = torch.tril(torch.ones(t, t, device=q.device, dtype=q.dtype))
        e = torch.exp(q @ k.transpose(-1, -2) / self.HEAD_DIM**0.5) * tril
        return ((e / e.sum(-1, keepdim=True)) @ v).transpose(1, 2)


class NearAttnManualDetachedSum(_QKV):
    """A softmax written out with the row sum detached: the same values, another gradient
    (probes of values alone cannot tell; the detach must keep it out)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        s = q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), -torch.inf)
        e = torch.exp(s - s.amax(dim=-1, keepdim=True))
        return ((e / e.sum(dim=-1, keepdim=True).detach()) @ v).transpose(1, 2)


class NearAttnManualSoftmaxPlusOne(_QKV):
    """``exp(s) / (1 + sum exp(s))`` ("softmax1", an extra zero logit): not a softmax."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        s = q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5
        e = s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), -torch.inf).exp()
        return ((e / (1 + e.sum(dim=-1, keepdim=True))) @ v).transpose(1, 2)


class NearAttnManualSumOverQueries(_QKV):
    """exp normalised over the query axis (-2) instead of the keys."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        s = q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5
        e = torch.exp(s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), -torch.inf))
        return ((e / e.sum(dim=-2, keepdim=True)) @ v).transpose(1, 2)


class SdpaArangeBoolMask(_QKV):
    """SDPA with an explicit causal bool mask from ``arange`` and ``enable_gqa``."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        t = q.shape[2]
        idx = torch.arange(t, device=q.device)
        allowed = idx[:, None] >= idx[None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return o.transpose(1, 2)


class SdpaBufferMask(_QKV):
    """SDPA with a bool mask sliced from a registered (max_T, max_T) buffer: a graph
    input, known at run time only. ``WINDOW`` None: causal (tril)."""

    MAX_T = 16
    WINDOW: int | None = None

    def __init__(self):
        super().__init__()
        ones = torch.ones(self.MAX_T, self.MAX_T, dtype=torch.bool)
        allowed = torch.tril(ones)
        if self.WINDOW is not None:
            allowed &= torch.triu(ones, diagonal=1 - self.WINDOW)
        self.register_buffer("allowed", allowed)

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        t = q.shape[2]
        mask = self.allowed[:t, :t]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return o.transpose(1, 2)


class SdpaWindowBufferMask(SdpaBufferMask):
    """The same with a sliding-window (3 tokens) buffer: not causal, known at run time."""

    WINDOW = 3


class SdpaFloatMaskEinopsRepeat(_QKV):
    """SDPA with an additive -inf float mask on K/V repeated by einops."""

    def core(self, q, k, v):
        q = einops.rearrange(q, "b t h d -> b h t d")
        k = einops.repeat(k, "b t h d -> b (h g) t d", g=self.groups)
        v = einops.repeat(v, "b t h d -> b (h g) t d", g=self.groups)
        t = q.shape[2]
        bias = torch.zeros(t, t, device=q.device).masked_fill(
            torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf")
        )
        o = F.scaled_dot_product_attention(q, k, v, bias)
        return einops.rearrange(o, "b h t d -> b t h d")


class SdpaPositionalExpand(_QKV):
    """SDPA on expand+reshape K/V, mask, dropout and is_causal positional, an explicit
    scale keyword (0.5 / d)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        o = F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.5 / self.HEAD_DIM)
        return o.transpose(1, 2)


class SdpaTransposedInCall(_QKV):
    """SDPA reading transposes made in the call itself."""

    def core(self, q, k, v):
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return o.transpose(1, 2)


class AttnTiledHeads(_QKV):
    """K/V tiled with ``repeat`` (query head h reads kv head h % Hkv, not h // G): a valid
    attention over the tiled heads, never GQA with the h // G mapping."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = k.repeat(1, self.groups, 1, 1), v.repeat(1, self.groups, 1, 1)
        s = q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5
        t = q.shape[2]
        s = s.masked_fill(
            ~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf")
        )
        return (s.softmax(-1) @ v).transpose(1, 2)


class AttnGroupedQueries(_QKV):
    """K/V never repeated: q viewed (B, Hkv, G, T, D) per kv-head group, 5-D einsum scores
    against (B, Hkv, T, D) keys, fp32 softmax cast back, ``reshape`` to (B, H, T, D)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        b, h, t, d = q.shape
        qg = q.reshape(b, self.KV_HEADS, self.groups, t, d)
        s = torch.einsum("bjgtd,bjsd->bjgts", qg, k) / math.sqrt(d)
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(s.masked_fill(~keep, float("-inf")).float(), dim=-1).to(q.dtype)
        o = torch.einsum("bjgts,bjsd->bjgtd", p, v)
        return o.reshape(b, h, t, d).transpose(1, 2)


class AttnWhereFullLike(_QKV):
    """The mask as ``torch.where(keep, s, torch.full_like(s, -inf))`` (a fill tensor that
    reads the scores only for their shape), scale applied after the masking."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = (y.repeat_interleave(self.groups, dim=1) for y in (k, v))
        s = q @ k.transpose(-2, -1)
        t = s.shape[-1]
        keep = torch.arange(t, device=s.device)[:, None] >= torch.arange(t, device=s.device)
        s = torch.where(keep, s, torch.full_like(s, float("-inf"))) / math.sqrt(self.HEAD_DIM)
        return (s.softmax(-1) @ v).transpose(1, 2)


class NearAttnWhereZeroFill(AttnWhereFullLike):
    """Near miss: the future filled with zeros, not -inf (it still gets weight)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = (y.repeat_interleave(self.groups, dim=1) for y in (k, v))
        s = q @ k.transpose(-2, -1) / math.sqrt(self.HEAD_DIM)
        keep = torch.ones_like(s, dtype=torch.bool).tril()
        s = torch.where(keep, s, torch.full_like(s, 0.0))
        return (s.softmax(-1) @ v).transpose(1, 2)


class AttnGroupedTokensFirst(_QKV):
    """Grouped scores straight from (B, T, H, D): q viewed (B, T, Hkv, G, D), einsum
    ``bthgd,bshd->bhgts``, the output einsum back to (B, T, Hkv, G, D)."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        qg = q.view(b, t, self.KV_HEADS, self.groups, d)
        s = torch.einsum("bthgd,bshd->bhgts", qg, k) / math.sqrt(d)
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        p = s.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        return torch.einsum("bhgts,bshd->bthgd", p, v).reshape(b, t, h, d)


class AttnGroupedBroadcastMatmul(_QKV):
    """q as (B, Hkv, G, T, D) by ``unflatten``, K/V given a group axis of 1 and broadcast by
    ``@``, an additive -inf mask from ``triu``."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        t = q.shape[2]
        qg = q.unflatten(1, (self.KV_HEADS, self.groups))
        mask = torch.full((t, t), float("-inf"), device=q.device).triu(1)
        s = qg @ k.unsqueeze(2).transpose(-1, -2) * self.HEAD_DIM**-0.5 + mask
        o = s.softmax(-1) @ v.unsqueeze(2)
        return o.flatten(1, 2).transpose(1, 2)


class NearAttnGroupedHeadsInterleaved(_QKV):
    """Grouped scores with the groups the other way round, q viewed (B, G, Hkv, T, D): query
    head h reads kv head h % Hkv, as ``repeat`` tiles them, not h // G."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        b, h, t, d = q.shape
        qg = q.reshape(b, self.groups, self.KV_HEADS, t, d)
        s = torch.einsum("bgjtd,bjsd->bgjts", qg, k) / math.sqrt(d)
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        o = torch.einsum("bgjts,bjsd->bgjtd", p, v)
        return o.reshape(b, h, t, d).transpose(1, 2)


class AttnBaddbmmFalcon(_QKV):
    """Falcon / BLOOM style: scores and the additive mask in one ``torch.baddbmm(mask, q,
    k^T, beta=1.0, alpha=1/sqrt(d))`` on (B*H, T, D), ``softmax(dtype=torch.float32)``."""

    PEEK = 1  # the mask's first future diagonal: 1 is causal

    def core(self, q, k, v):
        b, t, h, d = q.shape
        k, v = (y.repeat_interleave(self.groups, dim=2) for y in (k, v))
        q, k, v = (y.permute(0, 2, 1, 3).reshape(b * h, t, d) for y in (q, k, v))
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(self.PEEK)
        mask = torch.zeros(t, t, dtype=q.dtype, device=q.device).masked_fill(future, -torch.inf)
        s = torch.baddbmm(mask.expand(b * h, t, t), q, k.transpose(1, 2), beta=1.0, alpha=d**-0.5)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.bmm(p, v).reshape(b, h, t, d).transpose(1, 2)


class AttnMegatronCore(_QKV):
    """Megatron's CoreAttention: tokens first (T, B, H, D), ``baddbmm`` into an empty
    buffer with ``beta=0``, the scores viewed (B, H, T, T), ``masked_fill(triu, -10000)``,
    an fp32 softmax ``type_as`` the values, the probabilities viewed back for ``bmm``."""

    PEEK = 1

    def core(self, q, k, v):
        b, t, h, d = q.shape
        q, k, v = (y.transpose(0, 1) for y in (q, k, v))  # (T, B, H, D)
        k, v = (y.repeat_interleave(self.groups, dim=2) for y in (k, v))
        q2, k2 = q.reshape(t, b * h, d), k.reshape(t, b * h, d)
        buf = torch.empty(b * h, t, t, dtype=q.dtype, device=q.device)
        s = torch.baddbmm(buf, q2.transpose(0, 1), k2.transpose(0, 1).transpose(1, 2), beta=0.0, alpha=d**-0.5)
        s = s.view(b, h, t, t)
        future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=q.device), diagonal=self.PEEK)
        p = F.softmax(s.masked_fill(future, -10000.0).float(), dim=-1).type_as(v)
        o = torch.bmm(p.view(b * h, t, t), v.reshape(t, b * h, d).transpose(0, 1))
        return o.view(b, h, t, d).transpose(1, 2)


class NearAttnMegatronCorePeek(AttnMegatronCore):
    """Megatron's core with the mask one diagonal late."""

    PEEK = 2


class NearAttnBaddbmmPeek(AttnBaddbmmFalcon):
    """The Falcon spelling with the mask one diagonal late: each query sees the next key."""

    PEEK = 2


class AttnDropout(_QKV):
    """Hand-written attention with probability dropout (active in training)."""

    P = 0.5

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        s = q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5
        t = q.shape[2]
        s = s.masked_fill(
            ~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf")
        )
        p = F.dropout(s.softmax(-1), p=self.P, training=self.training)
        return (p @ v).transpose(1, 2)


class SdpaDropout(_QKV):
    """SDPA with ``dropout_p=self.p if self.training else 0.0``."""

    P = 0.5

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        p = self.P if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2)


# ---- attention near misses ---------------------------------------------------------------


class NearAttnSlidingWindow(AttnEinsumExpand):
    """A sliding window of 3 tokens: causal, but not full causal attention."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.HEAD_DIM**-0.5
        t = q.shape[2]
        ones = torch.ones(t, t, dtype=torch.bool, device=q.device)
        keep = torch.tril(ones) & torch.triu(ones, diagonal=-2)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v).transpose(1, 2)


class NearAttnOneHoleMask(_QKV):
    """Causal except one entry: the last query may not see the first token."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        hole = (i[:, None] == t - 1) & (i[None, :] == 0)
        blocked = (i[None, :] > i[:, None]) | hole
        s = (q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5).masked_fill(blocked, float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2)


class NearSdpaOneHoleMask(_QKV):
    """SDPA with a bool mask that is causal except one entry (last query, first key)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        hole = (i[:, None] == t - 1) & (i[None, :] == 0)
        allowed = (i[None, :] <= i[:, None]) & ~hole
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return o.transpose(1, 2)


class NearAttnPeekAdditive(AttnBmmFlat):
    """Additive mask ``triu(2)``: each query also sees the next token."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        k = k.repeat_interleave(self.groups, dim=2)
        v = v.repeat_interleave(self.groups, dim=2)
        q, k, v = (y.transpose(1, 2).reshape(b * h, t, d) for y in (q, k, v))
        mask = torch.full((t, t), float("-inf"), device=q.device).triu(2)
        s = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(d)) + mask
        o = torch.bmm(F.softmax(s, dim=-1), v)
        return o.view(b, h, t, d).transpose(1, 2)


class NearAttnLearnedAlibi(_QKV):
    """Causal, plus a learned per-head distance bias (ALiBi with trainable slopes)."""

    def __init__(self):
        super().__init__()
        self.slopes = nn.Parameter(0.3 * torch.rand(self.HEADS) + 0.1)

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        dist = (i[:, None] - i[None, :]).float()
        s = q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5 - self.slopes.view(1, -1, 1, 1) * dist
        s = s.masked_fill(dist < 0, float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2)


class NearAttnMaskAfterSoftmax(_QKV):
    """The causal mask applied to the probabilities, without renormalising."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5, dim=-1)
        return (p.masked_fill(~keep, 0.0) @ v).transpose(1, 2)


class NearAttnSoftmaxOverQueries(_QKV):
    """Softmax over the query dim (-2)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        s = (q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5).masked_fill(~keep, float("-inf"))
        return (s.softmax(-2) @ v).transpose(1, 2)


class AttnCausalAtNineTokensOnly(_QKV):
    """``tril(diagonal=T - 9)``: causal at T = 9, peeking T - 9 tokens ahead beyond."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        t = q.shape[2]
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril(diagonal=t - 9)
        s = (q @ k.transpose(-1, -2) * self.HEAD_DIM**-0.5).masked_fill(~keep, float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2)


class NearSdpaPeekMask(_QKV):
    """SDPA with a bool mask that also allows the next token (j <= i + 1)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        t = q.shape[2]
        idx = torch.arange(t, device=q.device)
        allowed = idx[None, :] <= idx[:, None] + 1
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return o.transpose(1, 2)


class NearSdpaWindowMask(_QKV):
    """SDPA with a causal sliding-window bool mask (window 4)."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        t = q.shape[2]
        idx = torch.arange(t, device=q.device)
        delta = idx[:, None] - idx[None, :]
        allowed = (delta >= 0) & (delta < 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return o.transpose(1, 2)


# =========================================================================================
# Whole CCGQA blocks (../shared/design/ccgqa.md), several independent spellings
# =========================================================================================


def _repeat_heads_bthd(x, groups):
    """(B, T, Hkv, D) -> (B, T, Hkv*G, D), each kv head G times in a row."""
    b, t, h, d = x.shape
    return x[:, :, :, None, :].expand(b, t, h, groups, d).reshape(b, t, h * groups, d)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CCGQAZayaStyle(nn.Module):
    """Zyphra/ZAYA's layout: q|k channels concatenated, ONE left ``F.pad`` by
    (k1-1)+(k2-1), depthwise then per-head grouped ``nn.Conv1d`` (padding 0, biases);
    qk-mean ``(q + repeat_kv(k)) * 0.5`` and ``.view(.., hkv, g, d).mean(-2)``; L2 norm as
    ``x * (sqrt(d) / x.norm().clamp_min(finfo.eps))``; raw per-kv-head temperature; half
    rotary; value shift on half of each kv head; SDPA enable_gqa + is_causal."""

    DIM, HQ, HKV, D, K1, K2 = 32, 4, 2, 8, 2, 2

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.q_proj = nn.Linear(self.DIM, hq * d, bias=False)
        self.k_proj = nn.Linear(self.DIM, hkv * d, bias=False)
        self.v_proj_current = nn.Linear(self.DIM, hkv * d // 2, bias=False)
        self.v_proj_delayed = nn.Linear(self.DIM, hkv * d // 2, bias=False)
        c = (hq + hkv) * d
        self.conv_qk_depthwise = nn.Conv1d(c, c, self.K1, groups=c, padding=0)
        self.conv_qk_grouped = nn.Conv1d(c, c, self.K2, groups=hq + hkv, padding=0)
        self.temp = nn.Parameter(0.8 + 0.3 * torch.rand(hkv))
        self.o_proj = nn.Linear(hq * d, self.DIM, bias=False)

    def convs(self, qk):
        return self.conv_qk_grouped(self.conv_qk_depthwise(qk))

    def rotary(self, t, device, dtype):
        rd = self.D // 2
        inv = 1.0 / (10000.0 ** (torch.arange(0, rd, 2, device=device).float() / rd))
        freqs = torch.arange(t, device=device).float()[:, None] * inv[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        g = hq // hkv
        q_pre, k_pre = self.q_proj(x), self.k_proj(x)
        qk = torch.cat((q_pre, k_pre), dim=-1).transpose(1, 2)
        qk = F.pad(qk, ((self.K1 - 1) + (self.K2 - 1), 0))
        qk = self.convs(qk).transpose(1, 2)
        q_c, k_c = qk.split((hq * d, hkv * d), dim=-1)
        qh, kh = q_pre.view(b, t, hq, d), k_pre.view(b, t, hkv, d)
        m = (qh + _repeat_heads_bthd(kh, g)) * 0.5
        q = q_c.reshape(b, t, hq, d) + m
        k = k_c.reshape(b, t, hkv, d) + m.view(b, t, hkv, g, d).mean(-2)
        eps = torch.finfo(q.dtype).eps
        q = q * (math.sqrt(d) / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (math.sqrt(d) / k.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * self.temp[:, None]
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self.rotary(t, x.device, q.dtype)
        rd = cos.shape[-1]
        q = torch.cat((q[..., :rd] * cos + _rotate_half(q[..., :rd]) * sin, q[..., rd:]), -1)
        k = torch.cat((k[..., :rd] * cos + _rotate_half(k[..., :rd]) * sin, k[..., rd:]), -1)
        x_prev = F.pad(x, (0, 0, 1, 0))[:, :-1]
        v = torch.cat(
            (
                self.v_proj_current(x).view(b, t, hkv, d // 2),
                self.v_proj_delayed(x_prev).view(b, t, hkv, d // 2),
            ),
            dim=-1,
        ).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, hq * d))


class CCGQAZayaStyleBiasesAddedApart(CCGQAZayaStyle):
    """The shared convs without biases, each stage's bias a parameter added to its output:
    padded once, conv1's bias reaches conv2's padded positions, as Zyphra's does."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Parameter(self.conv_qk_depthwise.bias.detach()[:, None].clone())
        self.b2 = nn.Parameter(self.conv_qk_grouped.bias.detach()[:, None].clone())
        self.conv_qk_depthwise.bias = None
        self.conv_qk_grouped.bias = None

    def convs(self, qk):
        return self.conv_qk_grouped(self.conv_qk_depthwise(qk) + self.b1) + self.b2


class CCGQAConvPadSlice(nn.Module):
    """Separate q and k ``nn.Conv1d(padding=k-1)`` convs whose outputs are sliced
    ``[..., :T]``; qk-mean with ``repeat_interleave`` and ``unflatten``; ``F.normalize``;
    exp'd temperature on (B, H, T, D); full rotate-half RoPE; hand-written einsum core.

    The steps are methods so that the near misses below mutate one of them."""

    DIM, HQ, HKV, D, K1, K2 = 32, 4, 2, 8, 3, 2

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.wq = nn.Linear(self.DIM, hq * d, bias=False)
        self.wk = nn.Linear(self.DIM, hkv * d, bias=False)
        self.wv = nn.Linear(self.DIM, hkv * d, bias=False)
        self.wo = nn.Linear(hq * d, self.DIM, bias=False)
        self.q_dw = nn.Conv1d(hq * d, hq * d, self.K1, padding=self.K1 - 1, groups=hq * d)
        self.q_hc = nn.Conv1d(hq * d, hq * d, self.K2, padding=self.K2 - 1, groups=hq)
        self.k_dw = nn.Conv1d(hkv * d, hkv * d, self.K1, padding=self.K1 - 1, groups=hkv * d)
        self.k_hc = nn.Conv1d(hkv * d, hkv * d, self.K2, padding=self.K2 - 1, groups=hkv)
        self.log_temp = nn.Parameter(0.2 * torch.randn(hkv))

    def conv(self, x, dw, hc):
        t = x.shape[1]
        y = dw(x.transpose(1, 2))[..., :t]
        return hc(y)[..., :t].transpose(1, 2)

    def qk_mean(self, q_pre, k_pre):
        g = self.HQ // self.HKV
        qh = q_pre.unflatten(-1, (self.HQ, self.D))
        kh = k_pre.unflatten(-1, (self.HKV, self.D))
        m_q = 0.5 * (qh + kh.repeat_interleave(g, dim=2))
        m_k = m_q.unflatten(2, (self.HKV, g)).mean(3)
        return m_q, m_k

    def normalise(self, t):
        return F.normalize(t, dim=-1) * self.D**0.5

    def temperature(self, k):
        return k * self.log_temp.exp().view(1, self.HKV, 1, 1)

    def norm_and_temperature(self, q, k):
        """(B, T, H, D) in, (B, H, T, D) out."""
        q, k = self.normalise(q), self.normalise(k)
        return q.transpose(1, 2), self.temperature(k.transpose(1, 2))

    def tables(self, t, device):
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.D, 2, device=device).float() / self.D))
        f = torch.outer(torch.arange(t, device=device).float(), inv)
        f = torch.cat((f, f), dim=-1)
        return f.cos(), f.sin()

    def attend(self, q, k, v):
        g = self.HQ // self.HKV
        k, v = _expand_heads(k, g), _expand_heads(v, g)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.D**-0.5
        t = q.shape[2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)

    def rotate(self, q, k, t, device):
        cos, sin = (table.to(q.dtype) for table in self.tables(t, device))
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def conv_and_mean(self, x):
        """q and k (B, T, H, D) after the convs and the qk-mean, before the norm."""
        q_pre, k_pre = self.wq(x), self.wk(x)
        q = self.conv(q_pre, self.q_dw, self.q_hc).unflatten(-1, (self.HQ, self.D))
        k = self.conv(k_pre, self.k_dw, self.k_hc).unflatten(-1, (self.HKV, self.D))
        m_q, m_k = self.qk_mean(q_pre, k_pre)
        return q + m_q, k + m_k

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.norm_and_temperature(*self.conv_and_mean(x))
        q, k = self.rotate(q, k, t, x.device)
        v = self.wv(x).view(b, t, self.HKV, self.D).transpose(1, 2)
        o = self.attend(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class CCGQAFunctionalInterleaved(nn.Module):
    """Raw conv weights with ``F.pad`` + ``F.conv1d`` (no biases, no nn.Conv1d), no qk-mean,
    no temperature, ``x / x.norm() * sqrt(d)``, interleaved (pairwise) RoPE with
    ``repeat_interleave`` tables, a hand-written ``@`` core with ``torch.where``."""

    DIM, HQ, HKV, D, K1, K2 = 32, 4, 2, 8, 2, 3

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.wq = nn.Linear(self.DIM, hq * d, bias=False)
        self.wk = nn.Linear(self.DIM, hkv * d, bias=False)
        self.wv = nn.Linear(self.DIM, hkv * d, bias=False)
        self.wo = nn.Linear(hq * d, self.DIM, bias=False)
        self.q_w1 = nn.Parameter(0.5 * torch.randn(hq * d, 1, self.K1))
        self.q_w2 = nn.Parameter(torch.randn(hq * d, d, self.K2) / math.sqrt(d * self.K2))
        self.k_w1 = nn.Parameter(0.5 * torch.randn(hkv * d, 1, self.K1))
        self.k_w2 = nn.Parameter(torch.randn(hkv * d, d, self.K2) / math.sqrt(d * self.K2))

    def causal_conv(self, x, w, groups):
        return F.conv1d(F.pad(x, (w.shape[-1] - 1, 0)), w, groups=groups)

    def conv(self, x, w1, w2, heads):
        y = x.transpose(1, 2)
        y = self.causal_conv(y, w1, y.shape[1])
        y = self.causal_conv(y, w2, heads)
        return y.transpose(1, 2)

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        q = self.conv(self.wq(x), self.q_w1, self.q_w2, hq).reshape(b, t, hq, d)
        k = self.conv(self.wk(x), self.k_w1, self.k_w2, hkv).reshape(b, t, hkv, d)
        q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(d)
        k = k / k.norm(dim=-1, keepdim=True) * math.sqrt(d)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=x.device).float() / d))
        ang = torch.arange(t, device=x.device).float()[:, None] * inv
        cos = ang.cos().repeat_interleave(2, dim=-1).to(q.dtype)  # (T, D)
        sin = ang.sin().repeat_interleave(2, dim=-1).to(q.dtype)

        def pairs(z):
            z1, z2 = z[..., 0::2], z[..., 1::2]
            return torch.stack((-z2, z1), dim=-1).flatten(-2)

        q, k = q * cos + pairs(q) * sin, k * cos + pairs(k) * sin
        g = hq // hkv
        v = self.wv(x).view(b, t, hkv, d).transpose(1, 2)
        k, v = _expand_heads(k, g), _expand_heads(v, g)
        s = q @ k.transpose(-2, -1) / math.sqrt(d)
        keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        s = torch.where(keep, s, float("-inf"))
        o = torch.softmax(s, dim=-1) @ v
        return self.wo(o.transpose(1, 2).reshape(b, t, hq * d))


class CCGQAEinops(nn.Module):
    """einops throughout: ``rearrange`` for the conv layout and heads, ``reduce`` for the
    group mean, ``repeat`` for GQA; SDPA is_causal on repeated K/V; exp temperature."""

    DIM, HQ, HKV, D, K1, K2 = 32, 4, 2, 8, 2, 2

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.to_q = nn.Linear(self.DIM, hq * d, bias=False)
        self.to_k = nn.Linear(self.DIM, hkv * d, bias=False)
        self.to_v = nn.Linear(self.DIM, hkv * d, bias=False)
        self.to_out = nn.Linear(hq * d, self.DIM, bias=False)
        self.q_conv1 = nn.Conv1d(hq * d, hq * d, self.K1, groups=hq * d)
        self.q_conv2 = nn.Conv1d(hq * d, hq * d, self.K2, groups=hq)
        self.k_conv1 = nn.Conv1d(hkv * d, hkv * d, self.K1, groups=hkv * d)
        self.k_conv2 = nn.Conv1d(hkv * d, hkv * d, self.K2, groups=hkv)
        self.temperature = nn.Parameter(0.2 * torch.randn(hkv))

    def conv(self, x, c1, c2):
        y = einops.rearrange(x, "b t c -> b c t")
        y = c1(F.pad(y, (self.K1 - 1, 0)))
        y = c2(F.pad(y, (self.K2 - 1, 0)))
        return einops.rearrange(y, "b (h d) t -> b h t d", d=self.D)

    def forward(self, x):
        g = self.HQ // self.HKV
        q_pre, k_pre = self.to_q(x), self.to_k(x)
        q = self.conv(q_pre, self.q_conv1, self.q_conv2)
        k = self.conv(k_pre, self.k_conv1, self.k_conv2)
        qh = einops.rearrange(q_pre, "b t (h d) -> b h t d", d=self.D)
        kh = einops.repeat(k_pre, "b t (h d) -> b (h g) t d", d=self.D, g=g)
        m_q = (qh + kh) / 2
        m_k = einops.reduce(m_q, "b (h g) t d -> b h t d", "mean", g=g)
        q, k = F.normalize(q + m_q, dim=-1), F.normalize(k + m_k, dim=-1)
        q = q * self.D**0.5
        k = k * self.D**0.5 * einops.rearrange(self.temperature.exp(), "h -> h 1 1")
        t = x.shape[1]
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.D, 2, device=x.device).float() / self.D))
        f = einops.repeat(torch.arange(t, device=x.device).float()[:, None] * inv, "t f -> t (2 f)")
        cos, sin = f.cos().to(q.dtype), f.sin().to(q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        v = einops.repeat(self.to_v(x), "b t (h d) -> b (h g) t d", d=self.D, g=g)
        k = einops.repeat(k, "b h t d -> b (h g) t d", g=g)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.to_out(einops.rearrange(o, "b h t d -> b t (h d)"))


class CCGQAHFEager(nn.Module):
    """Hugging Face eager style: RoPE tables under ``torch.no_grad()``, separate q/k convs
    each ``F.pad``-ed, qk-mean on (B, H, T, D) with ``repeat_kv`` and ``view(.., g, ..)``,
    ``F.normalize(p=2, eps=1e-6)``, raw temperature, partial RoPE, repeat_kv + matmul core
    with an additive ``finfo.min`` mask and an fp32 softmax. One kv head (G = 4), d = 16."""

    DIM, HQ, HKV, D, K1, K2 = 32, 4, 1, 16, 2, 2

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.q_proj = nn.Linear(self.DIM, hq * d, bias=False)
        self.k_proj = nn.Linear(self.DIM, hkv * d, bias=False)
        self.v_proj = nn.Linear(self.DIM, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, self.DIM, bias=False)
        self.q_conv1 = nn.Conv1d(hq * d, hq * d, self.K1, groups=hq * d)
        self.q_conv2 = nn.Conv1d(hq * d, hq * d, self.K2, groups=hq)
        self.k_conv1 = nn.Conv1d(hkv * d, hkv * d, self.K1, groups=hkv * d)
        self.k_conv2 = nn.Conv1d(hkv * d, hkv * d, self.K2, groups=hkv)
        self.temp = nn.Parameter(0.8 + 0.3 * torch.rand(hkv))
        self.register_buffer(
            "inv_freq",
            1.0 / (10000.0 ** (torch.arange(0, d // 2, 2).float() / (d // 2))),
            persistent=False,
        )

    @torch.no_grad()
    def rotary(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    @staticmethod
    def repeat_kv(h, n_rep):
        b, n, t, d = h.shape
        if n_rep == 1:
            return h
        return h[:, :, None, :, :].expand(b, n, n_rep, t, d).reshape(b, n * n_rep, t, d)

    def conv(self, x, c1, c2):
        y = F.pad(x.transpose(1, 2), (self.K1 - 1, 0))
        y = F.pad(c1(y), (self.K2 - 1, 0))
        return c2(y).transpose(1, 2)

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        g = hq // hkv
        position_ids = torch.arange(t, device=x.device)[None]
        cos, sin = self.rotary(x, position_ids)
        q_pre, k_pre = self.q_proj(x), self.k_proj(x)
        q = self.conv(q_pre, self.q_conv1, self.q_conv2).view(b, t, hq, d).transpose(1, 2)
        k = self.conv(k_pre, self.k_conv1, self.k_conv2).view(b, t, hkv, d).transpose(1, 2)
        qh = q_pre.view(b, t, hq, d).transpose(1, 2)
        kh = k_pre.view(b, t, hkv, d).transpose(1, 2)
        m = (qh + self.repeat_kv(kh, g)) * 0.5
        q = q + m
        k = k + m.view(b, hkv, g, t, d).mean(2)
        q = F.normalize(q, p=2.0, dim=-1, eps=1e-6) * math.sqrt(d)
        k = F.normalize(k, p=2.0, dim=-1, eps=1e-6) * math.sqrt(d) * self.temp.view(1, hkv, 1, 1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rd = cos.shape[-1]
        q_rot, q_pass = q[..., :rd], q[..., rd:]
        k_rot, k_pass = k[..., :rd], k[..., rd:]
        q = torch.cat(((q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass), dim=-1)
        k = torch.cat(((k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass), dim=-1)
        v = self.v_proj(x).view(b, t, hkv, d).transpose(1, 2)
        k, v = self.repeat_kv(k, g), self.repeat_kv(v, g)
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        w = torch.matmul(q, k.transpose(2, 3)) * d**-0.5 + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, v).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(o)


class CCGQASharedConvBmm(nn.Module):
    """q|k concatenated and convolved once without biases (one left pad), qk-mean spelled
    as two halves and a sum over the group divided by G, ``x / vector_norm(x)``, no
    temperature, RoPE tables from a non-persistent buffer sliced to T, a bmm core on
    (B*H, T, D) with ``repeat_interleave``."""

    DIM, HQ, HKV, D, K1, K2, MAX_T = 40, 4, 2, 8, 3, 3, 32

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.qkv = nn.Linear(self.DIM, (hq + 2 * hkv) * d, bias=False)
        self.out = nn.Linear(hq * d, self.DIM, bias=False)
        c = (hq + hkv) * d
        self.dw = nn.Conv1d(c, c, self.K1, groups=c, bias=False)
        self.hc = nn.Conv1d(c, c, self.K2, groups=hq + hkv, bias=False)
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        f = torch.outer(torch.arange(self.MAX_T).float(), inv)
        self.register_buffer("cos_cached", torch.cat((f, f), -1).cos(), persistent=False)
        self.register_buffer("sin_cached", torch.cat((f, f), -1).sin(), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        g = hq // hkv
        q_pre, k_pre, v = self.qkv(x).split((hq * d, hkv * d, hkv * d), dim=-1)
        qk = torch.cat((q_pre, k_pre), dim=-1).transpose(1, 2)
        qk = self.hc(self.dw(F.pad(qk, (self.K1 + self.K2 - 2, 0))))
        q, k = qk.transpose(1, 2).split((hq * d, hkv * d), dim=-1)
        k_rep = k_pre.unflatten(-1, (hkv, d)).repeat_interleave(g, -2)
        m_q = 0.5 * q_pre.unflatten(-1, (hq, d)) + 0.5 * k_rep
        m_k = m_q.unflatten(-2, (hkv, g)).sum(-2) / g
        q = q.unflatten(-1, (hq, d)) + m_q
        k = k.unflatten(-1, (hkv, d)) + m_k
        q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True) * math.sqrt(d)
        k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True) * math.sqrt(d)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self.cos_cached[:t], self.sin_cached[:t]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        v = v.unflatten(-1, (hkv, d)).transpose(1, 2)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        q, k, v = (z.reshape(b * hq, t, d) for z in (q, k, v))
        s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
        s = s + torch.full((t, t), float("-inf"), device=x.device, dtype=s.dtype).triu(1)
        o = torch.bmm(torch.softmax(s, -1), v).view(b, hq, t, d)
        return self.out(o.transpose(1, 2).reshape(b, t, hq * d))


class CCGQAFusedQKVOneConv(CCGQAConvPadSlice):
    """One qkv projection (gpt-fast's ``wqkv``); one depthwise and one per-head conv over
    its q|k channels together (each head's channels are its own group either way); q_pre
    and k_pre for the qk-mean sliced from the same projection."""

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        c = (hq + hkv) * d
        self.wqkv = nn.Linear(self.DIM, c + hkv * d, bias=False)
        self.qk_dw = nn.Conv1d(c, c, self.K1, padding=self.K1 - 1, groups=c)
        self.qk_hc = nn.Conv1d(c, c, self.K2, padding=self.K2 - 1, groups=hq + hkv)

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        cq, c = hq * d, (hq + hkv) * d
        qkv = self.wqkv(x)
        qk = qkv[..., :c]
        h = self.qk_hc(self.qk_dw(qk.transpose(1, 2))[..., :t])[..., :t].transpose(1, 2)
        q = h[..., :cq].unflatten(-1, (hq, d))
        k = h[..., cq:].unflatten(-1, (hkv, d))
        m_q, m_k = self.qk_mean(qkv[..., :cq], qkv[..., cq:c])
        q, k = self.norm_and_temperature(q + m_q, k + m_k)
        q, k = self.rotate(q, k, t, x.device)
        v = qkv[..., c:].view(b, t, hkv, d).transpose(1, 2)
        o = self.attend(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class NearCCGQAFusedQKVConvMixesHeads(CCGQAFusedQKVOneConv):
    """The q|k channels' second conv grouped by two heads: each output mixes two heads."""

    def __init__(self):
        super().__init__()
        c = (self.HQ + self.HKV) * self.D
        self.qk_hc = nn.Conv1d(c, c, self.K2, padding=self.K2 - 1, groups=(self.HQ + self.HKV) // 2)


class CCGQARopeNegativeAngles(CCGQAConvPadSlice):
    """Keys and queries both rotated by -angle (``q * cos - rotate_half(q) * sin``)."""

    def rotate(self, q, k, t, device):
        cos, sin = (table.to(q.dtype) for table in self.tables(t, device))
        return q * cos - _rotate_half(q) * sin, k * cos - _rotate_half(k) * sin


class CCGQARepeatBeforeNorm(CCGQAConvPadSlice):
    """k repeated to the query heads right after the convs and qk-mean, BEFORE the L2 norm,
    one scalar temperature and RoPE (an independent implementation's order); V repeated at
    its projection; hand-written MHA-shaped core on the repeats."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(0.3 * torch.randn(1))

    def scale_repeated_k(self, k):
        return k * self.log_scale.exp()

    def forward(self, x):
        b, t, _ = x.shape
        g = self.HQ // self.HKV
        q_pre, k_pre = self.wq(x), self.wk(x)
        q = self.conv(q_pre, self.q_dw, self.q_hc).unflatten(-1, (self.HQ, self.D))
        k = self.conv(k_pre, self.k_dw, self.k_hc).unflatten(-1, (self.HKV, self.D))
        m_q, m_k = self.qk_mean(q_pre, k_pre)
        q, k = (q + m_q).transpose(1, 2), (k + m_k).transpose(1, 2)
        k = k.repeat_interleave(g, dim=1)
        q, k = self.normalise(q), self.scale_repeated_k(self.normalise(k))
        q, k = self.rotate(q, k, t, x.device)
        v = self.wv(x).view(b, t, self.HKV, self.D).transpose(1, 2).repeat_interleave(g, dim=1)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.D**-0.5
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        o = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s.masked_fill(~keep, float("-inf")), -1), v)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class CCGQATemperatureOnQuery(CCGQAConvPadSlice):
    """The per-kv-head temperature multiplies q, each query head by its kv head's
    (``repeat_interleave``), not k: the same scores q @ k^T."""

    def norm_and_temperature(self, q, k):
        q, k = self.normalise(q), self.normalise(k)
        t = self.log_temp.exp().repeat_interleave(self.HQ // self.HKV)
        return q.transpose(1, 2) * t.view(1, self.HQ, 1, 1), k.transpose(1, 2)


class CCGQATemperatureGatheredOntoQuery(CCGQAConvPadSlice):
    """The per-kv-head temperature gathered per query head by an index,
    ``beta[arange(Hq) // G]``, onto q."""

    def norm_and_temperature(self, q, k):
        q, k = self.normalise(q), self.normalise(k)
        heads = torch.arange(self.HQ, device=q.device) // (self.HQ // self.HKV)
        return q.transpose(1, 2) * self.log_temp.exp()[heads].view(1, self.HQ, 1, 1), k.transpose(1, 2)


class CCGQANormScaleOnKeyOnly(CCGQAConvPadSlice):
    """Both streams' sqrt(D) put on k (k normalised times D and its temperature), q only
    normalised: the same scores."""

    def norm_and_temperature(self, q, k):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1) * self.D
        return q.transpose(1, 2), self.temperature(k.transpose(1, 2))


class CCGQATemperatureOnScores(CCGQAConvPadSlice):
    """No temperature on q or k: the per-kv-head temperature multiplies the scores, each
    query head's by its kv head's, after q @ k^T (the same scores)."""

    def norm_and_temperature(self, q, k):
        return self.normalise(q).transpose(1, 2), self.normalise(k).transpose(1, 2)

    def attend(self, q, k, v):
        g = self.HQ // self.HKV
        k, v = _expand_heads(k, g), _expand_heads(v, g)
        temp = self.log_temp.exp().repeat_interleave(g).view(1, self.HQ, 1, 1)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * temp * self.D**-0.5
        t = q.shape[2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)


class NearCCGQATemperaturePerQueryHeadOnScores(CCGQATemperatureOnScores):
    """Near miss of the prologue: a temperature of its own for every query head, on the
    scores (the attention over q times it still fuses; no per-kv-head temperature
    computes the prologue)."""

    def __init__(self):
        super().__init__()
        self.log_temp = nn.Parameter(0.3 * torch.randn(self.HQ))

    def attend(self, q, k, v):
        g = self.HQ // self.HKV
        k, v = _expand_heads(k, g), _expand_heads(v, g)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.log_temp.exp().view(1, self.HQ, 1, 1)
        t = q.shape[2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)


class CCGQATemperatureSqrtOnBoth(CCGQAConvPadSlice):
    """The temperature's square root on q (repeated to its heads) and on k: their product
    is the temperature."""

    def norm_and_temperature(self, q, k):
        q, k = self.normalise(q), self.normalise(k)
        root = self.log_temp.exp().sqrt()
        q = q.transpose(1, 2) * root.repeat_interleave(self.HQ // self.HKV).view(1, self.HQ, 1, 1)
        return q, k.transpose(1, 2) * root.view(1, self.HKV, 1, 1)


class CCGQAConvBiasesAddedApart(CCGQAConvPadSlice):
    """Convolutions without biases, each stage's bias a parameter of its own added to the
    output after the layout ops, shaped (H, D) or (C, 1)."""

    def __init__(self):
        super().__init__()
        for conv in (self.q_dw, self.q_hc, self.k_dw, self.k_hc):
            conv.bias = None
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.q_b1 = nn.Parameter(0.3 * torch.randn(hq * d, 1))
        self.q_b2 = nn.Parameter(0.3 * torch.randn(hq, d))
        self.k_b1 = nn.Parameter(0.3 * torch.randn(hkv * d, 1))
        self.k_b2 = nn.Parameter(0.3 * torch.randn(hkv, d))

    def biased_conv(self, x, dw, hc, b1, b2):
        t = x.shape[1]
        y = dw(x.transpose(1, 2))[..., :t] + b1
        return (hc(y)[..., :t].transpose(1, 2).unflatten(-1, b2.shape) + b2).flatten(2)

    def forward(self, x):
        b, t, _ = x.shape
        q_pre, k_pre = self.wq(x), self.wk(x)
        q = self.biased_conv(q_pre, self.q_dw, self.q_hc, self.q_b1, self.q_b2).unflatten(-1, (self.HQ, self.D))
        k = self.biased_conv(k_pre, self.k_dw, self.k_hc, self.k_b1, self.k_b2).unflatten(-1, (self.HKV, self.D))
        m_q, m_k = self.qk_mean(q_pre, k_pre)
        q, k = self.norm_and_temperature(q + m_q, k + m_k)
        q, k = self.rotate(q, k, t, x.device)
        v = self.wv(x).view(b, t, self.HKV, self.D).transpose(1, 2)
        return self.wo(self.attend(q, k, v).transpose(1, 2).reshape(b, t, -1))


class NearCCGQAConvBiasPerPosition(CCGQAConvBiasesAddedApart):
    """Near miss: q's second 'bias' varies along the sequence, (T, 1) broadcast over the
    channels: no convolution's bias."""

    def __init__(self):
        super().__init__()
        self.q_b2 = nn.Parameter(0.3 * torch.randn(9, 1, 1))

    def biased_conv(self, x, dw, hc, b1, b2):
        t = x.shape[1]
        y = dw(x.transpose(1, 2))[..., :t] + b1
        y = hc(y)[..., :t].transpose(1, 2)
        if b2.dim() == 3:  # q: the per-position term
            return (y.unflatten(-1, (self.HQ, self.D)) + b2[:t]).flatten(2)
        return (y.unflatten(-1, b2.shape) + b2).flatten(2)


class CCGQARopeTablesReadInHalves(CCGQAConvPadSlice):
    """RoPE written per half, each half reading its own slices of cos and sin buffers
    (``a * cos[..., :h] - b * sin[..., :h]``, ...): four table slices per call."""

    MAX_T = 16

    def __init__(self):
        super().__init__()
        cos, sin = self.tables(self.MAX_T, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rotate(self, q, k, t, device):
        cos, sin = self.cos[:t].to(q.dtype), self.sin[:t].to(q.dtype)
        h = self.D // 2

        def rotary(x):
            a, b = x[..., :h], x[..., h:]
            return torch.cat((a * cos[..., :h] - b * sin[..., :h], b * cos[..., h:] + a * sin[..., h:]), -1)

        return rotary(q), rotary(k)


class NearCCGQATemperaturePerQueryHead(CCGQAConvPadSlice):
    """Near miss: a temperature of its own for every query head, on q: the heads of one
    group differ, which no per-kv-head temperature computes."""

    def __init__(self):
        super().__init__()
        self.q_log_temp = nn.Parameter(0.3 * torch.randn(self.HQ))

    def norm_and_temperature(self, q, k):
        q, k = self.normalise(q), self.normalise(k)
        return q.transpose(1, 2) * self.q_log_temp.exp().view(1, self.HQ, 1, 1), k.transpose(1, 2)


class NearCCGQATemperatureOnQueryKeysReadElsewhere(CCGQATemperatureOnQuery):
    """Near miss of the op's k: temperature on q, and the rotated k also read outside the
    attention (its mean added to the output, as a kept cache would be read): a k carrying
    the temperature instead computes another output."""

    def attend(self, q, k, v):
        return super().attend(q, k, v) + k.mean(dim=(1, 3), keepdim=True)


class NearCCGQARepeatBeforeNormPerQueryHeadTemperature(CCGQARepeatBeforeNorm):
    """Near miss: after the repeat each query head's copy of k gets its own temperature:
    the copies of one kv head differ, no per-kv-head k computes it."""

    def __init__(self):
        super().__init__()
        self.log_temp = nn.Parameter(0.3 * torch.randn(self.HQ))

    def scale_repeated_k(self, k):
        return k * self.log_temp.exp().view(1, self.HQ, 1, 1)


class CCGQASequenceFirst(nn.Module):
    """Megatron / vLLM / SGLang layout: hidden states (T, B, E) throughout; q|k projected
    there, concatenated and convolved as ``qk.permute(1, 2, 0)``, heads viewed as
    (T, B, H, D), ``F.normalize``, raw per-kv-head temperature, rotate-half RoPE after a
    permute to (B, H, T, D), SDPA enable_gqa."""

    DIM, HQ, HKV, D, K1, K2 = 32, 4, 2, 8, 2, 3

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.q_proj = nn.Linear(self.DIM, hq * d, bias=False)
        self.k_proj = nn.Linear(self.DIM, hkv * d, bias=False)
        self.v_proj = nn.Linear(self.DIM, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, self.DIM, bias=False)
        c = (hq + hkv) * d
        self.conv1 = nn.Conv1d(c, c, self.K1, groups=c)
        self.conv2 = nn.Conv1d(c, c, self.K2, groups=hq + hkv)
        self.temp = nn.Parameter(0.8 + 0.3 * torch.rand(hkv))

    def conv(self, qk):
        """(T, B, C) -> (T, B, C), causal along T."""
        y = qk.permute(1, 2, 0)
        y = self.conv2(F.pad(self.conv1(F.pad(y, (self.K1 - 1, 0))), (self.K2 - 1, 0)))
        return y.permute(2, 0, 1)

    def forward(self, x):
        hs = x.transpose(0, 1)
        t, b, _ = hs.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        g = hq // hkv
        q_pre, k_pre = self.q_proj(hs), self.k_proj(hs)
        q_c, k_c = self.conv(torch.cat((q_pre, k_pre), dim=-1)).split((hq * d, hkv * d), dim=-1)
        m = (q_pre.view(t, b, hq, d) + k_pre.view(t, b, hkv, d).repeat_interleave(g, dim=2)) * 0.5
        q = q_c.reshape(t, b, hq, d) + m
        k = k_c.reshape(t, b, hkv, d) + m.view(t, b, hkv, g, d).mean(3)
        q = F.normalize(q, dim=-1) * math.sqrt(d)
        k = F.normalize(k, dim=-1) * math.sqrt(d) * self.temp[:, None]
        q, k = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3)
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=x.device).float() / d))
        f = torch.outer(torch.arange(t, device=x.device).float(), inv)
        cos, sin = torch.cat((f, f), -1).cos().to(q.dtype), torch.cat((f, f), -1).sin().to(q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        v = self.v_proj(hs).view(t, b, hkv, d).permute(1, 2, 0, 3)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.permute(0, 2, 1, 3).reshape(b, t, hq * d))


class NearCCGQASequenceFirstConvOverBatch(CCGQASequenceFirst):
    """Near miss: the (T, B, C) states permuted to (T, C, B): the convolutions run along
    the batch, not the tokens."""

    def conv(self, qk):
        y = qk.permute(0, 2, 1)
        y = self.conv2(F.pad(self.conv1(F.pad(y, (self.K1 - 1, 0))), (self.K2 - 1, 0)))
        return y.permute(0, 2, 1)


class CCGQARopeWrittenIntoBuffer(CCGQAConvPadSlice):
    """RoPE written by slice assignment into ``torch.empty_like`` (interleaved pairs, as
    HYDRA writes it)."""

    def rotate(self, q, k, t, device):
        cos, sin = (table.to(q.dtype)[:, : self.D // 2] for table in self.tables(t, device))

        def pairs(z):
            z1, z2 = z[..., 0::2], z[..., 1::2]
            out = torch.empty_like(z.unflatten(-1, (-1, 2)))
            out[..., 0] = z1 * cos - z2 * sin
            out[..., 1] = z1 * sin + z2 * cos
            return out.flatten(-2)

        return pairs(q), pairs(k)


class NearCCGQARopeBufferHalfWritten(CCGQARopeWrittenIntoBuffer):
    """Near miss: the rotated pairs' second members are never written (a zeroed buffer):
    half of every q and k row is zero."""

    def rotate(self, q, k, t, device):
        cos, sin = (table.to(q.dtype)[:, : self.D // 2] for table in self.tables(t, device))

        def pairs(z):
            z1, z2 = z[..., 0::2], z[..., 1::2]
            out = torch.zeros_like(z.unflatten(-1, (-1, 2)))
            out[..., 0] = z1 * cos - z2 * sin
            return out.flatten(-2)

        return pairs(q), pairs(k)


class CCGQARopeBeforeNorm(CCGQAConvPadSlice):
    """RoPE applied BEFORE the L2 norm and temperature: a rotation keeps the norm, so this
    is the same function as the canonical order."""

    def forward(self, x):
        b, t, _ = x.shape
        q_pre, k_pre = self.wq(x), self.wk(x)
        q = self.conv(q_pre, self.q_dw, self.q_hc).unflatten(-1, (self.HQ, self.D))
        k = self.conv(k_pre, self.k_dw, self.k_hc).unflatten(-1, (self.HKV, self.D))
        m_q, m_k = self.qk_mean(q_pre, k_pre)
        q, k = (q + m_q).transpose(1, 2), (k + m_k).transpose(1, 2)
        q, k = self.rotate(q, k, t, x.device)
        q, k = self.normalise(q), self.temperature(self.normalise(k))
        v = self.wv(x).view(b, t, self.HKV, self.D).transpose(1, 2)
        o = self.attend(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class CCGQARopeBeforeNormBufferTables(CCGQARopeBeforeNorm):
    """RoPE before the L2 norm with Hugging Face-style tables computed from an
    ``inv_freq`` buffer (run-time tables, no constants), with a key offset the near miss
    below changes."""

    MAX_T = 16
    SIN_OFFSET = 0

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", _inv_freq(self.D), persistent=False)

    def rotate(self, q, k, t, device):
        f = torch.outer(torch.arange(self.MAX_T, device=device, dtype=self.inv_freq.dtype), self.inv_freq)
        emb = torch.cat((f, f), dim=-1)
        o = self.SIN_OFFSET
        cos, sin = emb.cos()[:t].to(q.dtype), emb.sin()[o : o + t].to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class NearCCGQARopeBeforeNormSinOffByOne(CCGQARopeBeforeNormBufferTables):
    """Near miss: the sin table one position ahead of the cos table (cos and sin of one
    angle tensor, sliced apart): no rotation, so the norm after it is not the norm before."""

    SIN_OFFSET = 1


class CCGQATokensFirstSdpaMask(CCGQAFunctionalInterleaved):
    """Everything on (B, T, H, D) up to an SDPA with an explicit causal bool mask and
    enable_gqa; conv weights from ``nn.Conv1d`` modules called functionally; qk-mean by
    ``expand``; exp temperature; rotate-half RoPE with tables unsqueezed at the head dim."""

    def __init__(self):
        super().__init__()
        self.temp_log = nn.Parameter(0.2 * torch.randn(self.HKV))

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        g = hq // hkv
        q_pre, k_pre = self.wq(x), self.wk(x)
        q = self.conv(q_pre, self.q_w1, self.q_w2, hq).view(b, t, hq, d)
        k = self.conv(k_pre, self.k_w1, self.k_w2, hkv).view(b, t, hkv, d)
        kh = k_pre.view(b, t, hkv, 1, d).expand(b, t, hkv, g, d)
        m_q = (q_pre.view(b, t, hkv, g, d) + kh) / 2
        q = q + m_q.reshape(b, t, hq, d)
        k = k + m_q.mean(dim=3)
        q = F.normalize(q, dim=-1) * math.sqrt(d)
        k = F.normalize(k, dim=-1) * math.sqrt(d) * self.temp_log.exp()[:, None]
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=x.device).float() / d))
        ang = torch.arange(t, device=x.device).float()[:, None] * inv
        ang = torch.cat((ang, ang), -1).unsqueeze(-2)  # (T, 1, D)
        cos, sin = ang.cos().to(q.dtype), ang.sin().to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        v = self.wv(x).view(b, t, hkv, d)
        idx = torch.arange(t, device=x.device)
        causal = idx.unsqueeze(1) >= idx.unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=causal,
            enable_gqa=True,
        )
        return self.wo(o.transpose(1, 2).flatten(2))


class CCGQATablesPerTensor(CCGQAConvPadSlice):
    """``apply_rotary(x, t)`` builds cos/sin inside, once for q and once for k."""

    def apply_rotary(self, x, t, device):
        cos, sin = (table.to(x.dtype) for table in self.tables(t, device))
        return x * cos + _rotate_half(x) * sin

    def rotate(self, q, k, t, device):
        return self.apply_rotary(q, t, device), self.apply_rotary(k, t, device)


class CCGQABufferTablesPerCall(CCGQAConvPadSlice):
    """torchtitan style: cos/sin precomputed for a maximum length into buffers, and the
    RoPE helper slices and reshapes them itself, once for q and once for k (the tables
    reach the prologue as four graph values read from two buffers)."""

    MAX_LEN = 32

    def __init__(self):
        super().__init__()
        cos, sin = self.tables(self.MAX_LEN, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def table_rows(self, t):
        return self.rope_cos[:t].view(1, 1, t, self.D), self.rope_sin[:t].view(1, 1, t, self.D)

    def apply_rotary(self, x, t):
        cos, sin = self.table_rows(t)
        return x * cos + _rotate_half(x) * sin

    def rotate(self, q, k, t, device):
        return self.apply_rotary(q, t), self.apply_rotary(k, t)


class CCGQABufferRowsSlicedPerStream(CCGQABufferTablesPerCall):
    """The buffers' rows sliced once for q and once for k and used as sliced (HYDRA): the
    region reads two slices of each buffer, the T rows being the tables (not the
    buffer)."""

    def table_rows(self, t):
        return self.rope_cos[:t], self.rope_sin[:t]


class NearCCGQABufferTablesKeyOffByOne(CCGQABufferTablesPerCall):
    """Near miss: k's rows of the tables start one position late (k at t rotated by the
    angle of t + 1): q and k no longer share one RoPE."""

    def rotate(self, q, k, t, device):
        cos, sin = self.rope_cos[1 : t + 1], self.rope_sin[1 : t + 1]
        return self.apply_rotary(q, t), k * cos + _rotate_half(k) * sin


class CCGQATemperatureInNormScale(CCGQAConvPadSlice):
    """The temperature folded into k's norm scale: ``normalize(k) * (sqrt(d) * exp(t))``."""

    def norm_and_temperature(self, q, k):
        q = F.normalize(q, dim=-1) * self.D**0.5
        k = F.normalize(k, dim=-1) * (self.D**0.5 * self.log_temp.exp()[:, None])
        return q.transpose(1, 2), k.transpose(1, 2)


class CCGQAGroupedScoresComplexRope(CCGQAConvPadSlice):
    """K/V never repeated (q viewed per kv-head group, 5-D einsum scores, fp32 softmax),
    ``torch.linalg.vector_norm(...).clamp(min=...)`` for the L2 norm, RoPE as a complex
    product of adjacent pairs (``view_as_complex`` with ``torch.polar``)."""

    def normalise(self, t):
        return t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp(min=1e-6) * self.D**0.5

    def rotate(self, q, k, t, device):
        acc = torch.promote_types(q.dtype, torch.float32)
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.D, 2, device=device).to(acc) / self.D))
        angles = torch.outer(torch.arange(t, device=device).to(acc), inv)
        freqs = torch.polar(torch.ones_like(angles), angles)

        def rope(x):
            pairs = torch.view_as_complex(x.to(acc).contiguous().unflatten(-1, (-1, 2)))
            return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)

        return rope(q), rope(k)

    def attend(self, q, k, v):
        b, h, t, d = q.shape
        qg = q.view(b, self.HKV, h // self.HKV, t, d)
        s = torch.einsum("bjgtd,bjsd->bjgts", qg, k) / math.sqrt(d)
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(s.masked_fill(~keep, float("-inf")).float(), dim=-1).to(q.dtype)
        return torch.einsum("bjgts,bjsd->bjgtd", p, v).reshape(b, h, t, d)


class CCGQANormPlusEps(CCGQAConvPadSlice):
    """The L2 norm with eps added to it: ``t / (t.norm(dim=-1, keepdim=True) + 1e-6)``."""

    def normalise(self, t):
        return t / (t.norm(dim=-1, keepdim=True) + 1e-6) * self.D**0.5


class CCGQARsqrtSumPlusEps(CCGQAConvPadSlice):
    """The L2 norm with eps under the root: ``t * rsqrt(sum(t^2) + 1e-5)``."""

    def normalise(self, t):
        return t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-5) * self.D**0.5


# ---- CCGQA block-level near misses (the q/k prologue must not fuse) -----------------------


class NearCCGQAPadRight(CCGQAFunctionalInterleaved):
    """Each conv padded on the RIGHT: every output sees later tokens."""

    def causal_conv(self, x, w, groups):
        return F.conv1d(F.pad(x, (0, w.shape[-1] - 1)), w, groups=groups)


class NearCCGQAShiftByTwo(CCGQAConvPadSlice):
    """``nn.Conv1d(padding=k)`` sliced ``[..., :T]``: each conv shifted one token further
    into the past (sees x_{t-k}..x_{t-1}, not x_t)."""

    def __init__(self):
        super().__init__()
        for conv in (self.q_dw, self.q_hc, self.k_dw, self.k_hc):
            conv.padding = (conv.kernel_size[0],)


class NearCCGQASymmetricPadding(CCGQAConvPadSlice):
    """``nn.Conv1d(padding=k // 2)`` with odd kernels: centred convs (see the next token)."""

    K1, K2 = 3, 3

    def __init__(self):
        super().__init__()
        for conv in (self.q_dw, self.q_hc, self.k_dw, self.k_hc):
            conv.padding = (conv.kernel_size[0] // 2,)


class NearCCGQAMeanOverAllHeads(CCGQAConvPadSlice):
    """m_k as the mean over ALL query heads, not over the kv head's own group."""

    def qk_mean(self, q_pre, k_pre):
        m_q, _ = super().qk_mean(q_pre, k_pre)
        m_k = m_q.mean(2, keepdim=True).expand(-1, -1, self.HKV, -1)
        return m_q, m_k


class NearCCGQATiledKInMean(CCGQAConvPadSlice):
    """m_q adds k_pre tiled over the query heads (query head h takes kv head h % Hkv, not
    h // G); m_k is still the group mean of that m_q."""

    def qk_mean(self, q_pre, k_pre):
        g = self.HQ // self.HKV
        qh = q_pre.unflatten(-1, (self.HQ, self.D))
        kh = k_pre.unflatten(-1, (self.HKV, self.D))
        m_q = 0.5 * (qh + kh.repeat(1, 1, g, 1))
        return m_q, m_q.unflatten(2, (self.HKV, g)).mean(3)


class NearCCGQAMeanWithoutHalf(CCGQAConvPadSlice):
    """m_q = q_pre + k_pre (the 1/2 dropped): another constant."""

    def qk_mean(self, q_pre, k_pre):
        m_q, m_k = super().qk_mean(q_pre, k_pre)
        return 2 * m_q, 2 * m_k


class NearCCGQANormOverHeads(CCGQAConvPadSlice):
    """The L2 norm taken over the heads of each channel (dim -2), not over the head dim."""

    def normalise(self, t):
        return F.normalize(t, dim=-2) * self.D**0.5


class NearCCGQAPerTokenTemperature(CCGQAConvPadSlice):
    """k scaled by a learned per-position factor instead of a per-kv-head temperature."""

    MAX_T = 32

    def __init__(self):
        super().__init__()
        self.pos_temp = nn.Parameter(1.0 + 0.2 * torch.randn(self.MAX_T))

    def temperature(self, k):
        t = k.shape[2]
        return k * self.pos_temp[:t, None]


class CCGQANonCausalSdpa(CCGQAFunctionalInterleaved):
    """A genuine CCGQA prologue feeding a NON-causal SDPA: the prologue fuses, the
    attention and the whole block must not."""

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        q = self.conv(self.wq(x), self.q_w1, self.q_w2, hq).view(b, t, hq, d)
        k = self.conv(self.wk(x), self.k_w1, self.k_w2, hkv).view(b, t, hkv, d)
        q = F.normalize(q, dim=-1) * math.sqrt(d)
        k = F.normalize(k, dim=-1) * math.sqrt(d)
        v = self.wv(x).view(b, t, hkv, d)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        )
        return self.wo(o.transpose(1, 2).flatten(2))


class CCGQAConvTapsWrittenOut(CCGQAConvPadSlice):
    """Both convolutions without a conv call: the depthwise one as the tokens shifted by
    ``F.pad`` of ``x[:, :-j]`` times per-channel taps, the per-head one as einsums of
    slices of the padded (B, T, H, D) sequence with each tap's matrix; biases added."""

    @staticmethod
    def shifted(x, j):
        """x delayed by j tokens, zeros entering."""
        return x if j == 0 else F.pad(x[:, :-j], (0, 0) * (x.dim() - 2) + (j, 0))

    def conv(self, x, dw, hc):
        b, t, c = x.shape
        k1 = dw.weight.shape[-1]
        y = sum(self.shifted(x, j) * dw.weight[:, 0, k1 - 1 - j] for j in range(k1)) + dw.bias
        heads, k2 = hc.groups, hc.weight.shape[-1]
        w2 = hc.weight.view(heads, c // heads, c // heads, k2)  # (H, out, in, k)
        yp = F.pad(y, (0, 0, k2 - 1, 0)).view(b, t + k2 - 1, heads, c // heads)
        out = sum(torch.einsum("bthi,hoi->btho", yp[:, j : j + t], w2[..., j]) for j in range(k2))
        return out.reshape(b, t, c) + hc.bias


class CCGQAConvUnfoldWindows(CCGQAConvPadSlice):
    """Both convolutions over ``unfold`` windows of the left-padded sequence: the
    depthwise one times its taps summed over the window, the per-head one an einsum over
    the window and the head's channels; biases added."""

    def conv(self, x, dw, hc):
        b, t, c = x.shape
        k1 = dw.weight.shape[-1]
        win = F.pad(x, (0, 0, k1 - 1, 0)).unfold(1, k1, 1)  # (B, T, C, k1)
        y = (win * dw.weight[:, 0]).sum(-1) + dw.bias
        heads, k2 = hc.groups, hc.weight.shape[-1]
        w2 = hc.weight.view(heads, c // heads, c // heads, k2)
        win = F.pad(y, (0, 0, k2 - 1, 0)).view(b, t + k2 - 1, heads, c // heads).unfold(1, k2, 1)
        return torch.einsum("bthik,hoik->btho", win, w2).reshape(b, t, c) + hc.bias


class CCGQAConv2dUnitHeight(CCGQAConvPadSlice):
    """Both convolutions as ``F.conv2d`` of (B, C, 1, T) with (1, k) kernels."""

    def conv(self, x, dw, hc):
        t = x.shape[1]
        y = x.transpose(1, 2).unsqueeze(2)
        for conv in (dw, hc):
            k = conv.kernel_size[0]
            y = F.conv2d(
                y, conv.weight.unsqueeze(2), conv.bias, padding=(0, k - 1), groups=conv.groups
            )
            y = y[..., :t]
        return y.squeeze(2).transpose(1, 2)


class NearCCGQAConvTapsSeeNextToken(CCGQAConvTapsWrittenOut):
    """Near miss: the depthwise taps read x_{t+1}, x_t and x_{t-1} (a centred filter)."""

    @staticmethod
    def shifted(x, j):
        if j == 0:
            return F.pad(x[:, 1:], (0, 0, 0, 1))
        return CCGQAConvTapsWrittenOut.shifted(x, j - 1)


class CCGQARopeOnLastDims(CCGQAConvPadSlice):
    """Partial RoPE on each head's last half: ``cat(x_nope, rope(x_pe))`` (DeepSeek's
    layout), tables as wide as the rotated part."""

    def tables(self, t, device):
        r = self.D // 2
        inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, device=device).float() / r))
        f = torch.outer(torch.arange(t, device=device).float(), inv)
        f = torch.cat((f, f), dim=-1)
        return f.cos(), f.sin()

    def rotate_part(self, x, cos, sin, last=True):
        r = self.D // 2
        keep, pe = x.split([self.D - r, r], dim=-1) if last else x.split([r, self.D - r], dim=-1)[::-1]
        pe = pe * cos + _rotate_half(pe) * sin
        return torch.cat((keep, pe), dim=-1) if last else torch.cat((pe, keep), dim=-1)

    def rotate(self, q, k, t, device):
        cos, sin = (table.to(q.dtype) for table in self.tables(t, device))
        return self.rotate_part(q, cos, sin), self.rotate_part(k, cos, sin)


class NearCCGQARopeLastDimsOnQFirstDimsOnK(CCGQARopeOnLastDims):
    """Near miss: q rotates its last half, k its first half."""

    def rotate(self, q, k, t, device):
        cos, sin = (table.to(q.dtype) for table in self.tables(t, device))
        return self.rotate_part(q, cos, sin), self.rotate_part(k, cos, sin, last=False)


class CCGQARmsNormOnHeads(CCGQAConvPadSlice):
    """q/k normalised by ``F.rms_norm`` over each head, no weight: the L2 norm times
    sqrt(d) with eps added to the mean square."""

    def normalise(self, t):
        return F.rms_norm(t, (self.D,), eps=1e-6)


class NearCCGQARmsNormOverAllHeads(CCGQAConvPadSlice):
    """Near miss: ``F.rms_norm`` over all heads of a token at once."""

    def normalise(self, t):
        return F.rms_norm(t.flatten(2), (t.shape[2] * self.D,), eps=1e-6).view_as(t)


class CCGQAMegatronTokensFirst(CCGQAConvPadSlice):
    """The block tokens first, as Megatron runs it: (T, B, C) projections, ``Conv1d(padding=
    k-1)`` on ``x.permute(1, 2, 0)`` with the tail cut, RoPE tables (T, 1, 1, D), and
    Megatron's core attention (``baddbmm``, scores viewed (B, H, T, T), ``bmm``)."""

    turn = staticmethod(_rotate_half)

    def conv(self, x, dw, hc):  # x (T, B, C)
        t = x.shape[0]
        y = dw(x.permute(1, 2, 0))[..., :t]
        return hc(y)[..., :t].permute(2, 0, 1)

    def forward(self, x):
        x = x.transpose(0, 1)  # (T, B, E)
        t, b, _ = x.shape
        hq, hkv, d, g = self.HQ, self.HKV, self.D, self.HQ // self.HKV
        q_pre, k_pre = self.wq(x), self.wk(x)
        qc = self.conv(q_pre, self.q_dw, self.q_hc).view(t, b, hq, d)
        kc = self.conv(k_pre, self.k_dw, self.k_hc).view(t, b, hkv, d)
        qh, kh = q_pre.view(t, b, hq, d), k_pre.view(t, b, hkv, d)
        m_q = (qh + kh.unsqueeze(3).expand(t, b, hkv, g, d).reshape(t, b, hq, d)) / 2
        m_k = m_q.view(t, b, hkv, g, d).mean(dim=3)
        q = self.normalise(qc + m_q)
        k = self.normalise(kc + m_k) * self.log_temp.exp().view(1, 1, hkv, 1)
        cos, sin = (f[:, None, None, :].to(q.dtype) for f in self.tables(t, x.device))
        q, k = q * cos + self.turn(q) * sin, k * cos + self.turn(k) * sin
        v = self.wv(x).view(t, b, hkv, d)
        k, v = (y.repeat_interleave(g, dim=2) for y in (k, v))
        buf = torch.empty(b * hq, t, t, dtype=q.dtype, device=q.device)
        s = torch.baddbmm(
            buf, q.reshape(t, b * hq, d).transpose(0, 1),
            k.reshape(t, b * hq, d).transpose(0, 1).transpose(1, 2), beta=0.0, alpha=d**-0.5,
        )  # fmt: skip
        future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=q.device), diagonal=1)
        p = F.softmax(s.view(b, hq, t, t).masked_fill(future, -10000.0).float(), dim=-1).type_as(v)
        o = torch.bmm(p.view(b * hq, t, t), v.reshape(t, b * hq, d).transpose(0, 1))
        o = o.view(b, hq, t, d).permute(2, 0, 1, 3).reshape(t, b, hq * d)
        return self.wo(o).transpose(0, 1)


class CCGQAConvZeroStateBuffer(CCGQAConvPadSlice):
    """Causal padding kept as a conv state, as streaming code does: a zero buffer (1, C,
    K1 + K2 - 2) per stream concatenated in front of conv1's input, both convs unpadded."""

    def __init__(self):
        super().__init__()
        width = self.K1 + self.K2 - 2
        self.register_buffer("q_state", torch.zeros(1, self.HQ * self.D, width), persistent=False)
        self.register_buffer("k_state", torch.zeros(1, self.HKV * self.D, width), persistent=False)

    def conv(self, x, dw, hc):
        state = self.q_state if x.shape[-1] == self.HQ * self.D else self.k_state
        y = torch.cat([state.expand(x.shape[0], -1, -1).to(x.dtype), x.transpose(1, 2)], dim=-1)
        y = F.conv1d(y, dw.weight, dw.bias, groups=dw.groups)
        return F.conv1d(y, hc.weight, hc.bias, groups=hc.groups).transpose(1, 2)


class CCGQASineFirstKeysReadTwice(CCGQAConvPadSlice):
    """RoPE's sine computed before its cosine (``sin, cos = f.sin(), f.cos()``), and the
    keys read outside the attention too (as a returned cache would read them): q and k
    must be matched apart, not only through their products."""

    def rotate(self, q, k, t, device):
        """Half-width tables, each half of a head turned by hand (a JAX port's)."""
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.D, 2, device=device).float() / self.D))
        f = torch.outer(torch.arange(t, device=device).float(), inv)
        sin = f.sin().to(q.dtype)
        cos = f.cos().to(q.dtype)

        def turn(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        return turn(q), turn(k)

    def attend(self, q, k, v):
        return super().attend(q, k, v) + 1e-2 * k.mean()


class RopeGemmaTransposedInside(_QK):
    """gemma_pytorch's ``apply_rotary_emb``: q of (B, T, H, D) transposed to (B, H, T, D)
    inside, halves stacked into complex numbers times (T, D/2) ``polar`` tables, the halves
    put back by ``cat(chunk(...), dim=-2)`` and transposed back."""

    def forward(self, x):
        q, k = self.qk(x)
        t = x.shape[1]
        freqs = torch.outer(torch.arange(t, device=x.device).float(), _inv_freq(self.HEAD_DIM))
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)

        def apply(v):
            vc = torch.view_as_complex(torch.stack(torch.chunk(v.transpose(1, 2).float(), 2, dim=-1), dim=-1))
            out = torch.view_as_real(vc * freqs_cis).type_as(v)
            out = torch.cat(torch.chunk(out, 2, dim=-1), dim=-2)
            return out.reshape(out.shape[0], out.shape[1], out.shape[2], -1).transpose(1, 2)

        return self.join(apply(q), apply(k))


class RopeDeepSeekPairsSplit(_QK):
    """transformers' DeepSeek-V3 ``apply_rotary_pos_emb_interleave`` written with strided
    slices: each pair (x[2i], x[2i+1]) turned, the results laid out as halves (even dims'
    results first)."""

    SWAP_SECOND = False

    def forward(self, x):
        q, k = self.qk(x)
        t = x.shape[1]
        freqs = torch.outer(torch.arange(t, device=x.device).float(), _inv_freq(self.HEAD_DIM))
        c, s = freqs.cos(), freqs.sin()

        def apply(v):
            a, b = v[..., 0::2], v[..., 1::2]
            second = a * c + b * s if self.SWAP_SECOND else b * c + a * s
            return torch.cat([a * c - b * s, second], dim=-1)

        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return self.join(apply(q).transpose(1, 2), apply(k).transpose(1, 2))


class NearRopeDeepSeekPairsSplitNoTurn(RopeDeepSeekPairsSplit):
    """Near miss: the second half is ``a * c + b * s`` (no rotation)."""

    SWAP_SECOND = True


class RopeOlmoTablesTypeAsQuery(_QK):
    """OLMo's rotary embedding: tables built in forward by einsum, cast ``type_as(q)``
    (read for its dtype: the tables are still tables), rotate_half by ``view`` and
    ``unbind``, q and k rotated in float32 and cast back."""

    def forward(self, x):
        q, k = self.qk(x)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q_, k_ = q.float(), k.float()
        t = q_.shape[-2]
        seq = torch.arange(t, device=x.device, dtype=torch.float)
        freqs = torch.einsum("i , j -> i j", seq, _inv_freq(self.HEAD_DIM).to(x.device))
        positions = torch.cat((freqs, freqs), dim=-1)
        pos_sin, pos_cos = positions.sin()[None, None].type_as(q_), positions.cos()[None, None].type_as(q_)

        def rotate_half(v):
            b, h, n, d = v.size()
            v1, v2 = v.view(b, h, n, 2, d // 2).unbind(dim=-2)
            return torch.cat((-v2, v1), dim=-1)

        q_ = (q_ * pos_cos + rotate_half(q_) * pos_sin).to(q_.dtype)
        k_ = (k_ * pos_cos + rotate_half(k_) * pos_sin).to(k_.dtype)
        return self.join(q_.type_as(q).transpose(1, 2), k_.type_as(k).transpose(1, 2))


class CCGQATorchtuneRopeCache(CCGQAConvPadSlice):
    """torchtune's RotaryPositionalEmbeddings: a (max_seq, D/2, 2) cos|sin cache buffer,
    viewed (-1, T, 1, D/2, 2) against x reshaped to pairs, ``stack(...).flatten(3)``."""

    MAX_SEQ = 32

    def __init__(self):
        super().__init__()
        theta = 1.0 / (10000.0 ** (torch.arange(0, self.D, 2).float() / self.D))
        idx_theta = torch.outer(torch.arange(self.MAX_SEQ).float(), theta)
        self.register_buffer("cache", torch.stack([idx_theta.cos(), idx_theta.sin()], dim=-1), persistent=False)

    def rotate(self, q, k, t, device):
        def apply(x):  # (B, H, T, D) -> torchtune's (B, T, H, D) and back
            x = x.transpose(1, 2)
            xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
            rope_cache = self.cache[:t].view(-1, xshaped.size(1), 1, xshaped.size(3), 2)
            x_out = torch.stack(
                [
                    xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
                    xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1],
                ],
                -1,
            )
            return x_out.flatten(3).type_as(x).transpose(1, 2)

        return apply(q), apply(k)


class CCGQALogitScaleBuffer(CCGQAConvPadSlice):
    """The attention's 1/sqrt(d) held in a 0-d buffer, ``(q @ k^T) * self.scale``: a
    run-time factor on the scores besides the per-kv-head temperature on k."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(self.D**-0.5), persistent=False)

    def attend(self, q, k, v):
        g = self.HQ // self.HKV
        k, v = _expand_heads(k, g), _expand_heads(v, g)
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        t = q.shape[2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


class RMSXTransformers(nn.Module):
    """lucidrains' x-transformers RMSNorm: ``F.normalize(x, dim=-1) * dim ** 0.5 * g`` (the
    norm clamped from below at 1e-12, not eps under the root)."""

    DIM = 32

    def __init__(self):
        super().__init__()
        self.scale = self.DIM**0.5
        self.g = _near_one(self.DIM)

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.g


class RMSNormClampedMin(nn.Module):
    """``x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8) * sqrt(d) * w``."""

    DIM = 24

    def __init__(self):
        super().__init__()
        self.w = _near_one(self.DIM)

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8) * self.DIM**0.5 * self.w


class CCGQANumericsCareful(nn.Module):
    """A numerics-careful author's block (dev/blocks_probe6 N_base): functional conv
    weights, fp32 qk-mean, ``linalg.vector_norm(...).clamp(min=eps)``, a temperature
    clamped below its range then exp'd, half-width RoPE buffers from float64 angles, a 0-d
    logit scale buffer and a bool mask buffer sliced [:T, :T]. Read off one probe, the
    scale buffer's drawn value passed for a norm scale; a second draw rejects that."""

    DIM, HQ, HKV, D, K = 64, 4, 2, 16, 2
    scale_dtype = None

    def __init__(self, max_seq=32):
        super().__init__()
        hq, hkv, d, k = self.HQ, self.HKV, self.D, self.K
        self.q_proj = nn.Linear(self.DIM, hq * d, bias=False)
        self.k_proj = nn.Linear(self.DIM, hkv * d, bias=False)
        self.v_proj = nn.Linear(self.DIM, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, self.DIM, bias=False)
        self.q_w1 = nn.Parameter(0.5 * torch.randn(hq * d, 1, k))
        self.q_w2 = nn.Parameter(torch.randn(hq * d, d, k) / d**0.5)
        self.k_w1 = nn.Parameter(0.5 * torch.randn(hkv * d, 1, k))
        self.k_w2 = nn.Parameter(torch.randn(hkv * d, d, k) / d**0.5)
        self.log_temp = nn.Parameter(0.2 * torch.randn(hkv))
        self.register_buffer("scale", torch.tensor(d**-0.5))
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool)), persistent=False)
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = torch.arange(max_seq, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("rope_cos", ang.cos().float(), persistent=False)
        self.register_buffer("rope_sin", ang.sin().float(), persistent=False)

    @staticmethod
    def conv(h, w, groups):
        return F.conv1d(F.pad(h, (w.shape[-1] - 1, 0)), w, groups=groups)

    @staticmethod
    def rope(t, cos, sin):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d, g = self.HQ, self.HKV, self.D, self.HQ // self.HKV
        q_pre, k_pre = self.q_proj(x), self.k_proj(x)
        qc = self.conv(self.conv(q_pre.transpose(1, 2), self.q_w1, hq * d), self.q_w2, hq).transpose(1, 2)
        kc = self.conv(self.conv(k_pre.transpose(1, 2), self.k_w1, hkv * d), self.k_w2, hkv).transpose(1, 2)
        qp, kp = q_pre.float().view(b, t, hq, d), k_pre.float().view(b, t, hkv, d)
        m_q = 0.5 * (qp + kp[:, :, :, None, :].expand(b, t, hkv, g, d).reshape(b, t, hq, d))
        m_k = m_q.view(b, t, hkv, g, d).sum(dim=3) / g
        q = (qc.float().view(b, t, hq, d) + m_q).transpose(1, 2)
        k = (kc.float().view(b, t, hkv, d) + m_k).transpose(1, 2)
        q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp(min=1e-6)
        k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp(min=1e-6)
        beta = self.log_temp.float().clamp(max=math.log(100.0)).exp()
        q = q * math.sqrt(d)
        k = k * (math.sqrt(d) * beta[None, :, None, None])
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        q, k = self.rope(q, cos, sin).to(x.dtype), self.rope(k, cos, sin).to(x.dtype)
        v = self.v_proj(x).view(b, t, hkv, d).transpose(1, 2)
        k_r, v_r = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        scale = self.scale if self.scale_dtype is None else self.scale.to(self.scale_dtype)
        logits = torch.matmul(q.float(), k_r.float().transpose(-2, -1)) * scale
        logits = logits.masked_fill(~self.causal_mask[:t, :t], torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
        o = torch.matmul(probs, v_r).transpose(1, 2).reshape(b, t, hq * d)
        return self.o_proj(o)



class CCGQALogitScaleOtherDtype(CCGQANumericsCareful):
    """The numerics-careful block with its 0-d logit scale in bf16 against fp32 scores (its
    buffer as ``model.to(torch.bfloat16)`` leaves it, while the scores are taken in fp32):
    type promotion keeps the scores' dtype, so the factor moves onto q as any other."""

    scale_dtype = torch.bfloat16

class CCGQAMegatronNegativeAngles(CCGQAMegatronTokensFirst):
    """Megatron's block with rotate_half written ``cat(x2, -x1)`` (negative angles), its
    tables (T, 1, 1, r)."""

    @staticmethod
    def turn(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x2, -x1), dim=-1)


class AttnFairseqPrescaledQuery(_QKV):
    """fairseq's core: heads flattened to (B*H, T, D), q times a Python float before the
    bmm (``q = q * self.scaling``), a mask built in forward and cast like the scores
    (``mask.to(scores)``), fp32 softmax ``type_as`` the scores."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        k = k.repeat_interleave(self.groups, dim=2)
        v = v.repeat_interleave(self.groups, dim=2)
        q, k, v = (y.transpose(1, 2).reshape(b * h, t, d) for y in (q, k, v))
        q = q * d**-0.5
        s = torch.bmm(q, k.transpose(1, 2))
        mask = torch.triu(torch.zeros(t, t, device=q.device).fill_(float("-inf")), 1)
        s = s + mask.to(s).unsqueeze(0)
        o = torch.bmm(F.softmax(s, dim=-1, dtype=torch.float32).type_as(s), v)
        return o.view(b, h, t, d).transpose(1, 2)


class AttnQueryDividedKeyScaled(_QKV):
    """The scale split as ``q / d**0.25`` and ``k * d**-0.25`` on (B, H, T, D), ``@`` with
    a bool ``tril`` mask through ``torch.where``."""

    def core(self, q, k, v):
        d = q.shape[-1]
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = _expand_heads(k, self.groups), _expand_heads(v, self.groups)
        s = (q / d**0.25) @ (k * d**-0.25).transpose(-1, -2)
        t = s.shape[-1]
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(torch.where(keep, s, float("-inf")), dim=-1)
        return (p @ v).transpose(1, 2)


class AttnFairseqScaledValues(AttnFairseqPrescaledQuery):
    """v times a constant before its heads are flattened: attention over those values
    (fusing it must not drop the factor)."""

    def core(self, q, k, v):
        return super().core(q, k, v * 0.5)


class AttnFairseqValuesScaledFlat(_QKV):
    """The flattened (B*H, T, D) v times a Python float right before the product: the
    factor is no part of the scores' scale (a fusion must keep it, or not fuse)."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        k = k.repeat_interleave(self.groups, dim=2)
        v = v.repeat_interleave(self.groups, dim=2)
        q, k, v = (y.transpose(1, 2).reshape(b * h, t, d) for y in (q, k, v))
        s = torch.bmm(q * d**-0.5, k.transpose(1, 2))
        s = s + torch.triu(torch.full((t, t), float("-inf"), device=q.device), 1)
        o = torch.bmm(F.softmax(s, dim=-1), v * 0.5)
        return o.view(b, h, t, d).transpose(1, 2)


class CCGQAFairseqCore(CCGQAConvPadSlice):
    """The block's attention written as fairseq does: (B*H, T, D) heads, q scaled by a
    Python float before the bmm, an inline causal mask cast with ``.to(scores)``."""

    def attend(self, q, k, v):
        b, hq, t, d = q.shape
        g = self.HQ // self.HKV
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        q, k, v = (y.reshape(b * hq, t, d) for y in (q, k, v))
        q = q * self.D**-0.5
        s = torch.bmm(q, k.transpose(1, 2))
        s = s + torch.triu(torch.zeros(t, t, device=q.device).fill_(float("-inf")), 1).to(s)
        o = torch.bmm(F.softmax(s, dim=-1, dtype=torch.float32).type_as(s), v)
        return o.view(b, hq, t, d)


class CCGQATokenFlatNoBatch(nn.Module):
    """Serving code's layout: one sequence of token-flat hidden states, ``(num_tokens, E)``
    with no batch dim anywhere (the batch's tokens flattened into one stream here); a merged
    qkv projection split by sizes; q|k convolved once as ``x.t().unsqueeze(0)``; qk-mean,
    L2 norm and temperature on ``(num_tokens, H, D)``; RoPE from a ``cos_sin_cache`` buffer
    ``index_select``-ed at the positions and chunked in halves; SDPA on ``unsqueeze(0)``."""

    DIM, HQ, HKV, D, K1, K2, MAX_T = 32, 4, 2, 8, 2, 3, 64

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.qkv_proj = nn.Linear(self.DIM, (hq + 2 * hkv) * d, bias=False)
        self.o_proj = nn.Linear(hq * d, self.DIM, bias=False)
        c = (hq + hkv) * d
        self.dw = nn.Conv1d(c, c, self.K1, groups=c)
        self.hc = nn.Conv1d(c, c, self.K2, groups=hq + hkv)
        self.k_temp = nn.Parameter(1 + 0.2 * torch.randn(hkv))
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        f = torch.outer(torch.arange(self.MAX_T).float(), inv)
        self.register_buffer("cos_sin_cache", torch.cat((f.cos(), f.sin()), -1), persistent=False)

    def forward(self, x):
        return self.block(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def pad(self, qk):
        """Both convs' causal padding, once in front of the (1, C, T) channels."""
        return F.pad(qk, (self.K1 + self.K2 - 2, 0))

    def block(self, h):
        n = h.shape[0]
        hq, hkv, d = self.HQ, self.HKV, self.D
        g = hq // hkv
        q, k, v = self.qkv_proj(h).split([hq * d, hkv * d, hkv * d], -1)
        qk = self.pad(torch.cat([q, k], -1).t().unsqueeze(0))
        qc, kc = self.hc(self.dw(qk)).squeeze(0).t().split([hq * d, hkv * d], -1)
        q3, k3 = q.view(n, hq, d), k.view(n, hkv, d)
        mean_q = (q3 + k3.repeat_interleave(g, 1)) * 0.5
        mean_k = mean_q.view(n, hkv, g, d).mean(2)
        q3 = F.normalize(qc.view(n, hq, d) + mean_q, dim=-1) * d**0.5
        k3 = F.normalize(kc.view(n, hkv, d) + mean_k, dim=-1) * d**0.5 * self.k_temp.unsqueeze(-1)
        positions = torch.arange(n, device=h.device)
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, -1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)

        def rope(x):
            x1, x2 = x.chunk(2, -1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

        q3, k3 = rope(q3), rope(k3)
        o = self.sdpa(
            q3.transpose(0, 1).unsqueeze(0), k3.transpose(0, 1).unsqueeze(0),
            v.view(n, hkv, d).transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=True,
        )  # fmt: skip
        return self.o_proj(o.squeeze(0).transpose(0, 1).reshape(n, hq * d))

    sdpa = staticmethod(F.scaled_dot_product_attention)


class NearCCGQATokenFlatConvNotCausal(CCGQATokenFlatNoBatch):
    """The token-flat block with its convolutions padded on both sides: they see later
    tokens."""

    def pad(self, qk):
        total = self.K1 + self.K2 - 2
        return F.pad(qk, (total - 1, 1))


class AttnGroupedQueryFlattened(_QKV):
    """q kept grouped by kv head, (B, T, Hkv, G, D), computed there (an RMS QK-norm) and
    only flattened for the product: ``permute(0, 2, 3, 1, 4).reshape(B*H, T, D)``; K/V
    expanded over the group the same way; scores by ``baddbmm`` into an empty tensor
    (beta 0, the scale as alpha); an in-place ``masked_fill_`` with a ``triu``."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        hkv, g = self.KV_HEADS, self.groups
        q5 = q.view(b, t, hkv, g, d)
        q5 = q5 * torch.rsqrt(q5.pow(2).mean(-1, keepdim=True) + 1e-6)
        q3 = q5.permute(0, 2, 3, 1, 4).reshape(b * h, t, d)
        k3, v3 = (
            y.permute(0, 2, 1, 3).unsqueeze(2).expand(b, hkv, g, t, d).reshape(b * h, t, d)
            for y in (k, v)
        )
        s = torch.baddbmm(
            torch.empty(b * h, t, t, dtype=q.dtype, device=q.device), q3, k3.transpose(1, 2),
            beta=0.0, alpha=d**-0.5,
        )  # fmt: skip
        s.masked_fill_(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        o = torch.bmm(torch.softmax(s, -1), v3)
        return o.view(b, h, t, d).transpose(1, 2)


class AttnGroupedQueryTiledHeads(AttnGroupedQueryFlattened):
    """q grouped as (B, T, G, Hkv, D): query head h = g * Hkv + j reads kv head j, not
    h // G (an attention over another pairing of query and kv heads: a fusion must keep
    that pairing, or not fuse)."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        hkv, g = self.KV_HEADS, self.groups
        q3 = q.view(b, t, g, hkv, d).permute(0, 3, 2, 1, 4).reshape(b * h, t, d)
        k3, v3 = (
            y.permute(0, 2, 1, 3).unsqueeze(2).expand(b, hkv, g, t, d).reshape(b * h, t, d)
            for y in (k, v)
        )
        s = torch.bmm(q3, k3.transpose(1, 2)) * d**-0.5
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        o = torch.bmm(torch.softmax(s, -1), v3)
        return o.view(b, hkv, g, t, d).permute(0, 3, 2, 1, 4).reshape(b, t, h, d)


class RMSTorchModuleDefaultEps(RMSTorchModule):
    """``nn.RMSNorm`` with its default ``eps=None``: the input dtype's machine epsilon."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(40)
        nn.init.normal_(self.norm.weight, 1.0, 0.1)


class CCGQARmsNormModuleOnHeads(CCGQAConvPadSlice):
    """q/k normalised by ``nn.RMSNorm(d, elementwise_affine=False)`` modules with the default
    eps (None: float32's machine epsilon on fp32 activations)."""

    def __init__(self):
        super().__init__()
        self.q_norm = nn.RMSNorm(self.D, elementwise_affine=False)
        self.k_norm = nn.RMSNorm(self.D, elementwise_affine=False)

    def norm_and_temperature(self, q, k):
        q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), self.temperature(k.transpose(1, 2))


class CCGQAFlatTokenProjections(CCGQAConvPadSlice):
    """q and k projected as 2-D matmuls over the flattened tokens, ``addmm(bias, x.view(B*T,
    E), W.t()).view(B, T, C)`` (a projection bias added by the matmul)."""

    def __init__(self):
        super().__init__()
        self.bq = nn.Parameter(0.1 * torch.randn(self.HQ * self.D))
        self.bk = nn.Parameter(0.1 * torch.randn(self.HKV * self.D))

    def forward(self, x):
        b, t, e = x.shape
        flat = x.reshape(b * t, e)
        q_pre = torch.addmm(self.bq, flat, self.wq.weight.t()).view(b, t, -1)
        k_pre = torch.addmm(self.bk, flat, self.wk.weight.t()).view(b, t, -1)
        q = self.conv(q_pre, self.q_dw, self.q_hc).unflatten(-1, (self.HQ, self.D))
        k = self.conv(k_pre, self.k_dw, self.k_hc).unflatten(-1, (self.HKV, self.D))
        m_q, m_k = self.qk_mean(q_pre, k_pre)
        q, k = self.norm_and_temperature(q + m_q, k + m_k)
        q, k = self.rotate(q, k, t, x.device)
        v = self.wv(x).view(b, t, self.HKV, self.D).transpose(1, 2)
        o = self.attend(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class AttnBaddbmmBetaZero(_QKV):
    """``baddbmm(input, q, kᵀ, beta=0, alpha=scale)``: with beta 0 the input is not read,
    here a tensor of NaN (perf code passes ``torch.empty``, whatever the memory holds)."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        k = k.repeat_interleave(self.groups, dim=2)
        v = v.repeat_interleave(self.groups, dim=2)
        q, k, v = (y.transpose(1, 2).reshape(b * h, t, d) for y in (q, k, v))
        ignored = torch.full((b * h, t, t), float("nan"), device=q.device, dtype=q.dtype)
        s = torch.baddbmm(ignored, q, k.transpose(1, 2), beta=0.0, alpha=d**-0.5)
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return torch.bmm(torch.softmax(s, -1), v).view(b, h, t, d).transpose(1, 2)


class CCGQAPackedGroupedQKV(CCGQAConvPadSlice):
    """InternLM's packed projection: ``qkv.view(B, T, Hkv, G + 2, D)``, a kv head's G query
    heads then its k and its v; q and k cut from it and convolved apart."""

    def __init__(self):
        super().__init__()
        self.wqkv = nn.Linear(self.DIM, self.HKV * (self.HQ // self.HKV + 2) * self.D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        hq, hkv, d = self.HQ, self.HKV, self.D
        g = hq // hkv
        qkv = self.wqkv(x).view(b, t, hkv, g + 2, d)
        q_pre = qkv[..., :g, :].reshape(b, t, hq * d)
        k_pre = qkv[..., g, :].reshape(b, t, hkv * d)
        v = qkv[..., g + 1, :].transpose(1, 2)
        q = self.conv(q_pre, self.q_dw, self.q_hc).unflatten(-1, (hq, d))
        k = self.conv(k_pre, self.k_dw, self.k_hc).unflatten(-1, (hkv, d))
        m_q, m_k = self.qk_mean(q_pre, k_pre)
        q, k = self.norm_and_temperature(q + m_q, k + m_k)
        q, k = self.rotate(q, k, t, x.device)
        o = self.attend(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class CCGQAConvStagesCatZerosBiases(CCGQAConvPadSlice):
    """Each conv stage padded by ``cat([zeros, x], 1)`` in front of an unpadded biased
    conv (zeros made with ``new_zeros``): the zeros are padding, not a conv state, so conv1's
    bias never reaches conv2's padding."""

    def __init__(self):
        super().__init__()
        hq, hkv, d = self.HQ, self.HKV, self.D
        self.q_dw = nn.Conv1d(hq * d, hq * d, self.K1, groups=hq * d)
        self.q_hc = nn.Conv1d(hq * d, hq * d, self.K2, groups=hq)
        self.k_dw = nn.Conv1d(hkv * d, hkv * d, self.K1, groups=hkv * d)
        self.k_hc = nn.Conv1d(hkv * d, hkv * d, self.K2, groups=hkv)

    def pad(self, x, n):
        return torch.cat([x.new_zeros(x.shape[0], n, x.shape[2]), x], 1)

    def conv(self, x, dw, hc):
        y = dw(self.pad(x, self.K1 - 1).transpose(1, 2)).transpose(1, 2)
        return hc(self.pad(y, self.K2 - 1).transpose(1, 2)).transpose(1, 2)


class NearCCGQAConvStagesCatZerosOneTooMany(CCGQAConvStagesCatZerosBiases):
    """The same with one zero too many in front of conv2, its last output dropped: every
    token reads the previous token's conv1 outputs (a delay, not a causal conv)."""

    def conv(self, x, dw, hc):
        y = dw(self.pad(x, self.K1 - 1).transpose(1, 2)).transpose(1, 2)
        return hc(self.pad(y, self.K2).transpose(1, 2)).transpose(1, 2)[:, :-1]


class CCGQAConvStackedShiftsEinsum(CCGQAConvPadSlice):
    """Both convolutions over the delayed copies of the sequence stacked on a new axis:
    the depthwise one as an einsum of the (B, T, C, k) stack with (C, k) taps (newest
    token first, so the taps are the kernel flipped), the per-head one as the (k, B, T, H,
    D) stack contracted with (k, H, D, D) matrices by an einsum; biases added."""

    @staticmethod
    def delayed(x, j):
        """x delayed by j tokens, zeros entering."""
        return F.pad(x, (0, 0) * (x.dim() - 2) + (j, 0))[:, : x.shape[1]]

    def conv(self, x, dw, hc):
        b, t, c = x.shape
        k1 = dw.weight.shape[-1]
        stack = torch.stack([self.delayed(x, j) for j in range(k1)], dim=-1)
        y = torch.einsum("btck,ck->btc", stack, dw.weight[:, 0].flip(-1)) + dw.bias
        heads, k2 = hc.groups, hc.weight.shape[-1]
        yh = y.view(b, t, heads, c // heads)
        stack = torch.stack([self.delayed(yh, j) for j in range(k2)])  # (k2, B, T, H, D)
        w2 = hc.weight.view(heads, c // heads, c // heads, k2).flip(-1).permute(3, 0, 1, 2)
        out = torch.einsum("kbthi,khoi->btho", stack, w2)
        return out.reshape(b, t, c) + hc.bias


class NearCCGQAConvStackedShiftsSeeNextToken(CCGQAConvStackedShiftsEinsum):
    """Near miss: the stack's first copy is the sequence advanced by one token."""

    @staticmethod
    def delayed(x, j):
        if j == 0:
            return F.pad(x[:, 1:], (0, 0) * (x.dim() - 2) + (0, 1))
        return CCGQAConvStackedShiftsEinsum.delayed(x, j)


class CCGQAGroupedQueryTablesViewedPerStream(CCGQAConvPadSlice):
    """q held (B, T, Hkv, G, D) through RoPE, k (B, T, Hkv, D): one helper views the
    table buffers' rows ``view(1, T, *[1] * (x.dim() - 3), D)`` for each, so q's tables
    carry one unit axis more (k's are expanded to k's shape); grouped einsum core."""

    def __init__(self):
        super().__init__()
        cos, sin = self.tables(32, "cpu")
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def rope(self, x, cos, sin):
        shape = (1, x.shape[1], *[1] * (x.dim() - 3), self.D)
        cos, sin = cos.view(shape).expand_as(x), sin.view(shape).expand_as(x)
        return x * cos + _rotate_half(x) * sin

    def forward(self, x):
        b, t, _ = x.shape
        g = self.HQ // self.HKV
        q, k = (self.normalise(z) for z in self.conv_and_mean(x))
        k = k * self.log_temp.exp().view(1, 1, self.HKV, 1)
        cos, sin = self.cos_cached[:t], self.sin_cached[:t]
        q = self.rope(q.view(b, t, self.HKV, g, self.D), cos, sin)
        k = self.rope(k, cos, sin)
        v = self.wv(x).view(b, t, self.HKV, self.D)
        s = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * self.D**-0.5
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        o = torch.einsum("bhgqk,bkhd->bqhgd", p, v)
        return self.wo(o.reshape(b, t, -1))


class AttnNumpyNamesSpecialLogsumexp(_QKV):
    """A JAX port's names: ``torch.multiply`` for the scale, a ``torch.where`` mask,
    ``torch.subtract`` and ``torch.special.logsumexp`` for the softmax, ``x.divide``."""

    def core(self, q, k, v):
        k, v = k.repeat_interleave(self.groups, dim=2), v.repeat_interleave(self.groups, dim=2)
        t = q.shape[1]
        s = torch.multiply(torch.einsum("bqhd,bkhd->bhqk", q, k), self.HEAD_DIM**-0.5)
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        s = torch.where(keep, s, torch.finfo(s.dtype).min)
        p = torch.exp(torch.subtract(s, torch.special.logsumexp(s, -1, keepdim=True)))
        return torch.einsum("bhqk,bkhd->bqhd", p, v.divide(1.0))


class AttnMegatronBaddbmmViewWrittenInPlace(_QKV):
    """Megatron's core attention on an uninitialised buffer: ``baddbmm(empty, q, kT,
    beta=0)`` viewed (B, H, T, T), the mask written into that view by ``masked_fill_``."""

    DIAGONAL = 1

    def core(self, q, k, v):
        b, t, h, d = q.shape
        k, v = k.repeat_interleave(self.groups, dim=2), v.repeat_interleave(self.groups, dim=2)
        ql, kl, vl = (x.transpose(0, 1).reshape(t, b * h, d) for x in (q, k, v))
        buf = torch.empty(b * h, t, t, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(
            buf, ql.transpose(0, 1), kl.transpose(0, 1).transpose(1, 2), beta=0.0, alpha=d**-0.5
        ).view(b, h, t, t)
        future = torch.triu(torch.ones(t, t, device=q.device, dtype=torch.bool), self.DIAGONAL)
        scores.masked_fill_(future, -10000.0)
        probs = F.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.bmm(probs.view(b * h, t, t), vl.transpose(0, 1))
        return out.view(b, h, t, d).transpose(1, 2)


class NearAttnMegatronBaddbmmViewMasksDiagonal(AttnMegatronBaddbmmViewWrittenInPlace):
    """The same with the diagonal masked too: no token sees itself."""

    DIAGONAL = 0


class CCGQAConvSumsOfCatShifts(CCGQAConvTapsWrittenOut):
    """Both convolutions as sums of the tokens delayed by ``cat([zeros, x[:, :T - j]])``:
    the depthwise one times per-channel taps, the per-head one as einsums of each delayed
    (B, T, C) copy viewed (B, T, H, D) with the head's matrices; biases added."""

    @staticmethod
    def shifted(x, j):
        if j == 0:
            return x
        return torch.cat([x.new_zeros(x.shape[0], j, x.shape[2]), x[:, : x.shape[1] - j]], 1)

    def conv(self, x, dw, hc):
        b, t, c = x.shape
        k1 = dw.weight.shape[-1]
        y = sum(self.shifted(x, j) * dw.weight[:, 0, k1 - 1 - j] for j in range(k1)) + dw.bias
        heads, k2 = hc.groups, hc.weight.shape[-1]
        w2 = torch.stack(hc.weight.chunk(heads, dim=0))  # (H, out, in, k)
        out = sum(
            torch.einsum("bthi,hoi->btho", self.shifted(y, j).view(b, t, heads, c // heads),
                         w2[..., k2 - 1 - j])
            for j in range(k2)
        )  # fmt: skip
        return out.reshape(b, t, c) + hc.bias


class CCGQAConvUnfoldGroupedFlax(CCGQAConvUnfoldWindows):
    """A Flax port: kernels laid out (k, in per group, out); the per-head conv's windows
    ``unfold``ed from (B, T, C) and then reshaped (B, T, H, D, k) per head."""

    def conv(self, x, dw, hc):
        b, t, c = x.shape
        k1 = dw.weight.shape[-1]
        win = F.pad(x, (0, 0, k1 - 1, 0)).unfold(1, k1, 1)
        y = torch.einsum("btck,kc->btc", win, dw.weight[:, 0].t()) + dw.bias
        heads, k2 = hc.groups, hc.weight.shape[-1]
        w2 = hc.weight.permute(2, 1, 0).reshape(k2, c // heads, heads, c // heads)  # (k, in, H, out)
        win = F.pad(y, (0, 0, k2 - 1, 0)).unfold(1, k2, 1).reshape(b, t, heads, c // heads, k2)
        return torch.einsum("btgik,kigo->btgo", win, w2).reshape(b, t, c) + hc.bias


class SdpaThreeDimFlatHeads(_QKV):
    """SDPA on 3-D (B*H, T, D) operands (no batch dim of their own), K/V repeated to the
    query heads before flattening, ``is_causal=True``."""

    def core(self, q, k, v):
        b, t, h, d = q.shape
        k, v = k.repeat_interleave(self.groups, dim=2), v.repeat_interleave(self.groups, dim=2)
        q3, k3, v3 = (x.transpose(1, 2).reshape(b * h, t, d) for x in (q, k, v))
        o = F.scaled_dot_product_attention(q3, k3, v3, is_causal=True)
        return o.view(b, h, t, d).transpose(1, 2)


class SdpaThreeDimTokenFlatGQA(_QKV):
    """Serving code's per-sequence call: token-flat (T, H, D) heads moved first, (H, T, D),
    SDPA with ``enable_gqa`` on 3-D operands, one call per sequence of the batch."""

    def core(self, q, k, v):
        outs = []
        for i in range(q.shape[0]):
            qi, ki, vi = (x[i].movedim(0, 1) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
            outs.append(o.movedim(1, 0))
        return torch.stack(outs)


class NearSdpaThreeDimNotCausal(SdpaThreeDimFlatHeads):
    def core(self, q, k, v):
        b, t, h, d = q.shape
        k, v = k.repeat_interleave(self.groups, dim=2), v.repeat_interleave(self.groups, dim=2)
        q3, k3, v3 = (x.transpose(1, 2).reshape(b * h, t, d) for x in (q, k, v))
        o = F.scaled_dot_product_attention(q3, k3, v3)
        return o.view(b, h, t, d).transpose(1, 2)



class CCGQATokenFlatThreeDimSdpa(CCGQATokenFlatNoBatch):
    """The token-flat block with SDPA called as vLLM's torch backend calls it: on the
    3-D (H, T, D) heads themselves, no batch dim added."""

    @staticmethod
    def sdpa(q, k, v, **kwargs):
        return F.scaled_dot_product_attention(q[0], k[0], v[0], **kwargs)[None]


class SdpaCausalWhenLonger(_QKV):
    """HF's ``is_causal = q_len > 1``: the causal flag read off the query length."""

    def core(self, q, k, v):
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
        return o.transpose(1, 2)
