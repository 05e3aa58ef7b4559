"""SwiGLU MLPs as people write them, and near misses that are not SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, Shape, hidden_states


class LlamaMLP(nn.Module):
    """Hugging Face Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, s: Shape):
        super().__init__()
        inter = 2 * s.hidden + 3  # odd on purpose
        self.gate_proj = nn.Linear(s.hidden, inter, bias=False)
        self.up_proj = nn.Linear(s.hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, s.hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UpTimesSiluMLP(LlamaMLP):
    def forward(self, x):
        return self.down_proj(self.up_proj(x) * F.silu(self.gate_proj(x)))


class SigmoidMLP(LlamaMLP):
    """silu written out: g * sigmoid(g) * u."""

    def forward(self, x):
        g = self.gate_proj(x)
        return self.down_proj(g * torch.sigmoid(g) * self.up_proj(x))


class FusedGateUpMLP(nn.Module):
    """One gate-up projection split with chunk (Phi-3, many training codebases)."""

    def __init__(self, s: Shape):
        super().__init__()
        inter = 2 * s.hidden + 3
        self.gate_up_proj = nn.Linear(s.hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, s.hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SwappedHalvesMLP(FusedGateUpMLP):
    """Up first, gate second: still SwiGLU, must fuse on the halves (not as the packed op)."""

    def forward(self, x):
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# ---- near misses ----
class GeluMLP(LlamaMLP):
    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class GluMLP(LlamaMLP):
    """sigmoid(g) * u: GLU, not SwiGLU."""

    def forward(self, x):
        return self.down_proj(torch.sigmoid(self.gate_proj(x)) * self.up_proj(x))


class SiluOfUpMLP(LlamaMLP):
    """g * sigmoid(u) * u: the sigmoid is of the wrong tensor."""

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(g * torch.sigmoid(u) * u)


def _e(name, cls, expect=1, note=""):
    return Entry(name, "swiglu", expect, cls, hidden_states, note)


ENTRIES = [
    _e("swiglu_hf_llama", LlamaMLP, note="nn.SiLU()(gate) * up"),
    _e("swiglu_up_times_silu", UpTimesSiluMLP, note="up * F.silu(gate)"),
    _e("swiglu_sigmoid", SigmoidMLP, note="g * sigmoid(g) * u"),
    _e("swiglu_fused_gate_up", FusedGateUpMLP, note="gate_up.chunk(2, -1)"),
    _e("swiglu_swapped_halves", SwappedHalvesMLP, note="up, gate = chunk(2)"),
    _e("swiglu_near_gelu", GeluMLP, 0, "gelu(g) * u"),
    _e("swiglu_near_glu", GluMLP, 0, "sigmoid(g) * u"),
    _e("swiglu_sigmoid_of_up", SiluOfUpMLP, 1, "g * sigmoid(u) * u = silu(u) * g: gate and up swapped"),
]
