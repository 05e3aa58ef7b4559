"""Hugging Face transformers models compiled with backend="ccgqa": tiny random configs, no
download. Every instance of every fusion is counted per graph kind, and the compiled results
(outputs, every gradient) are compared with eager and with a float64 copy.

- ZAYA (``transformers.models.zaya``, Zyphra's CCA): ``ZayaForCausalLM`` (2 layers; with
  eager experts its MoE graph-breaks one forward into ~15 graphs) and ``ZayaAttention``
  alone at head dims 16..128.
- Llama, Mistral, Qwen2 with attn_implementation "sdpa" and "eager".
- The same checks in bf16 on a GPU (``-m cuda``). The more expensive CPU variants (more
  ZayaForCausalLM cases) run only with ``CCGQA_SLOW=1``; they are marked ``slow`` too.

CPU cost: ZayaForCausalLM compiles in ~40 s, the others in 5..20 s each; the default run
compiles ZayaForCausalLM twice.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter

import pytest
import torch

import ccgqa_compile

from ._compare import REFERENCE_FLOOR, assert_as_close_as_eager, assert_close, rel_err

transformers = pytest.importorskip("transformers")

# not registered in pyproject (the brief of these tests keeps it as it is): no unknown-mark
# warning; the skipif below is what keeps these out of the default run
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    _slow_mark = pytest.mark.slow


def slow(test):
    return _slow_mark(
        pytest.mark.skipif(
            not os.environ.get("CCGQA_SLOW"), reason="slow CPU variant: set CCGQA_SLOW=1"
        )(test)
    )


# SDPA calls are ours up to this head dim (config.SDPA_MAX_HEAD_DIM: above it SDPA is kept
# by policy, and a CCGQA block still counts, its attention being SDPA)
SDPA_FUSED_UP_TO = 32
LAYERS = 2
CUDA_BF16 = (torch.bfloat16, "cuda")  # the GPU variants: bf16 on the GPU
TRAIN_INFER = pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """One intra-op thread per test process. With two (2 cores, 2 xdist workers) CPU conv1d
    thrashes: a float64 depthwise conv1d of 192 channels took 3 s instead of 1 ms, and the
    prologue recognizer's float64 probes and the float64 references run dozens of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- helpers


def counts_by_kind(rep) -> dict[str, dict[str, int]]:
    """{graph kind: {fusion: count}} over every recorded graph; kinds with none left out."""
    out: dict[str, Counter] = {}
    for g in rep.graphs:
        for (fusion, _idiom), n in g.fused.items():
            out.setdefault(g.kind, Counter())[fusion] += n
    return {kind: dict(c) for kind, c in out.items()}


def check_counts(expected: dict[str, int], training: bool):
    rep = ccgqa_compile.report()
    kind = "training" if training else "inference"
    got = counts_by_kind(rep)
    assert got == ({kind: expected} if expected else {}), str(rep)
    assert not rep.forward_only(), str(rep)
    return rep


def check_result(actual, eager, reference, dtype, what, ill_conditioned=False, strict=False):
    """Compiled vs eager and vs float64. fp32: the direct criterion (``strict``: nothing
    else accepted) and, beside it, the float64 one (_compare's helper stops at the direct
    one when it passes); half precision: _compare's float64 criterion."""
    if actual is None or eager is None:
        assert actual is None and eager is None, f"{what}: gradient None in one run only"
        return
    if strict:
        assert_close(actual, eager, dtype, what)
    assert_as_close_as_eager(actual, eager, reference, dtype, what, ill_conditioned)
    if dtype == torch.float32:
        err_c, err_e = rel_err(actual, reference), rel_err(eager, reference)
        bound = 2 * err_e + REFERENCE_FLOOR[dtype] * (4 if ill_conditioned else 1)
        assert err_c <= bound, f"{what}: error vs fp64 {err_c:.3e} > {bound:.3e}"


def check_grads(model, eager, reference, dtype):
    named = list(model.named_parameters())
    assert named, "no parameters"
    for (name, p), p_e, p_r in zip(named, eager.parameters(), reference.parameters()):
        # a ZAYA temperature's gradient sums over every attention logit (see _compare)
        check_result(
            p.grad,
            p_e.grad,
            p_r.grad,
            dtype,
            f"grad of {name}",
            ill_conditioned=name.endswith("temp"),
        )
    assert any(p.grad is not None for _, p in named), "no gradient reached the parameters"


def three_copies(model, dtype, device):
    """(the model to compile, its eager twin, a float64 twin), all with the same weights."""
    model = model.to(device=device, dtype=dtype)
    return model, copy.deepcopy(model), copy.deepcopy(model).double()


