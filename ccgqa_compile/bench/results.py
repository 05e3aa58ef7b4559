"""The results files: one CSV per device, one row per measurement (a case under a provider
in one run), appended by every benchmark command and read by ``tables``.

Columns (``COLUMNS``): ``date`` (the run's start, UTC when the bench wrote it), ``commit``
(the code measured; ``+dirty`` when ccgqa_compile/ differed from it), ``device``, ``dtype``,
``op`` (which benchmark: an ``--ops`` name or a subcommand's), ``case``, ``provider``,
``fwd_ms``, ``bwd_ms`` (only where the backward is timed alone), ``fwd_bwd_ms``, ``rate``
(GB/s or TFLOP/s of fwd+bwd, else of the one direction timed), ``peak_mib`` (peak memory of
one step above its inputs), ``baseline`` (the provider of the same run and case the ratio
compares against), ``ratio`` (baseline time / this time: fwd+bwd, else bwd, else fwd),
``first_call_s`` (the first fwd+bwd call, compilation included), ``note`` (a caveat shown in
the tables) and ``source`` (the command or file the row came from).

In a checkout the files are ``docs/benchmarks/results/<device>.csv`` (``h200.csv``...).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

COLUMNS = (
    "date", "commit", "device", "dtype", "op", "case", "provider", "fwd_ms", "bwd_ms",
    "fwd_bwd_ms", "rate", "peak_mib", "baseline", "ratio", "first_call_s", "note", "source",
)  # fmt: skip
TIME_KEYS = ("fwd_bwd_ms", "bwd_ms", "fwd_ms")  # what a ratio compares, first found in both
HELP = "append results CSVs measured elsewhere (a device machine's $OUT) to this checkout's"


# Measured ceilings per device (dense bf16 matmul TFLOP/s, HBM copy GB/s): every rate is
# shown beside its fraction of them, so a time reads against what the chip can do.
DEVICE_PEAKS = {"h200": {"TFLOP/s": 790.0, "GB/s": 4300.0}}


def with_peak_fraction(rate: str, device: str) -> str:
    """``"340.9 TFLOP/s"`` -> ``"340.9 TFLOP/s (43% of peak)"`` on a device whose ceiling
    is known (``DEVICE_PEAKS``); any other rate as it is."""
    match = re.fullmatch(r"([0-9.]+) (TFLOP/s|GB/s)", rate.strip())
    peak = DEVICE_PEAKS.get(device_slug(device), {}).get(match.group(2)) if match else None
    if peak is None:
        return rate
    return f"{rate} ({float(match.group(1)) / peak:.0%} of peak)"


def checkout_root() -> Path | None:
    """The repository this package runs from, if it runs from a checkout (not a wheel)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "docs" / "benchmarks").is_dir():
        return root
    return None


def default_dir() -> Path | None:
    root = checkout_root()
    return root / "docs" / "benchmarks" / "results" if root else None


def device_slug(device: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``: the file name of a device's results."""
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device)
    if model:
        return model.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def target_path(target: str | Path, device: str) -> Path:
    """``target``: a ``.csv`` file, or a directory that holds ``<device>.csv``."""
    target = Path(target)
    return target if target.suffix == ".csv" else target / f"{device_slug(device)}.csv"


def current_commit() -> str:
    """``$CCGQA_COMMIT`` (set it where the tree has no .git, e.g. on a device machine), else
    the checkout's HEAD, ``+dirty`` when ccgqa_compile/ differs from it; else ``unknown``."""
    if os.environ.get("CCGQA_COMMIT"):
        return os.environ["CCGQA_COMMIT"]
    root = checkout_root()
    if root is None or not (root / ".git").exists():
        return "unknown"
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", "ccgqa_compile"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def number(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None or value == "":
        return None
    return float(value)


def set_ratio(row: dict, base: dict) -> None:
    """``row``'s ratio against ``base`` (same run and case): base time / row time."""
    for key in TIME_KEYS:
        mine, theirs = number(row, key), number(base, key)
        if mine and theirs:
            row["baseline"], row["ratio"] = base["provider"], theirs / mine
            return


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def rate(gbs: float | None = None, tflops: float | None = None) -> str:
    if gbs is not None:
        return f"{gbs:.0f} GB/s"
    if tflops is not None:
        return f"{tflops:.1f} TFLOP/s"
    return ""


