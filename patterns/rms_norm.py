"""RMSNorm as people write it, and near misses that are NOT RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, Shape, hidden_states


class LlamaRMSNorm(nn.Module):
    """Hugging Face Llama: float32 upcast, cast back before the weight."""

    def __init__(self, s: Shape):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(s.hidden))
        self.eps = s.eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


class RsqrtRMSNorm(LlamaRMSNorm):
    """No upcast, weight multiplied last."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class WeightFirstRMSNorm(LlamaRMSNorm):
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class DivSqrtRMSNorm(LlamaRMSNorm):
    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FunctionalRMSNorm(LlamaRMSNorm):
    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma: weight initialised at 0, applied as (1 + w) in float32."""

    def __init__(self, s: Shape):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(s.hidden))
        self.eps = s.eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h * (1.0 + self.weight.float())
        return h.type_as(x)


class UnweightedRMSNorm(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.eps = s.eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class TwoNormsRMSNorm(nn.Module):
    """Two RMSNorms around a linear layer: both must fuse."""

    def __init__(self, s: Shape):
        super().__init__()
        self.norm1, self.norm2 = LlamaRMSNorm(s), LlamaRMSNorm(s)
        self.proj = nn.Linear(s.hidden, s.hidden, bias=False)

    def forward(self, x):
        return self.norm2(self.proj(self.norm1(x)))


# ---- near misses: must not be replaced ----
class EpsOutsideSqrt(LlamaRMSNorm):
    def forward(self, x):
        return x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + self.eps) * self.weight


class MeanOverSeq(LlamaRMSNorm):
    """Normalises over the sequence dim, not the channels."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight


class AbsCubeNorm(LlamaRMSNorm):
    """Mean of x^4 instead of x^2."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(4).mean(-1, keepdim=True) + self.eps) * self.weight


class GemmaTwoPlusWeight(GemmaRMSNorm):
    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h * (2.0 + self.weight.float())
        return h.type_as(x)


class PerTokenWeight(nn.Module):
    """Weight of shape (seq, hidden): broadcasts like RMSNorm but is not per-channel."""

    def __init__(self, s: Shape):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(s.seq, s.hidden))
        self.eps = s.eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _e(name, cls, expect=1, note="", forbidden=(), promised=lambda shape: True):
    return Entry(name, "rms_norm", expect, cls, hidden_states, note, forbidden, promised)


# the idioms the report names: a region whose output is multiplied by per-channel inputs
# fuses with their product as the weight
_WEIGHTED = ("weighted",)


ENTRIES = [
    _e("rms_hf_llama", LlamaRMSNorm, note="HF Llama, fp32 upcast"),
    _e("rms_rsqrt", RsqrtRMSNorm, note="x * rsqrt(mean(x^2)+eps) * w"),
    _e("rms_weight_first", WeightFirstRMSNorm, note="w * (x * rsqrt(...))"),
    _e("rms_div_sqrt", DivSqrtRMSNorm, note="x / sqrt(mean(x^2)+eps) * w"),
    _e("rms_functional", FunctionalRMSNorm, note="F.rms_norm"),
    _e("rms_gemma", GemmaRMSNorm, note="Gemma (1 + w), fp32"),
    _e("rms_unweighted", UnweightedRMSNorm, note="no weight"),
    _e("rms_two_in_block", TwoNormsRMSNorm, expect=2, note="two norms around a linear"),
    _e("rms_near_eps_outside_sqrt", EpsOutsideSqrt, 0, "x / (sqrt(mean) + eps)"),
    _e("rms_near_mean_over_seq", MeanOverSeq, 0, "mean over dim 1"),
    _e("rms_near_fourth_power", AbsCubeNorm, 0, "mean(x^4)"),
    # near misses of one form whose core is still a genuine RMSNorm: (2 + w) is a fine
    # per-channel weight for the plain op, but must never become Gemma's (1 + w) op; a
    # per-token weight must not become any weighted op (the unweighted core may fuse)
    _e("rms_gemma_two_plus", GemmaTwoPlusWeight, 1, "(2 + w): a per-channel weight like any other"),
    _e(
        "rms_near_per_token_weight", PerTokenWeight, 1,
        "weight (seq, hidden): only the unweighted core fuses (one token: it is per-channel)",
        _WEIGHTED, promised=lambda shape: shape.seq > 1,
    ),  # fmt: skip
]
