"""SwiGLU idioms -> ``torch.ops.ccgqa.swiglu`` / ``swiglu_packed``.

Near misses that must not match: another activation (gelu, relu), a plain GLU
(sigmoid(gate) * up), a chunk along another dim, or halves in the other order for the
packed form (the exact re-trace compares slice bounds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import Idiom, family


def _inputs(act, _param, device):
    return (
        torch.randn(2, 3, 16, dtype=act, device=device),
        torch.randn(2, 3, 16, dtype=act, device=device),
    )


def _packed_inputs(act, _param, device):
    return (torch.randn(2, 3, 32, dtype=act, device=device),)


def _check_same_shape(values) -> str | None:
    gate, up = values["gate"], values["up"]
    if gate.shape != up.shape:
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} broadcast; the op needs equal shapes"
    return None


def _check_packed(values) -> str | None:
    if values["gate_up"].shape[-1] % 2:
        return "odd last dim: chunk(2) halves are unequal"
    return None


def _silu_mul(gate, up):
    return F.silu(gate) * up


def _mul_silu(gate, up):
    return up * F.silu(gate)


def _sigmoid_mul(gate, up):
    return gate * torch.sigmoid(gate) * up


def _repl(gate, up):
    return torch.ops.ccgqa.swiglu(gate, up)


def _chunk_silu_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _packed_repl(gate_up):
    return torch.ops.ccgqa.swiglu_packed(gate_up)


@family("swiglu")
def idioms() -> list[Idiom]:
    both = ((True, True),)
    return [
        Idiom(
            "swiglu",
            "chunk_gate_up",
            _chunk_silu_mul,
            _packed_repl,
            _packed_inputs,
            ((True,),),
            check=_check_packed,
        ),
        Idiom(
            "swiglu", "silu_gate_times_up", _silu_mul, _repl, _inputs, both, check=_check_same_shape
        ),
        Idiom(
            "swiglu", "up_times_silu_gate", _mul_silu, _repl, _inputs, both, check=_check_same_shape
        ),
        Idiom(
            "swiglu",
            "gate_sigmoid_gate_up",
            _sigmoid_mul,
            _repl,
            _inputs,
            both,
            check=_check_same_shape,
        ),
    ]
