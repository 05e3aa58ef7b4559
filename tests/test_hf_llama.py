"""A tiny randomly initialised Hugging Face LlamaForCausalLM (no download) compiled with
backend="ccgqa": every RMSNorm, MLP and RoPE instance fused; logits and gradients match."""

from __future__ import annotations

import copy

import pytest
import torch

import ccgqa_compile

from ._compare import assert_close

transformers = pytest.importorskip("transformers")

LAYERS = 2


def tiny_llama(dtype, device="cpu"):
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.eval()  # no dropout; gradients still flow
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_llama_every_instance_fused(training, dtype):
    check_tiny_llama(training, dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_tiny_llama_on_cuda_bf16(training):
    check_tiny_llama(training, torch.bfloat16, "cuda")


def check_tiny_llama(training, dtype, device):
    model = tiny_llama(dtype, device)
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 97, (2, 11), device=device)
    compiled = torch.compile(model, backend="ccgqa")
    with torch.set_grad_enabled(training):
        logits_c = compiled(input_ids=ids).logits
        logits_e = eager(input_ids=ids).logits
    counts = ccgqa_compile.report().counts()
    expected = {"rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS, "rope": 2 * LAYERS}
    assert counts == expected, str(ccgqa_compile.report())
    assert_close(logits_c, logits_e, dtype, "logits")
    if training:
        grad = torch.randn_like(logits_e)
        logits_c.backward(grad)
        logits_e.backward(grad)
        for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters()):
            assert_close(p_c.grad, p_e.grad, dtype, f"grad of {name}")