# ---------------------------------------------------------------- ZAYA


def zaya():
    return pytest.importorskip(
        "transformers.models.zaya.modeling_zaya", reason="transformers >= 5.24 (models.zaya)"
    )


def zaya_config(head_dim, heads=4, kv_heads=2, hidden=64, attn="sdpa"):
    cfg = zaya().ZayaConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=LAYERS,
        vocab_size=50,
        moe_intermediate_size=32,
        router_hidden_size=16,
        num_experts=2,
        eos_token_id=1,
        bos_token_id=1,
        pad_token_id=0,
    )
    cfg._experts_implementation = "eager"  # grouped_mm does not run in float64
    cfg._attn_implementation = attn
    return cfg


def randomise_zaya(model):
    """ZayaQKNorm.temp initialises to 0 (k scaled to nothing): random values exercise it."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, zaya().ZayaQKNorm):
                module.temp.copy_(torch.randn_like(module.temp) * 0.5 + 1)
    return model


# ZayaForCausalLM first: its compiles are the longest, and xdist hands each worker a run of
# consecutive tests at the start (the two default ones, then skipped ones, go to one worker).


def logits_of_three(model, eager, reference, kwargs, training, dynamic=None):
    """Logits of the model under backend="ccgqa", of its eager copy and of the float64
    reference, on the same inputs."""
    compiled = torch.compile(model, backend="ccgqa", dynamic=dynamic)
    with torch.set_grad_enabled(training):
        return tuple(m(**kwargs).logits for m in (compiled, eager, reference))


def check_logits_and_grads(logits, model, eager, reference, dtype, training):
    """Compiled logits and, in training, every parameter gradient as close to float64 as
    eager's (fp32: to eager directly)."""
    logits_c, logits_e, logits_r = logits
    check_result(logits_c, logits_e, logits_r, dtype, "logits", strict=dtype == torch.float32)
    if training:
        grad = torch.randn_like(logits_r)
        logits_c.backward(grad.to(logits_c.dtype))
        logits_e.backward(grad.to(logits_e.dtype))
        logits_r.backward(grad)
        check_grads(model, eager, reference, dtype)


def zaya_lm_counts(head_dim, experts="eager"):
    """Per layer: the CCGQA block (its RoPE inside the prologue), and three RMSNorms (input,
    post-attention, the router MLP's); one more at the end. With eager experts the
    SwiGLU of the experts, silu(gate) * up, is not fused: the graph breaks around the expert
    loop leave ACT2FN's silu alone in its graph. grouped_mm (HF's default) and batched_mm
    compile the model as one graph, where each layer's experts' SwiGLU fuses (packed)."""
    counts = {"ccgqa_prologue": LAYERS, "ccgqa_block": LAYERS, "rms_norm": 3 * LAYERS + 1}
    if head_dim <= SDPA_FUSED_UP_TO:
        counts["gqa_attention"] = LAYERS
    if experts != "eager":
        counts["swiglu"] = LAYERS
    return counts


def check_zaya_lm(
    head_dim, training, mask, dtype, device, attn="sdpa", experts="eager", expected=None
):
    mz = zaya()
    cfg = zaya_config(head_dim, attn=attn)
    cfg._experts_implementation = experts
    torch.manual_seed(0)
    lm = randomise_zaya(mz.ZayaForCausalLM(cfg))
    lm.train(training)
    model, eager, reference = three_copies(lm, dtype, device)
    reference.config._experts_implementation = "eager"  # the others do not run in float64
    ids = torch.randint(2, cfg.vocab_size, (2, 9), device=device)
    kwargs = dict(input_ids=ids, use_cache=False)
    if mask:
        kwargs["attention_mask"] = torch.ones_like(ids)
    logits = logits_of_three(model, eager, reference, kwargs, training)
    check_counts(zaya_lm_counts(head_dim, experts) if expected is None else expected, training)
    if experts != "eager":
        assert len(ccgqa_compile.report().graphs) == 1, str(ccgqa_compile.report())
    check_logits_and_grads(logits, model, eager, reference, dtype, training)


LM_DEFAULT = [(16, True, True), (16, False, False)]
LM_SLOW = [(16, True, False), (16, False, True), (128, True, True), (128, False, False)]


def _lm_id(case):
    head_dim, training, mask = case
    return f"d{head_dim}-{'train' if training else 'infer'}-{'mask' if mask else 'nomask'}"


@pytest.mark.parametrize("case", LM_DEFAULT, ids=_lm_id)
def test_zaya_lm(case):
    check_zaya_lm(*case, torch.float32, "cpu")


