"""Inductor must see each of our kernels write exactly its outputs.

A ``triton_op``'s kernels are analysed by Inductor (their TTIR) to learn which arguments
they mutate; functionalization then clones those and writes the "updated" copies back. A
false positive is not merely slow: the seed prologue's kernels were seen writing their
inputs (pointers that a helper returning the program's rows also took), and Inductor wrote
the stride-0 RoPE table view back into its base as a sum over the batch, so the second
launch read doubled tables and the compiled module was wrong (0.35 relative error on the
H100, 2026-11-25) while every eager kernel test passed. This test runs Inductor's own
analysis on every launch of every kernel (a subprocess: it needs JIT functions, not the
interpreter's) and pins the written arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# kernel -> the arguments each launch writes (launch order of tests/kernels/_kernel_writes.py)
EXPECTED_WRITES = {
    "_rms_norm_fwd_kernel": [["rstd_ptr", "y_ptr"]],
    "_rms_norm_bwd_kernel": [["dw_partial_ptr", "dx_ptr"]],
    "_swiglu_fwd_kernel": [["out_ptr"]],
    "_swiglu_bwd_kernel": [["dgate_ptr", "dup_ptr"]],
    "_rope_kernel": [["out_ptr"], ["out_ptr"]],
    "_forward_kernel": [["lse_ptr", "out_ptr"]],
    "_backward_preprocess_kernel": [["delta_ptr"]],
    "_backward_dkdv_kernel": [["dk_ptr", "dv_ptr"]],
    "_backward_dq_kernel": [["dq_ptr"]],
    "_ccgqa_prologue_fwd_kernel": [["k_ptr", "q_ptr"]],
    "_ccgqa_prologue_draw_kernel": [["d_beta_part_ptr", "draw_k_ptr", "draw_q_ptr"]],
    "_ccgqa_prologue_conv_bwd_kernel": [
        ["db1_part_ptr", "db2_part_ptr", "dw1_part_ptr", "dw2_part_ptr", "dx_ptr"]
    ]
    * 2,
    "_seed_fwd_kernel": [["out_ptr"], ["out_ptr"]],
    "_seed_draw_kernel": [["draw_ptr"], ["d_temp_parts_ptr", "draw_ptr"]],
    "_seed_dx_kernel": [["dx_ptr"]] * 2,
    "_seed_dw2_kernel": [["dw2_parts_ptr"]] * 2,
    "_seed_dw1_kernel": [["dw1_parts_ptr"]] * 2,
}


@pytest.fixture(scope="module")
def analysed_writes() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # JIT functions, not the interpreter's
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "kernels" / "_kernel_writes.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_kernel_is_analysed(analysed_writes):
    """A new kernel must be added here (and to the launcher list) to be covered."""
    assert sorted(analysed_writes) == sorted(EXPECTED_WRITES)


@pytest.mark.parametrize("kernel", sorted(EXPECTED_WRITES))
def test_inductor_sees_only_the_outputs_written(analysed_writes, kernel):
    assert analysed_writes[kernel] == EXPECTED_WRITES[kernel]
