"""Layering (../shared/design/architecture.md): the passes never import the kernels or the
ops (which import triton); only the backend, at compile time, registers the ops."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_passes_imports_no_kernel_or_op_module():
    loaded = _modules_after("import ccgqa_compile.passes")
    ours = {m for m in loaded if m.startswith("ccgqa_compile.")}
    assert not {m for m in ours if m.startswith(("ccgqa_compile.kernels", "ccgqa_compile.ops"))}
    # triton arrives only if Inductor itself brings it (torch._inductor imports it)
    if "triton" in loaded:
        assert "triton" in _modules_after("import torch._inductor.custom_graph_pass")
