"""The benchmark command: runs on CPU (small sizes), writes JSON, charts and results rows;
its subcommands parse; the docs' tables are what the committed results files give."""

from __future__ import annotations

import csv
import json

import pytest

from ccgqa_compile.bench import main, parse_args, results, tables


def test_bench_runs_on_cpu_and_writes_results(tmp_path):
    rows = main(
        ["--ops", "rmsnorm", "--quick", "--device", "cpu", "--plot", "--save", str(tmp_path)]
        + ["--results", str(tmp_path / "results")]
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
    # the run's rows, appended to the device's results file
    with open(tmp_path / "results" / "cpu.csv", newline="") as fh:
        recorded = list(csv.DictReader(fh))
    assert tuple(recorded[0]) == results.COLUMNS
    assert [r["provider"] for r in recorded] == [r["provider"] for r in rows]
    for row in recorded:
        assert row["op"] == "rmsnorm" and row["device"] == "cpu" and row["dtype"] == "float32"
        assert float(row["fwd_bwd_ms"]) > 0 and row["first_call_s"]
        assert row["source"].startswith("python -m ccgqa_compile.bench")
    ours = next(r for r in recorded if r["provider"] == "ccgqa")
    assert ours["baseline"] in ("eager", "inductor") and float(ours["ratio"]) > 0


def test_bench_times_only_the_providers_asked_for(tmp_path):
    argv = ["--ops", "rmsnorm", "--quick", "--device", "cpu", "--save", str(tmp_path)]
    rows = main(argv + ["--providers", "inductor,ccgqa"])
    assert sorted(r["provider"] for r in rows) == ["ccgqa", "inductor"]
    assert not list(tmp_path.glob("*.csv"))  # a CPU run records nothing unless asked to


@pytest.mark.parametrize(
    "argv",
    [
        ["--ops", "layernorm"],
        ["--device", "tpu"],
        ["--seq-lens", "a,b"],
        ["--block-configs", "2048:16:4"],
        ["--block-configs", "2048:16:5:4"],
        ["--block-configs", "x:1:1:1"],
        ["nonsense"],
        ["core", "--head-dims", "x"],
    ],
)
def test_bench_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_subcommands_parse():
    assert parse_args([]).command is None
    assert parse_args(["core", "--head-dims", "16", "32"]).head_dims == [16, 32]
    assert parse_args(["prologue", "--check-only"]).check_only
    assert parse_args(["profile", "--ops", "rope"]).ops == "rope"
    assert parse_args(["tables", "--check"]).check
    assert parse_args(["record", "a.csv", "--commit", "abc"]).files == ["a.csv"]


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


# ---- the results files and the tables made from them (no benchmark runs) ----
ROOT = results.checkout_root()


def test_docs_and_readme_tables_are_what_the_results_files_give():
    """docs/benchmarks/README.md and README.md's "Measured" table are generated from the
    committed results files: edit a figure by hand, or record a run without regenerating,
    and this fails (fix: python -m ccgqa_compile.bench tables)."""
    by_device = results.read_dir(ROOT / "docs/benchmarks/results")
    assert {"h100", "h200"} <= set(by_device)
    docs = (ROOT / "docs/benchmarks/README.md").read_text()
    assert docs == tables.docs(by_device)
    readme = (ROOT / "README.md").read_text()
    assert readme == tables.splice(readme, tables.measured(by_device))
    for device, rows in by_device.items():  # every chart the docs name is committed
        for name in tables.charts(device, rows):
            assert f"(charts/{name})" in docs and (ROOT / "docs/benchmarks/charts" / name).is_file()


def test_results_files_are_well_formed():
    for path in sorted((ROOT / "docs/benchmarks/results").glob("*.csv")):
        rows = results.read(path)
        assert rows, path
        for row in rows:
            assert row["date"] and row["commit"] and row["device"] and row["source"], row
            assert results.device_slug(row["device"]) == path.stem, row
            assert any(row[k] for k in results.TIME_KEYS) or "OOM" in row["note"], row
            if row["ratio"]:  # a ratio's baseline ran in the same process
                base = results.find(rows, row["op"], row["case"], row["baseline"], run=row)
                assert base is not None, row


def test_latest_rows_and_ratios_pair_one_run():
    common = {"commit": "abc", "device": "NVIDIA H200", "dtype": "bfloat16", "op": "x", "note": ""}
    old = [
        {**common, "date": "2026-01-01", "case": "c", "provider": "inductor", "fwd_bwd_ms": "4"},
        {**common, "date": "2026-01-01", "case": "c", "provider": "ccgqa", "fwd_bwd_ms": "2"},
    ]
    new = [{**common, "date": "2026-01-02", "case": "c", "provider": "inductor", "fwd_bwd_ms": "3"}]
    rows = old + new
    assert [r["fwd_bwd_ms"] for r in results.latest(rows)] == ["3", "2"]
    # the table pairs ccgqa with the Inductor row of its own run, not the newer one
    shown = tables.current(rows, ("x",))
    assert [r["fwd_bwd_ms"] for r in shown] == ["4", "2"]
    results.set_ratio(old[1], old[0])
    assert (old[1]["baseline"], old[1]["ratio"]) == ("inductor", 2.0)
    assert results.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert results.device_slug("cpu") == "cpu"


def test_record_appends_rows_measured_elsewhere_once(tmp_path):
    row = {c: "" for c in results.COLUMNS}
    row.update(date="2026-01-01 00:00:00", commit="unknown", device="NVIDIA H200", op="x",
               case="c", provider="ccgqa", fwd_ms="1", source="test")  # fmt: skip
    measured = results.append(tmp_path / "out" / "h200.csv", [row])
    into = tmp_path / "results"
    for _ in range(2):
        main(["record", str(measured), "--into", str(into), "--commit", "abc1234"])
    recorded = results.read(into / "h200.csv")
    assert len(recorded) == 1 and recorded[0]["commit"] == "abc1234"


def test_rates_show_their_fraction_of_the_device_peak():
    assert results.with_peak_fraction("395.0 TFLOP/s", "NVIDIA H200") == (
        "395.0 TFLOP/s (50% of peak)"
    )
    assert results.with_peak_fraction("2150 GB/s", "NVIDIA H200") == "2150 GB/s (50% of peak)"
    # a device without measured ceilings, and rates that are not one number, stay as given
    assert results.with_peak_fraction("395.0 TFLOP/s", "cpu") == "395.0 TFLOP/s"
    assert results.with_peak_fraction("", "NVIDIA H200") == ""
