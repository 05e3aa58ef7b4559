"""examples/generate_ccgqa.py: the decode path over static caches (K/V caches, the conv
state, the value-shift state) computes the CCGQA LM's own function, position by position,
in float64; greedy generation with prefill and decode compiled by backend="ccgqa" gives
eager's tokens token by token and eager's caches after every call; the prefill graph fuses
the whole CCGQA block and the decode graph the attention over the cache, compiled once for
every step."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from examples.generate_ccgqa import (
    CCGQADecoder,
    decode_path_error,
    infer_sizes,
    load_model,
    main,
    parse_args,
)
from examples.train_ccgqa_lm import CCGQALM
from patterns.ccgqa import CCGQAttention

from ._compare import rel_err

LAYERS, NEW = 2, 6
PROMPT = "Shall I compare"
# two layers of width 32, 2 query heads sharing 1 kv head of dim 16: both graphs compile
# in about half a minute on 2 cores
TINY = [
    *("--dim", "32", "--layers", str(LAYERS), "--heads", "2", "--kv-heads", "1"),
    *("--compression", "1", "--new-tokens", str(NEW), "--prompt", PROMPT, "--device", "cpu"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These ops are tiny: on a busy machine more threads only spin (as in the example)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_lm(attention="handwritten", seed=0, **attn_options) -> CCGQALM:
    """A float64 LM with random temperatures (they start at 0); ``attn_options`` swap
    every block's attention for another CCGQA spelling."""
    torch.manual_seed(seed)
    lm = CCGQALM(256, 32, 2, 4, 2, 8, attention)
    if attn_options:
        for block in lm.blocks:
            block.attn = CCGQAttention(32, 4, 2, 8, attention=attention, **attn_options)
    for block in lm.blocks:
        if block.attn.temp is not None:
            torch.nn.init.uniform_(block.attn.temp, -0.5, 0.5)
    return lm.double().eval()