def from_ops_rows(rows: list[dict], **common) -> list[dict]:
    """``python -m ccgqa_compile.bench`` rows as results rows (``common``: date, commit,
    device, dtype, source). The baseline is the faster of eager and Inductor in the same
    case, as the printed table has it."""
    out = []
    for r in rows:
        kind = "total" if "total_ms" in r else "fwd"
        first = r.get("total_first_call_s", r.get("fwd_first_call_s"))
        out.append({
            **common, "op": r["op"], "case": r["case"], "provider": r["provider"],
            "fwd_ms": r.get("fwd_ms"), "fwd_bwd_ms": r.get("total_ms"),
            "rate": rate(r.get(f"{kind}_gbs"), r.get(f"{kind}_tflops")),
            "peak_mib": round(r[f"{kind}_peak_mib"]) if f"{kind}_peak_mib" in r else None,
            "first_call_s": f"{first:.1f}" if first is not None else None,
            "note": "OOM" if r.get("oom") else common.get("note"),
        })  # fmt: skip
    for row in out:
        key = next((k for k in TIME_KEYS if number(row, k)), None)
        peers = [
            p for p in out
            if p["case"] == row["case"] and p["provider"] in ("eager", "inductor") and number(p, key or "")
        ]  # fmt: skip
        if key and peers:
            best = min(peers, key=lambda p: number(p, key))
            if best is not row:
                set_ratio(row, best)
    return out


def read(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise SystemExit(f"{path}: columns {reader.fieldnames}, expected {list(COLUMNS)}")
        return list(reader)


def read_dir(directory: str | Path) -> dict[str, list[dict]]:
    """Every ``<device>.csv`` under ``directory``, newest device first."""
    files = {p.stem: read(p) for p in sorted(Path(directory).glob("*.csv"))}
    return dict(sorted(files.items(), key=lambda kv: max((r["date"] for r in kv[1]), default=""),
                       reverse=True))  # fmt: skip


def append(path: str | Path, rows: Iterable[dict]) -> Path:
    """Append ``rows`` to the CSV at ``path`` (created with its header if absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        read(path)  # the header must match
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in COLUMNS})
    return path


def record(target: str | Path | None, device: str, rows: list[dict]) -> Path | None:
    """Append a run's rows to ``target`` (see ``target_path``); None: say it was not kept."""
    if not rows:
        return None
    if target is None:
        print("results not recorded: pass --results DIR|FILE.csv to keep them")
        return None
    path = append(target_path(target, device), rows)
    print(f"appended {len(rows)} rows to {path}")
    return path


def add_results_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--results",
        default=None,
        help="append the measured rows to this CSV, or to <device>.csv in this directory "
        "('-': nowhere). Default: docs/benchmarks/results/ when run on a GPU from a checkout, "
        "else nowhere",
    )


def results_target(args, device: str, quick: bool = False) -> Path | None:
    """Where a run's rows go: ``--results``, else the checkout's directory for full GPU runs."""
    if args.results == "-":
        return None
    if args.results:
        return Path(args.results)
    return default_dir() if device == "cuda" and not quick else None


def latest(rows: list[dict]) -> list[dict]:
    """The newest row of each (op, case, provider), in the order each first appears."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["op"], row["case"], row["provider"])
        if key not in best or row["date"] >= best[key]["date"]:
            best[key] = row
    order = list(dict.fromkeys((r["op"], r["case"], r["provider"]) for r in rows))
    return [best[k] for k in order]


def same_run(a: dict, b: dict) -> bool:
    return (a["date"], a["commit"], a["op"]) == (b["date"], b["commit"], b["op"])


def find(rows: list[dict], op: str, case: str, provider: str, run: dict | None = None):
    """The newest row of (op, case, provider), from ``run``'s run when given."""
    found = [
        r for r in rows
        if (r["op"], r["case"], r["provider"]) == (op, case, provider)
        and (run is None or same_run(r, run))
    ]  # fmt: skip
    return max(found, key=lambda r: r["date"]) if found else None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("files", nargs="+", help="results CSVs written by a run elsewhere")
    ap.add_argument("--into", default=None, help="results directory (default: the checkout's)")
    ap.add_argument(
        "--commit", default=None, help="the commit measured, for rows that say 'unknown'"
    )


def run(args) -> None:
    """``record``: append rows measured elsewhere (e.g. a device machine's $OUT) to the
    results files of this checkout, skipping rows already there."""
    into = Path(args.into) if args.into else default_dir()
    if into is None:
        raise SystemExit("record: not in a checkout; pass --into DIR")
    for name in args.files:
        rows = read(name)
        for row in rows:
            if args.commit and row["commit"] in ("", "unknown"):
                row["commit"] = args.commit
        path = into / Path(name).name
        have = {tuple(r.values()) for r in read(path)} if path.is_file() else set()
        new = [r for r in rows if tuple(r[c] for c in COLUMNS) not in have]
        append(path, new)
        print(f"{name}: {len(new)} new rows -> {path}")
