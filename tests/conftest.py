"""Test-wide setup.

- Triton kernels run under the interpreter on CPU: TRITON_INTERPRET must be set before
  triton is first imported. The GPU run passes TRITON_INTERPRET=0 explicitly.
- Inductor's FX graph cache and AOTAutograd cache are off: a cache hit skips our pass, and
  every test asserts that its fusion fired. (Inductor's C++ code cache stays on: speed.)
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# the passes leave CPU graphs to Inductor by default; the tests check them on CPU
os.environ.setdefault("CCGQA_FUSE_ON_CPU", "1")
# a recognizer error fails the test instead of being reported and skipped
os.environ.setdefault("CCGQA_STRICT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI draws the same examples every run (a red CI is then reproducible); locally each run
# explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# pytest-xdist runs one worker per core: with torch's default of one thread per core in
# every worker the cores are oversubscribed, and OpenMP's waiting made a float64 conv1d
# take 1.5 s instead of 4 ms. One thread per worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False


# The full suite (CI) runs these too; the fast tier (-m "not slow") leaves them out: the
# hypothesis sweep over every corpus entry, dynamic shapes, the benchmark and training
# jobs end to end. Every corpus entry still runs in the fast tier, on fixed odd sizes
# through the real backend (test_entry_with_the_real_backend).
SLOW = (
    "tests/test_corpus_equivalence.py::test_entry_matches_eager_over_random_shapes",
    "tests/test_dynamic.py",
    "tests/test_bench.py",
    "tests/test_train_ccgqa_lm.py",
    "tests/test_example.py",
    "tests/test_value_shift.py::test_the_full_backend_and_dynamic_sequence_lengths",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
    # the kernel-path tests' "cuda" parameter (the ``device`` fixture below) is GPU work
    # too: ``-m cuda`` selects it
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available() and not interpreting:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and TRITON_INTERPRET=0")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu-interpreter", "cuda"])
def device(request, monkeypatch):
    """For kernel-path tests (test_ops_kernel_wiring, test_ccgqa_prologue_op): where an op's
    Triton kernel path can run eagerly: the interpreter on CPU (with the
    ops' CPU hook on), or a real GPU; the other case is skipped."""
    pytest.importorskip("triton")
    if request.param == "cuda":
        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("needs a CUDA GPU and TRITON_INTERPRET=0")
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU kernel path needs TRITON_INTERPRET=1")
    monkeypatch.setenv("CCGQA_INTERPRET_KERNELS_ON_CPU", "1")
    return "cpu"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import ccgqa_compile

    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    yield
    torch._dynamo.reset()
