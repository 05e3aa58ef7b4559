"""Which tensor arguments each of our Triton kernels writes, as Inductor's analysis sees it.

Run as a script (a subprocess of test_kernel_writes.py, with TRITON_INTERPRET unset, so
that the kernels are JIT functions): calls every launcher on small CPU tensors with the
launches recorded instead of run, then hands each recorded launch to Inductor's mutation
analysis (the one that decides which inputs a ``triton_op``'s kernel mutates, through
_inductor_compat.kernel_written_args) for an sm_90 target. Prints one JSON object:
{kernel name: sorted written argument names} (a list per launch).
"""

from __future__ import annotations

import json
import math
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run with TRITON_INTERPRET unset: the analysis needs JIT functions")

import torch  # noqa: E402

from ccgqa_compile import _inductor_compat, kernels  # noqa: E402
from ccgqa_compile.kernels import (  # noqa: E402
    ccgqa_prologue,
    ccgqa_seed_prologue,
    gqa_attention,
    rms_norm,
    rope,
    swiglu,
)

MODULES = (ccgqa_prologue, ccgqa_seed_prologue, gqa_attention, rms_norm, rope, swiglu)


def _jit_function(kernel):
    """The JIT function itself (an Autotuner wraps one)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


class _Recorder:
    """Stands in for ``traceable``: records (kernel, arguments by name), launches nothing."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class _Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    names = list(_jit_function(kernel).arg_names)
                    bound = dict(zip(names, args))
                    bound.update({k: v for k, v in kwargs.items() if k in names})
                    recorder.launches.append((kernel, bound))

                return launch

        return _Launch()


def _r(*shape, dtype=torch.float16):
    return torch.randn(*shape).to(dtype)


def _launch_everything():
    b, t, d = 2, 40, 16
    # rms_norm, swiglu, rope
    x, w = _r(6, 64), _r(64)
    y, rstd = rms_norm.rms_norm_fwd(x, w, 1e-6, 0.0, x.dtype)
    rms_norm.rms_norm_bwd(_r(6, 64), x, w, torch.ones(6), 0.0)
    gate, up = _r(6, 64), _r(6, 64)
    swiglu.swiglu_fwd(gate, up)
    swiglu.swiglu_bwd(_r(6, 64), gate, up)
    q = _r(b, 4, t, d)
    cos, sin = _r(t, d), _r(t, d)
    rope.rope_fwd(q, cos, sin, d, False)
    rope.rope_bwd(q, cos, sin, d, True)
    # attention
    k, v = _r(b, 2, t, d), _r(b, 2, t, d)
    o = torch.empty_like(q)
    lse = torch.zeros(b, 4, t)
    gqa_attention.gqa_attention_fwd(q, k, v, 0.25)
    gqa_attention.gqa_attention_bwd(torch.randn_like(q), q, k, v, o, lse, 0.25)
    # the stock prologue: hq 4, hkv 2, d 16, convs 2/2, biases, exp temperature
    e_q, e_kv = 4 * d, 2 * d
    pre = _r(b, t, e_q + 2 * e_kv)
    args = [
        pre[..., :e_q], pre[..., e_q : e_q + e_kv],
        _r(e_q, 1, 2), _r(e_q), _r(e_q, d, 2), _r(e_q),
        _r(e_kv, 1, 2), _r(e_kv), _r(e_kv, d, 2), _r(e_kv),
        _r(2), cos, sin, 4, 2, True, "exp", math.sqrt(d), 1e-12, d, False,
    ]  # fmt: skip
    qo, ko = ccgqa_prologue.ccgqa_prologue_fwd(*args)
    ccgqa_prologue.ccgqa_prologue_bwd(torch.randn_like(qo), torch.randn_like(ko), *args)
    # the seed's prologue: hq 4, hkv 2, d 16, convs 3/3
    seed = [
        pre[..., :e_q], pre[..., e_q : e_q + e_kv],
        _r(e_q, d, 3), _r(e_q, e_q, 3), _r(e_kv, d, 3), _r(e_kv, e_kv, 3),
        _r(()), cos, sin, 4, 2, 1e-12, True,
    ]  # fmt: skip
    qo, ko = ccgqa_seed_prologue.ccgqa_seed_prologue_fwd(*seed)
    ccgqa_seed_prologue.ccgqa_seed_prologue_bwd(torch.randn_like(qo), torch.randn_like(ko), *seed)


def _target_for_the_analysis() -> None:
    """Without a GPU driver (the CPU CI), hand Triton's code generator an sm_90 target:
    TTIR, which the analysis reads, needs no device."""
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        triton.runtime.driver.active.get_current_target()
    except RuntimeError:

        class _NoDevice:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        triton.runtime.driver.set_active(_NoDevice())


def main() -> None:
    _target_for_the_analysis()
    recorder = _Recorder()
    kernels.traceable = recorder
    for module in MODULES:
        module.traceable = recorder
    _launch_everything()
    out: dict[str, list[list[str]]] = {}
    for kernel, bound in recorder.launches:
        written = _inductor_compat.kernel_written_args(kernel, bound)
        out.setdefault(_jit_function(kernel).__name__, []).append(sorted(written))
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
