"""RMSNorm idioms -> ``torch.ops.ccgqa.rms_norm``.

Near misses that must not match (and do not, by structure or by the exact re-trace):
eps outside the sqrt, a mean over another dim, a square other than x^2, Gemma's offset
other than 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import DTYPES_MIXED, DTYPES_SAME, HALF_OR_FLOAT, Idiom, family

EPS = 2.0**-17  # scalar_workaround placeholder; exact in fp32 so decompositions keep it bit-equal
_GRADS = ((True, True), (True, False), (False, True))


def _inputs(act: torch.dtype, param: torch.dtype, device: str):
    return (
        torch.randn(2, 3, 16, dtype=act, device=device),
        torch.randn(16, dtype=param, device=device),
        EPS,
    )


def _check_weight(values) -> str | None:
    x, w = values["x"], values["weight"]
    if w.dim() != 1 or w.shape[0] != x.shape[-1]:
        return f"weight shape {tuple(w.shape)} is not ({x.shape[-1]},): not a per-channel weight"
    return None


def _check_upcast(values) -> str | None:
    if values["x"].dtype not in HALF_OR_FLOAT:
        return f"x is {values['x'].dtype}; the idiom computes in float32, the op would not"
    return _check_weight(values)


def _op(x, weight, eps, offset, out_dtype):
    return torch.ops.ccgqa.rms_norm(x, weight, eps, offset, out_dtype)[0]


# --- HF Llama: fp32 upcast, pow(2).mean, rsqrt, cast back, weight * normed ---
def _hf_llama(x, weight, eps):
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(dtype)


def _hf_llama_repl(x, weight, eps):
    return _op(x, weight, eps, 0.0, torch.promote_types(weight.dtype, x.dtype))


# --- the same without the upcast, weight on either side ---
def _rsqrt_weight_right(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rsqrt_weight_left(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _plain_repl(x, weight, eps):
    return _op(x, weight, eps, 0.0, torch.promote_types(x.dtype, weight.dtype))


# --- division by sqrt ---
def _div_sqrt(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# --- F.rms_norm ---
def _functional(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _functional_repl(x, weight, eps):
    return _op(x, weight, eps, 0.0, x.dtype)


# --- Gemma: upcast, (1 + w.float()), type_as(x) ---
def _gemma(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h * (1.0 + weight.float())
    return h.type_as(x)


def _gemma_repl(x, weight, eps):
    return _op(x, weight, eps, 1.0, x.dtype)


# --- no weight (e.g. qk-norm): x * rsqrt(mean(x^2) + eps) ---
def _unweighted(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _unweighted_repl(x, eps):
    return _op(x, None, eps, 0.0, x.dtype)


def _unweighted_inputs(act, _param, device):
    return (torch.randn(2, 3, 16, dtype=act, device=device), EPS)


@family("rms_norm")
def idioms() -> list[Idiom]:
    def idiom(
        name, search, replace, dtypes=DTYPES_SAME, check=_check_weight, make=_inputs, grads=_GRADS
    ):
        return Idiom("rms_norm", name, search, replace, make, grads, dtypes, {"eps": EPS}, check)

    return [
        idiom("hf_llama_fp32_upcast", _hf_llama, _hf_llama_repl, DTYPES_MIXED, _check_upcast),
        idiom("gemma_one_plus_weight", _gemma, _gemma_repl, DTYPES_MIXED, _check_upcast),
        idiom("rsqrt_times_weight", _rsqrt_weight_right, _plain_repl),
        idiom("weight_times_rsqrt", _rsqrt_weight_left, _plain_repl),
        idiom("div_sqrt", _div_sqrt, _plain_repl),
        idiom("F.rms_norm", _functional, _functional_repl),
        idiom(
            "rsqrt_no_weight",
            _unweighted,
            _unweighted_repl,
            check=None,
            make=_unweighted_inputs,
            grads=((True,),),
        ),
    ]
