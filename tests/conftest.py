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


# Two tiers. The full suite (CI: ``pytest -n auto``) runs everything; the fast tier
# (``pytest -n auto -m "not slow"``, day to day: about 4 minutes on 2 idle cores) leaves out
# what is marked slow here. On CPU the time goes to Inductor's C++ code generation (the real
# backend), the Hugging Face models and fresh interpreters, so the slow tier takes the
# repetition and keeps one end-to-end case of each kind in the fast tier:
#
# - corpus entries through the real backend: all but FAST_CORPUS_REAL (each fusion kind in
#   training and inference: rms_norm, swiglu, rope, gqa_attention hand-written and SDPA,
#   CCGQA blocks (prologue, attention, value shift) with either core; the seed prologue
#   in inference; two near misses); the generality cases through the real backend;
# - HF models: all but FAST_HF (Llama with SDPA, Qwen2 with hand-written attention, ZAYA's
#   attention at d16 in training and inference); HF ``generate``: test_generate_example
#   keeps prefill and decode (gqa_decode_attention) through the real backend, every fusion
#   counted;
# - generality spellings: training runs, but for the near misses of RMSNorm, SwiGLU and
#   RoPE. Recognition is pre-grad: the inference run of every spelling checks what fires
#   and what must not; the training runs check the ops' backward, which the op tests
#   (gradcheck) and the real-backend training cases above keep;
# - the hypothesis sweeps (every corpus entry; value shift), dynamic shapes, the benchmark,
#   training and example jobs end to end, value shift's full-backend runs;
# - repetition within unit tests: the prologue recognition per spelling in the
#   single-kv-head and ungrouped layouts (test_recognition_fuses_the_training_prologue keeps
#   all three), shared RoPE tables with qk-mean (the chains without it are the ambiguous
#   ones), the two largest prologue-kernel cases (chunking and half products stay at T17);
# - fresh interpreters: the entry point and import layering.
#
# The fast tier still runs every op, kernel (interpreter), report, backend-option, block,
# decode (no codegen), robustness and near-miss test.
SLOW = (
    "tests/test_corpus_equivalence.py::test_entry_matches_eager_over_random_shapes",
    "tests/test_dynamic.py",
    # the benchmark runs; the results files' and generated tables' checks stay fast
    "tests/test_bench.py::test_bench_",
    "tests/test_bench.py::test_ccgqa_block_bench_on_cpu",
    "tests/test_train_ccgqa_lm.py",
    "tests/test_example.py",
    "tests/test_value_shift.py::test_the_full_backend_and_dynamic_sequence_lengths",
    "tests/test_value_shift.py::test_ccgqa_value_shift_moves_onto_v",
    "tests/test_value_shift.py::test_disabled_by_name",
    "tests/test_decode.py::test_llama_generate_greedy_tokens_equal_eager",
    "tests/test_decode.py::test_zaya_generate_greedy_tokens_equal_eager",
    # the interpreter's largest prologue cases: chunking (T17-k33-variantish-chunked) and
    # half products across block borders (T17 again) stay
    "tests/kernels/test_ccgqa_prologue_kernels.py::test_kernels_match_float64_reference[T40-B2-G2-chunks]",
    "tests/kernels/test_ccgqa_prologue_kernels.py::test_half_products_match_float64_reference[T19-B2-G2-blocks]",
    "tests/test_generality.py::test_spelling_with_the_real_backend",
    # fresh interpreters: packaging (the entry point) and import layering
    "tests/test_backend.py::test_entry_point_works_in_a_fresh_interpreter_without_import",
    "tests/test_layers.py",
)

# (entry name, training) pairs of test_entry_with_the_real_backend kept in the fast tier
FAST_CORPUS_REAL = {
    *((name, training) for training in (True, False) for name in (
        "rms_hf_llama",
        "swiglu_hf_llama",
        "rope_hf_rotate_half",
        "attn_repeat_kv_tril",  # hand-written attention
        "attn_sdpa_enable_gqa",  # SDPA
        # whole blocks: prologue, attention (hand-written / SDPA), value shift
        "ccgqa_zyphra_norm_div_no_temperature",
        "ccgqa_sdpa_repeat_kv",
        "rms_near_per_token_weight",  # near misses: must not fire
        "attn_sdpa_near_alibi_mask",
    )),
    ("ccgqa_seed_variant", False),  # the seed prologue (fused in inference graphs only)
}  # fmt: skip

FAST_HF = (
    "tests/test_hf_models.py::test_decoder[llama-sdpa-infer]",
    "tests/test_hf_models.py::test_decoder[qwen2-eager-infer]",
    "tests/test_hf_models.py::test_zaya_attention[d16-train]",
    "tests/test_hf_models.py::test_zaya_attention[d16-infer]",
)


def _slow(item) -> bool:
    nodeid = item.nodeid
    if nodeid.startswith(SLOW):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    func = nodeid.split("[")[0]
    if func == "tests/test_corpus_equivalence.py::test_entry_with_the_real_backend":
        return (params["entry"].name, params["training"]) not in FAST_CORPUS_REAL
    if func == "tests/test_generality.py::test_spelling":
        case = params["case"]
        attention = bool({"gqa_attention", "ccgqa_prologue", "ccgqa_block"} & set(case.expect))
        return params["training"] and (case.kind != "near" or attention)
    if func == "tests/test_blocks.py::test_blocks_sharing_one_rope_table":
        return params["spelling"] == "mean"
    if func == "tests/test_ccgqa_prologue_op.py::test_recognition_fuses_each_spelling":
        return params["layout"] != "grouped"
    if nodeid.startswith("tests/test_hf_models.py::"):
        return "cuda" not in item.keywords and nodeid not in FAST_HF
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _slow(item):
            item.add_marker(pytest.mark.slow)
    if any(item.nodeid.startswith("tests/test_corpus_equivalence.py") for item in items):
        from patterns import BY_NAME

        # a renamed entry would silently leave its fusion kind out of the fast tier
        unknown = {name for name, _ in FAST_CORPUS_REAL} - set(BY_NAME)
        assert not unknown, f"conftest.FAST_CORPUS_REAL names no corpus entry: {unknown}"
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
