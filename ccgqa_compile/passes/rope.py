"""RoPE idioms -> ``torch.ops.ccgqa.rope``.

Near misses that must not match: the wrong rotation sign (``cat(x2, -x1)``), a split at
another point than half the rotary dims, pairs taken in the other order, cos/sin swapped.
The exact re-trace compares slice bounds and the structure fixes the signs.
"""

from __future__ import annotations

import torch

from ._registry import HALF_OR_FLOAT, Idiom, family

_X_GRAD = ((True, False, False),)


def _inputs(act, _param, device):
    x = torch.randn(2, 3, 5, 8, dtype=act, device=device)
    return (
        x,
        torch.randn(2, 1, 5, 8, dtype=act, device=device),
        torch.randn(2, 1, 5, 8, dtype=act, device=device),
    )


def _partial_inputs(act, _param, device):
    x = torch.randn(2, 3, 5, 8, dtype=act, device=device)
    return (
        x,
        torch.randn(2, 1, 5, 4, dtype=act, device=device),
        torch.randn(2, 1, 5, 4, dtype=act, device=device),
    )


def _complex_inputs(act, _param, device):
    # Meta Llama layout: x (B, T, H, D); freqs_cis reshaped for broadcast to (1, T, 1, D/2)
    return (
        torch.randn(2, 5, 3, 8, dtype=act, device=device),
        torch.randn(1, 5, 1, 4, dtype=torch.complex64, device=device),
    )


def _check_tables(values) -> str | None:
    x, cos, sin = values["x"], values["cos"], values["sin"]
    rd = cos.shape[-1]
    if sin.shape[-1] != rd or rd % 2 or rd > x.shape[-1]:
        return (
            f"cos/sin last dims {cos.shape[-1]}/{sin.shape[-1]} do not fit head dim {x.shape[-1]}"
        )
    rot_shape = (*x.shape[:-1], rd)
    for name, table in (("cos", cos), ("sin", sin)):
        try:
            if tuple(torch.broadcast_shapes(rot_shape, table.shape)) != tuple(rot_shape):
                return f"{name} {tuple(table.shape)} broadcasts x beyond its own shape"
        except RuntimeError:
            return f"{name} {tuple(table.shape)} does not broadcast against x"
    return None


def _check_complex(values) -> str | None:
    x, freqs = values["x"], values["freqs_cis"]
    if x.dtype not in HALF_OR_FLOAT:
        return f"x is {x.dtype}; the idiom computes in float32, the op would not"
    if freqs.dtype != torch.complex64:
        return f"freqs_cis is {freqs.dtype}, not complex64"
    rot_shape = (*x.shape[:-1], x.shape[-1] // 2)
    try:
        if tuple(torch.broadcast_shapes(rot_shape, freqs.shape)) != tuple(rot_shape):
            return "freqs_cis broadcasts x beyond its own shape"
    except RuntimeError:
        return "freqs_cis does not broadcast against x"
    return None


def _out_dtype(x, cos, sin):
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


# --- HF Llama rotate_half: cat(-x2, x1) ---
def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _hf_rotate_half(x, cos, sin):
    return (x * cos) + (_rotate_half(x) * sin)


def _full_repl(x, cos, sin, interleaved=False):
    return torch.ops.ccgqa.rope(x, cos, sin, x.shape[-1], interleaved, _out_dtype(x, cos, sin))


# --- GPT-NeoX partial rotary: rotate the first rotary_ndims dims, pass the rest ---
def _neox_partial(x, cos, sin):
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x_rot = (x_rot * cos) + (_rotate_half(x_rot) * sin)
    return torch.cat((x_rot, x_pass), dim=-1)


def _partial_repl(x, cos, sin):
    return torch.ops.ccgqa.rope(x, cos, sin, cos.shape[-1], False, _out_dtype(x, cos, sin))


# --- GPT-J interleaved pairs: stack(-x_odd, x_even).flatten ---
def _rotate_every_two(x):
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _gptj_interleaved(x, cos, sin):
    return (x * cos) + (_rotate_every_two(x) * sin)


# The rotation computed before ``x * cos`` (``rot = ...; return x * cos + rot * sin``): the
# forward is the same graph, but autograd then adds x's two gradient terms in the other
# order, so the backward has its own pattern.
def _gptj_rotation_first(x, cos, sin):
    rot = _rotate_every_two(x)
    return (x * cos) + (rot * sin)


def _hf_rotation_first(x, cos, sin):
    rot = _rotate_half(x)
    return (x * cos) + (rot * sin)


# ... and with the halves (pairs) sliced inline, second (odd) first: after the rotation,
# autograd folds x * cos's gradient with the two slices' in slicing order
def _hf_rotation_first_inline(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return (x * cos) + (rot * sin)


def _gptj_rotation_first_inline(x, cos, sin):
    rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return (x * cos) + (rot * sin)


def _interleaved_repl(x, cos, sin):
    return _full_repl(x, cos, sin, interleaved=True)


# --- Meta Llama: view_as_complex multiply ---
def _meta_complex(x, freqs_cis):
    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_c * freqs_cis).flatten(3).type_as(x)


def _meta_complex_repl(x, freqs_cis):
    parts = torch.view_as_real(freqs_cis)
    cos = parts[..., 0].repeat_interleave(2, dim=-1)
    sin = parts[..., 1].repeat_interleave(2, dim=-1)
    return torch.ops.ccgqa.rope(x, cos, sin, x.shape[-1], True, x.dtype)


@family("rope")
def idioms() -> list[Idiom]:
    def table_idiom(name, search, replace, make=_inputs):
        return Idiom("rope", name, search, replace, make, _X_GRAD, check=_check_tables)

    return [
        table_idiom("neox_partial_rotary", _neox_partial, _partial_repl, _partial_inputs),
        # each spelling below computes the same forward but sums x's gradient terms in its
        # own order, so each needs its own training pattern
        table_idiom("hf_rotate_half", _hf_rotate_half, _full_repl),
        table_idiom("hf_rotate_half", _hf_rotation_first, _full_repl),
        table_idiom("hf_rotate_half", _hf_rotation_first_inline, _full_repl),
        table_idiom("gptj_interleaved", _gptj_interleaved, _interleaved_repl),
        table_idiom("gptj_interleaved", _gptj_rotation_first, _interleaved_repl),
        table_idiom("gptj_interleaved", _gptj_rotation_first_inline, _interleaved_repl),
        Idiom(
            "rope",
            "meta_view_as_complex",
            _meta_complex,
            _meta_complex_repl,
            _complex_inputs,
            ((True, False),),
            check=_check_complex,
        ),
    ]