@slow
@pytest.mark.parametrize("case", LM_SLOW, ids=_lm_id)
def test_zaya_lm_more(case):
    check_zaya_lm(*case, torch.float32, "cpu")


@slow
@pytest.mark.parametrize("case", LM_DEFAULT, ids=_lm_id)
def test_zaya_lm_grouped_mm_experts(case):
    check_zaya_lm(*case, torch.float32, "cpu", experts="grouped_mm")


@slow
def test_zaya_lm_eager_attention():
    """ZayaModel builds the mask in a graph of its own (the MoE's graph breaks): each
    layer's graph receives it as an input."""
    check_zaya_lm(16, False, False, torch.float32, "cpu", attn="eager")


@pytest.mark.cuda
@pytest.mark.parametrize("case", LM_DEFAULT + LM_SLOW, ids=_lm_id)
def test_zaya_lm_cuda_bf16(case):
    check_zaya_lm(*case, *CUDA_BF16)


@pytest.mark.cuda
@pytest.mark.parametrize("case", LM_DEFAULT, ids=_lm_id)
def test_zaya_lm_grouped_mm_experts_cuda_bf16(case):
    check_zaya_lm(*case, *CUDA_BF16, experts="grouped_mm")


# ---------------------------------------------------------------- ZayaAttention


def zaya_attention_counts(head_dim):
    if head_dim <= SDPA_FUSED_UP_TO:
        return {"gqa_attention": 1, "ccgqa_prologue": 1, "ccgqa_block": 1}
    return {"ccgqa_prologue": 1, "ccgqa_block": 1}  # SDPA kept by policy


def check_zaya_attention(
    head_dim,
    training,
    dtype,
    device,
    heads=4,
    kv_heads=2,
    hidden=64,
    seq=9,
    attn="sdpa",
    causal_mask=False,
    expected=None,
    dynamic=None,
):
    mz = zaya()
    cfg = zaya_config(head_dim, heads, kv_heads, hidden, attn)
    torch.manual_seed(0)
    module = randomise_zaya(mz.ZayaAttention(cfg, layer_idx=0))
    module.train(training)
    model, eager, reference = three_copies(module, dtype, device)
    x = torch.randn(2, seq, hidden, device=device)

    def inputs(dt):
        xi = x.to(dt, copy=True).requires_grad_(training)
        cos, sin = mz.ZayaRotaryEmbedding(cfg).to(device)(
            xi, torch.arange(seq, device=device)[None], "hybrid"
        )
        mask = None
        if causal_mask:  # what ZayaModel hands its layers: HF's causal mask for this backend
            mask = transformers.masking_utils.create_causal_mask(
                config=cfg,
                inputs_embeds=xi,
                attention_mask=None,
                cache=None,
                position_ids=torch.arange(seq, device=device)[None],
            )
            assert mask is not None
            mask = {"causal": mask}
        return xi, dict(attention_mask=mask, position_embeddings=(cos, sin))

    compiled = torch.compile(model, backend="ccgqa", dynamic=dynamic)
    outs = []
    with torch.set_grad_enabled(training):
        for m, dt in ((compiled, dtype), (eager, dtype), (reference, torch.float64)):
            xi, kwargs = inputs(dt)
            outs.append((xi, m(xi, **kwargs)[0]))
    (x_c, y_c), (x_e, y_e), (x_r, y_r) = outs
    check_counts(zaya_attention_counts(head_dim) if expected is None else expected, training)
    check_result(y_c, y_e, y_r, dtype, "attention output", strict=dtype == torch.float32)
    if training:
        grad = torch.randn_like(y_r)
        y_c.backward(grad.to(dtype))
        y_e.backward(grad.to(dtype))
        y_r.backward(grad)
        check_result(x_c.grad, x_e.grad, x_r.grad, dtype, "grad of the input")
        check_grads(model, eager, reference, dtype)


@TRAIN_INFER
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128], ids=lambda d: f"d{d}")
def test_zaya_attention(head_dim, training):
    check_zaya_attention(head_dim, training, torch.float32, "cpu")


@TRAIN_INFER
def test_zaya_attention_dynamic(training):
    """``dynamic=True`` lifts ``ZayaQKNorm.head_dim_scale`` to a run-time scalar and the
    caller's RoPE tables have a symbolic width: the whole block still fuses."""
    check_zaya_attention(32, training, torch.float32, "cpu", dynamic=True)


def test_zaya_attention_eager_with_hf_causal_mask():
    check_zaya_attention(
        16,
        False,
        torch.float32,
        "cpu",
        attn="eager",
        causal_mask=True,
        expected={"gqa_attention": 1, "ccgqa_prologue": 1, "ccgqa_block": 1},
    )


