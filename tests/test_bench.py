"""The benchmark command runs on CPU (small sizes) and writes JSON and charts."""

from __future__ import annotations

import json

import pytest

from ccgqa_compile.bench import main, parse_args


def test_bench_runs_on_cpu_and_writes_results(tmp_path):
    rows = main(
        ["--ops", "rmsnorm", "--quick", "--device", "cpu", "--plot", "--save", str(tmp_path)]
    )
    providers = {r["provider"] for r in rows}
    assert {"eager", "inductor", "ccgqa"} <= providers
    ccgqa = next(r for r in rows if r["provider"] == "ccgqa")
    assert ccgqa["fused_fwd+bwd"] == {"rms_norm": 1}
    for r in rows:
        assert r["fwd_ms"] > 0 and r["total_ms"] > 0
        assert r["total_rel_err_vs_fp64"] < 1e-4
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert (tmp_path / "bench_rmsnorm.png").stat().st_size > 1000


def test_bench_times_only_the_providers_asked_for(tmp_path):
    argv = ["--ops", "rmsnorm", "--quick", "--device", "cpu", "--save", str(tmp_path)]
    rows = main(argv + ["--providers", "inductor,ccgqa"])
    assert sorted(r["provider"] for r in rows) == ["ccgqa", "inductor"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--ops", "layernorm"],
        ["--device", "tpu"],
        ["--seq-lens", "a,b"],
        ["--block-configs", "2048:16:4"],
        ["--block-configs", "2048:16:5:4"],
        ["--block-configs", "x:1:1:1"],
    ],
)
def test_bench_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_ccgqa_block_bench_on_cpu(tmp_path):
    """The whole-block benchmark: both idioms under every provider plus the uncompressed
    SDPA baseline, the prologue and attention fused under backend="ccgqa", errors vs
    float64 small."""
    rows = main(
        ["--ops", "ccgqa-block", "--quick", "--device", "cpu", "--seq-lens", "32"]
        + ["--plot", "--save", str(tmp_path)]
    )
    idioms = {(r["idiom"], r["provider"]) for r in rows}
    for idiom in ("handwritten", "sdpa"):
        assert {(idiom, p) for p in ("eager", "inductor", "ccgqa")} <= idioms
    assert {("uncompressed", "eager"), ("uncompressed", "inductor")} <= idioms
    for r in rows:
        assert not r.get("oom") and r["total_rel_err_vs_fp64"] < 1e-4, r
        if r["provider"] == "ccgqa":
            assert r["fused_fwd+bwd"].get("gqa_attention") == 1, r
            assert r["fused_fwd+bwd"].get("ccgqa_prologue") == 1, r
    assert list(tmp_path.glob("bench_ccgqa_block_*.png"))
