"""The backend as a user meets it: entry point, no leaked state, opt-in global, switches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ccgqa_compile
from ccgqa_compile import config
from ccgqa_compile.passes import ChainedGraphPass, RecognitionPass
from patterns import BY_NAME, Shape


def _rms_model():
    return BY_NAME["rms_hf_llama"].build(Shape())


def _x():
    return torch.randn(2, 5, 16)


def test_entry_point_works_in_a_fresh_interpreter_without_import():
    code = textwrap.dedent(
        """
        import sys, torch
        torch._inductor.config.fx_graph_cache = False
        def norm(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        assert "ccgqa_compile" not in sys.modules
        f = torch.compile(norm, backend="ccgqa")  # resolved through the entry point
        x, w = torch.randn(3, 8), torch.randn(8)
        torch.testing.assert_close(f(x, w), norm(x, w))
        import ccgqa_compile
        assert ccgqa_compile.report().count("rms_norm") == 1, str(ccgqa_compile.report())
        print("FUSED-OK")
        """
    )
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FUSED-OK" in out.stdout


def test_backend_leaves_inductor_config_untouched():
    before = torch._inductor.config.joint_custom_pre_pass
    torch.compile(_rms_model(), backend="ccgqa")(_x())
    assert ccgqa_compile.report().count("rms_norm") == 1
    assert torch._inductor.config.joint_custom_pre_pass is before
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    torch.compile(_rms_model())(_x())  # plain inductor: our pass must not run
    assert ccgqa_compile.report().count("rms_norm") == 0


def test_fused_compilations_turn_inductor_padding_off():
    """Our traced kernel launches bake their inputs' strides in; Inductor's padding would
    change them (stale strides: wrong gradients on the H100), so fused compiles pad nothing."""
    from ccgqa_compile.backend import _pass_patches

    patches = _pass_patches(set())
    assert patches["comprehensive_padding"] is False and patches["shape_padding"] is False
    everything_off = set(ccgqa_compile.config.FUSIONS)
    assert "comprehensive_padding" not in _pass_patches(everything_off)


def test_register_global_then_unregister():
    config = torch._inductor.config
    before = config.joint_custom_pre_pass
    padding = (config.comprehensive_padding, config.shape_padding)
    ccgqa_compile.register_global()
    try:
        assert not config.comprehensive_padding and not config.shape_padding
        torch.compile(_rms_model())(_x())
        assert ccgqa_compile.report().count("rms_norm") == 1
    finally:
        ccgqa_compile.unregister_global()
    assert torch._inductor.config.joint_custom_pre_pass is before
    assert (config.comprehensive_padding, config.shape_padding) == padding
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    torch.compile(_rms_model())(_x())
    assert ccgqa_compile.report().count("rms_norm") == 0


def test_per_model_disable_option():
    m = _rms_model()
    out = torch.compile(m, backend="ccgqa", options={"ccgqa_disable": ["rms_norm"]})(_x())
    assert out.shape == (2, 5, 16)
    assert ccgqa_compile.report().count("rms_norm") == 0


def test_env_disable(monkeypatch):
    monkeypatch.setenv("CCGQA_DISABLE", "rms_norm")
    torch.compile(_rms_model(), backend="ccgqa")(_x())
    assert ccgqa_compile.report().count("rms_norm") == 0


def test_config_disable():
    config.disabled_fusions.add("rms_norm")
    try:
        torch.compile(_rms_model(), backend="ccgqa")(_x())
        assert ccgqa_compile.report().count("rms_norm") == 0
    finally:
        config.disabled_fusions.discard("rms_norm")


def test_unknown_fusion_name_is_a_clear_error():
    with pytest.raises(Exception, match="unknown ccgqa fusion"):
        torch.compile(_rms_model(), backend="ccgqa", options={"ccgqa_disable": ["rmsnorm"]})(_x())


def test_inductor_options_pass_through():
    # an Inductor option is honoured next to ours; a bad one is Inductor's own error
    out = torch.compile(_rms_model(), backend="ccgqa", options={"max_autotune": False})(_x())
    assert out.shape == (2, 5, 16)
    assert ccgqa_compile.report().count("rms_norm") == 1


def test_uuid_is_stable_and_depends_on_enabled_fusions():
    a, b = RecognitionPass(("rms_norm", "rope")), RecognitionPass(("rms_norm", "rope"))
    assert a.uuid() == b.uuid() and a.uuid() is not None
    assert RecognitionPass(("rms_norm",)).uuid() != a.uuid()


def test_existing_user_pass_is_chained_not_clobbered():
    calls = []

    def user_pass(graph):
        calls.append(len(graph.nodes))

    with torch._inductor.config.patch(joint_custom_pre_pass=user_pass):
        torch.compile(_rms_model(), backend="ccgqa")(_x())
    assert calls, "the user's own joint pass did not run"
    assert ccgqa_compile.report().count("rms_norm") == 1
    chained = ChainedGraphPass(RecognitionPass(("rms_norm",)), user_pass)
    assert chained.uuid() is None  # an opaque user pass: bypass the FX cache, never reuse


def test_fx_graph_cache_with_passes_on_and_off(tmp_path, monkeypatch):
    """Warm cache: the same model with fusions on then off must give each its own result."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    m = _rms_model()
    x = _x()
    with torch._inductor.config.patch(fx_graph_cache=True):
        on = torch.compile(m, backend="ccgqa")(x)
        torch._dynamo.reset()
        off = torch.compile(m, backend="ccgqa", options={"ccgqa_disable": ["rms_norm"]})(x)
    torch.testing.assert_close(on, m(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off, m(x), rtol=1e-5, atol=1e-5)


def test_report_text_and_logging(caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="ccgqa_compile")
    torch.compile(BY_NAME["rms_near_per_token_weight"].build(Shape()), backend="ccgqa")(_x())
    rep = ccgqa_compile.report()
    text = str(rep)
    assert "graph 0/0 (training)" in text  # the parameters require grad
    # the weighted region is rejected (a per-token weight); its unweighted core fuses
    assert any("not a per-channel weight" in r.reason for r in rep.rejected), text
    assert "fused rms_norm" in caplog.text
    assert "rejected rms_norm" in caplog.text


def test_report_says_why_near_misses_were_left_alone():
    for name in ("rms_near_eps_outside_sqrt", "rms_near_mean_over_seq"):
        ccgqa_compile.reset_report()
        torch._dynamo.reset()
        torch.compile(BY_NAME[name].build(Shape()), backend="ccgqa")(_x())
        rep = ccgqa_compile.report()
        assert rep.count("rms_norm") == 0, str(rep)
        reasons = [r.reason for r in rep.rejected if r.fusion == "rms_norm"]
        assert reasons and all("another function" in r for r in reasons), str(rep)


def _attention_report(entry_name: str):
    """Compile one corpus entry for training; gqa_attention's count and its rejected
    lines."""
    entry = BY_NAME[entry_name]
    torch.manual_seed(0)
    inputs = entry.make_inputs(Shape(), torch.float32, "cpu")
    torch.compile(entry.build(Shape()), backend="ccgqa")(*inputs).sum().backward()
    rep = ccgqa_compile.report()
    return rep.count("gqa_attention"), [r for r in rep.rejected if r.fusion == "gqa_attention"]


@pytest.mark.parametrize(
    "entry_name, fired, reason",
    [
        ("attn_near_non_causal", 0, "another function"),  # hand-written, left as it was
        ("attn_near_peeks_ahead", 0, "another function"),
        ("attn_repeat_kv_tril", 1, None),
        ("ccgqa_sdpa_d64", 0, "head dim 64 > 32"),  # SDPA kept by policy
    ],
)
def test_report_says_why_attention_was_left_alone(monkeypatch, entry_name, fired, reason):
    monkeypatch.setenv("CCGQA_FUSE_ON_CPU", "1")
    count, lines = _attention_report(entry_name)
    assert count == fired, str(ccgqa_compile.report())
    if reason is None:
        assert not lines, str(ccgqa_compile.report())
    else:
        assert lines and all(reason in line.reason for line in lines), str(ccgqa_compile.report())


def test_cross_entropy_is_not_an_attention_candidate(monkeypatch):
    """A loss's log-softmax weights no values: nothing is reported for it."""
    monkeypatch.setenv("CCGQA_FUSE_ON_CPU", "1")
    head = torch.nn.Linear(16, 50)
    x, target = torch.randn(2, 5, 16), torch.randint(0, 50, (10,))

    def loss(x):
        return torch.nn.functional.cross_entropy(head(x).view(10, 50), target)

    torch.compile(loss, backend="ccgqa")(x).backward()
    rep = ccgqa_compile.report()
    assert any(r.kind == "training" for r in rep.graphs), str(rep)
    assert not [r for r in rep.rejected if r.fusion == "gqa_attention"], str(rep)


def test_cpu_graphs_are_left_to_inductor_by_default(monkeypatch):
    monkeypatch.setenv("CCGQA_FUSE_ON_CPU", "0")
    torch.compile(_rms_model(), backend="ccgqa")(_x())
    rep = ccgqa_compile.report()
    assert rep.count("rms_norm") == 0
    assert "CCGQA_FUSE_ON_CPU=1" in str(rep)
    assert (
        RecognitionPass(("rms_norm",), fuse_on_cpu=False).uuid()
        != RecognitionPass(("rms_norm",), fuse_on_cpu=True).uuid()
    )