def test_zaya_attention_eager_without_mask_is_not_causal():
    """HF's eager attention with attention_mask=None attends to every key: not causal, so
    neither our attention nor the CCGQA block (a prologue feeding a causal attention) may
    fuse; the RoPE of q and k still does, and so do q's and k's norms, ZAYA's
    ``x * (sqrt(d) / x.norm().clamp_min(eps))``: an RMS clamped from below, unweighted."""
    expected = {"rope": 2, "rms_norm": 2}
    check_zaya_attention(16, False, torch.float32, "cpu", attn="eager", expected=expected)


@pytest.mark.cuda
@TRAIN_INFER
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128], ids=lambda d: f"d{d}")
def test_zaya_attention_cuda_bf16(head_dim, training):
    check_zaya_attention(head_dim, training, *CUDA_BF16, seq=64)


@pytest.mark.cuda
@TRAIN_INFER
def test_zaya1_like_attention_cuda_bf16(training):
    """ZAYA1's attention scaled down: 8 query / 2 kv heads of 128 as in ZAYA1, E 2048 -> 512."""
    check_zaya_attention(128, training, *CUDA_BF16, heads=8, kv_heads=2, hidden=512, seq=256)


# ---------------------------------------------------------------- Llama, Mistral, Qwen2

# (config class, model class, hidden size): head dims 8, 12, 16 (4 query / 2 kv heads)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", 32),
    "mistral": ("MistralConfig", "MistralForCausalLM", 48),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 64),
}

# per layer: 2 RMSNorms, the MLP's SwiGLU, RoPE of q and of k, the attention (SDPA at head
# dim <= 32, or HF's hand-written one, given a causal mask built in the same graph); and
# the final RMSNorm
DECODER_COUNTS = {
    "rms_norm": 2 * LAYERS + 1,
    "swiglu": LAYERS,
    "rope": 2 * LAYERS,
    "gqa_attention": LAYERS,
}


# on the GPU our attention has Triton kernels at these head dims only; SDPA at any other
# is kept (policy, ops.gqa_attention.KERNEL_HEAD_DIMS: SDPA is faster); hand-written
# attention is fused at every head dim
GPU_KERNEL_HEAD_DIMS = (16, 32, 64, 128)


def decoder_counts(family, attn, device):
    counts = dict(DECODER_COUNTS)
    head_dim = FAMILIES[family][2] // 4
    if attn == "sdpa" and device == "cuda" and head_dim not in GPU_KERNEL_HEAD_DIMS:
        del counts["gqa_attention"]
    return counts


def tiny_decoder(family, attn):
    config_cls, model_cls, hidden = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(
        vocab_size=97,
        hidden_size=hidden,
        intermediate_size=44,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg)


def check_decoder(family, attn, training, dtype, device, mask=False, expected=None, dynamic=None):
    lm = tiny_decoder(family, attn)
    lm.eval()  # no dropout; gradients still flow
    model, eager, reference = three_copies(lm, dtype, device)
    ids = torch.randint(0, 97, (2, 11), device=device)
    kwargs = dict(input_ids=ids)
    if mask:
        kwargs["attention_mask"] = torch.ones_like(ids)
    logits = logits_of_three(model, eager, reference, kwargs, training, dynamic)
    expected = decoder_counts(family, attn, device) if expected is None else expected
    rep = check_counts(expected, training)
    assert len(rep.graphs) == 1, f"graph breaks: {rep}"
    check_logits_and_grads(logits, model, eager, reference, dtype, training)


@TRAIN_INFER
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder(family, attn, training):
    check_decoder(family, attn, training, torch.float32, "cpu")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_dynamic(attn):
    """``dynamic=True`` lifts ``self.scaling`` (head_dim ** -0.5) to a run-time scalar on
    the written-out attention's scores: it moves onto q like any factor, and every fusion
    still fires."""
    check_decoder("llama", attn, True, torch.float32, "cpu", dynamic=True)


def test_llama_sdpa_with_padding_mask():
    """An all-ones attention_mask: the mask reaches SDPA as a runtime tensor, checked
    causal at run time."""
    check_decoder("llama", "sdpa", False, torch.float32, "cpu", mask=True)


def test_llama_eager_with_padding_mask():
    check_decoder("llama", "eager", False, torch.float32, "cpu", mask=True)


@pytest.mark.cuda
@TRAIN_INFER
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_cuda_bf16(family, attn, training):
    check_decoder(family, attn, training, *CUDA_BF16)