def _tokens(batch, length, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------ the decode path, eager float64


@pytest.mark.parametrize("prompt_len", [1, 2, 5])
@pytest.mark.parametrize("attention", ["handwritten", "sdpa"])
def test_decode_path_reproduces_the_full_forward(attention, prompt_len):
    """Prefill over the prompt, then one decode per further token: every position's logits
    are the model's forward over the whole sequence (two sequences in a batch)."""
    lm = _tiny_lm(attention)
    assert decode_path_error(lm, _tokens(2, 11), prompt_len) < 1e-12


VARIANTS = {
    "partial_rope_raw_temperature_kernels_3_2": dict(
        rotary_fraction=0.5, temperature="raw", conv_kernels=(3, 2)
    ),
    "functional_convs_norm_div_no_shift_no_mean": dict(
        conv_style="functional", l2norm="norm_div", value_shift=False, qk_mean=False
    ),
    "no_temperature_kernels_2_3": dict(temperature="none", conv_kernels=(2, 3)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_path_covers_other_ccgqa_spellings(name):
    """The conv state spans (k1-1)+(k2-1) columns for any kernels; no value shift, no
    qk-mean, partial RoPE and the other temperatures carry through."""
    lm = _tiny_lm(**VARIANTS[name])
    assert decode_path_error(lm, _tokens(2, 10, seed=2), 3) < 1e-12


def test_every_piece_of_the_state_is_needed():
    """The check has teeth: a decode step after one piece of the state is lost (zeroed)
    no longer gives the model's logits (SDPA: its float64 all through)."""
    lm = _tiny_lm("sdpa")
    tokens = _tokens(1, 8, seed=3)
    with torch.no_grad():
        want = lm(tokens)[:, -1]
        for name in ("k_cache", "v_cache", "conv_state", "v_prev"):
            decoder = CCGQADecoder(lm, 1, 8)
            decoder.prefill(tokens[:, :7], torch.arange(7))
            intact = decoder.decode(tokens[:, 7:], torch.tensor([7]))[:, -1]
            assert rel_err(intact, want) < 1e-12
            decoder.prefill(tokens[:, :7], torch.arange(7))
            getattr(decoder.layers[1], name).zero_()
            lost = decoder.decode(tokens[:, 7:], torch.tensor([7]))[:, -1]
            assert rel_err(lost, want) > 1e-4, name


def test_a_prompt_shorter_than_conv2s_reach_is_refused():
    """Pre-conv columns cannot stand for conv1's zero-padded outputs before the start."""
    lm = _tiny_lm(conv_kernels=(2, 3))
    decoder = CCGQADecoder(lm, 1, 6)
    with pytest.raises(ValueError, match="shorter than conv2"):
        decoder.prefill(_tokens(1, 1), torch.arange(1))


def test_checkpoint_sizes_are_read_off_the_weights(tmp_path):
    lm = CCGQALM(256, 48, 3, 6, 2, 4)
    path = tmp_path / "model.pt"
    torch.save({"model": lm.state_dict()}, path)
    sizes = infer_sizes(lm.state_dict())
    assert sizes == dict(vocab=256, dim=48, layers=3, heads=6, kv_heads=2, head_dim=4)
    loaded, source = load_model(parse_args(["--checkpoint", str(path)]))
    assert str(path) in source
    for (name, a), (_, b) in zip(lm.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------- the example end to end, compiled on CPU


@pytest.fixture(scope="module")
def generated():
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = main(TINY, keep_states=True)
    return result, stdout.getvalue()


def test_greedy_tokens_equal_eager_token_by_token(generated):
    result, stdout = generated
    fused, eager = result["tokens"]["ccgqa"], result["tokens"]["eager"]
    assert fused.shape == (1, NEW)
    assert torch.equal(fused, eager), (fused, eager)
    assert result["tokens_equal"]
    assert f"greedy tokens equal eager's: all {NEW}, token by token" in stdout
    # not a lucky tie: every greedy choice won by a clear margin
    assert min(result["runs"]["eager"]["margins"]) > 1e-4
    assert result["decode_path_error"] < 1e-12


def test_prefill_fuses_whole_blocks_and_decode_the_cache_attention(generated):
    result, stdout = generated
    n = LAYERS
    assert result["fusions"]["prefill"] == {
        "ccgqa_block": n,
        "ccgqa_prologue": n,
        "gqa_attention": n,
        "rms_norm": 2 * n + 1,
        "swiglu": n,
        "value_shift": n,
    }
    # the one-token prologue (convs over the conv state, qk-mean, norm, temperature, RoPE)
    # feeding the attention over the cache: the whole decode step
    assert result["fusions"]["decode"] == {
        "ccgqa_block": n,
        "ccgqa_prologue": n,
        "gqa_decode_attention": n,
        "rms_norm": 2 * n + 1,
        "swiglu": n,
    }
    phases = result["runs"]["ccgqa"]["phases"]
    # one graph each: every decode step (position a tensor) runs the first compiled graph
    assert [len(phases["prefill"]), len(phases["decode"])] == [1, 1]
    (decode,) = phases["decode"]
    assert decode.kind == "inference"
    assert decode.fused[("gqa_decode_attention", "sdpa_mask")] == n
    assert decode.fused[("ccgqa_block", "decode_step")] == n
    assert "ccgqa fusion report" in stdout and "decode graph(s)" in stdout


def test_caches_equal_eager_after_every_call(generated):
    """K/V caches, conv state and value-shift state of the compiled run are eager's after
    the prefill and after each decode step; the static caches fill one position a step."""
    result, _ = generated
    fused, eager = result["runs"]["ccgqa"]["states"], result["runs"]["eager"]["states"]
    assert len(fused) == len(eager) == NEW  # the prefill, then NEW - 1 decode steps
    p = len(PROMPT.encode())
    for step, (layers_f, layers_e) in enumerate(zip(fused, eager)):
        for layer, (f, e) in enumerate(zip(layers_f, layers_e)):
            for name in ("k_cache", "v_cache", "conv_state", "v_prev"):
                err = rel_err(f[name], e[name])
                assert err < 2e-5, (step, layer, name, err)
            filled = p + step  # positions 0 .. p + step - 1 written so far
            written = f["k_cache"].abs().sum(dim=(0, 1, 3)) > 0
            assert written[:filled].all() and not written[filled:].any(), (step, layer)


def test_tokens_per_s_printed(generated):
    result, stdout = generated
    assert result["tokens_per_s"]["ccgqa"] > 0
    header = next(line for line in stdout.splitlines() if line.startswith("provider "))
    assert header.split()[-1] == "tokens/s"
    row = stdout.splitlines()[stdout.splitlines().index(header) + 1].split()
    assert row[0] == "ccgqa" and float(row[-1]) > 0, row


def test_bad_arguments_are_refused_with_a_message():
    for argv in (["--new-tokens", "0"], ["--prompt", ""], ["--device", "tpu"]):
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
            parse_args(argv)
