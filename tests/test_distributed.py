"""backend="ccgqa" under torch.distributed and activation checkpointing, on CPU (gloo, two
processes spawned from the test): DDP with buckets small enough that DDPOptimizer splits the
graph, FSDP2 ``fully_shard`` on each block and the root, ``torch.utils.checkpoint``
(non-reentrant) around each block, and FSDP2 with checkpointed blocks; and the main job
under torchrun. In each, the loss and every gradient match a single-process eager run, and
every rank's fusion report counts every block's fusions (a graph Dynamo compiled once and
ran for several blocks counts once per block), or names the fusion a DDP bucket boundary
cut and why.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import ccgqa_compile
from ccgqa_compile import reporting
from ccgqa_compile.backend import _mark_ddp_piece, _run_tracking_modules
from examples.train_ccgqa_lm import CCGQALM
from tests._compare import assert_close

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
# Width 256, 2 layers of 4 query / 2 kv heads of dim 32: 4.4 MiB of fp32 parameters.
# DDP's buckets cannot be smaller than 1 MiB under torch.compile (DDPOptimizer refuses a
# first bucket, 1 MiB, larger than the others), so the model must hold several MiB for
# bucket_cap_mb=1 to split it; the graph is the same size at any width, and so is the
# compile time.
LM = dict(vocab=256, dim=256, layers=2, heads=4, kv_heads=2, head_dim=32)
BATCH, SEQ = 2, 16
CUT = "cut by DDPOptimizer's split"
WRAPPED = "._checkpoint_wrapped_module"


class CheckpointedLM(CCGQALM):
    """The LM with each block under torch.utils.checkpoint (non-reentrant): its activations
    are recomputed in the backward."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(self.norm(x))


def _model(checkpointed: bool = False) -> CCGQALM:
    torch.manual_seed(0)
    return (CheckpointedLM if checkpointed else CCGQALM)(**LM)


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(
        0, LM["vocab"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(rank)
    )
    return tokens[:, :-1], tokens[:, 1:]


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _eager_reference(ranks: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single process, eager: each rank's loss, and the gradient of their mean (what DDP's
    all-reduce and FSDP2's reduce-scatter average)."""
    model = _model()
    losses = [_loss(model(x), y) for x, y in map(_batch, range(ranks))]
    (sum(losses) / ranks).backward()
    return [v.item() for v in losses], {n: p.grad for n, p in model.named_parameters()}


def _report_summary() -> dict:
    rep = ccgqa_compile.report()
    return {
        "counts": rep.counts(),
        "cuts": [
            (r.fusion, r.reason)
            for r in (*rep.rejected, *rep.unfused_candidates)
            if CUT in r.reason
        ],
        "pieces": [g.ddp_piece for g in rep.graphs],
        "sites": [g.sites for g in rep.graphs],
        "text": str(rep),
    }


def _worker(rank: int, mode: str, store: str, out: str) -> None:
    """One rank: compile the LM under ``mode``, run two steps on this rank's batch (the
    second on warm graphs: the per-block counts must not grow), save loss, gradients and
    report for the test."""
    torch.set_num_threads(1)
    torch._inductor.config.fx_graph_cache = False  # a cache hit skips our passes
    torch._functorch.config.enable_autograd_cache = False
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(minutes=5),
    )
    try:
        model = _model()
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            step_model = DDP(model, bucket_cap_mb=1)
        else:
            from torch.distributed.fsdp import fully_shard

            if mode == "fsdp_checkpoint":
                # checkpointing inside each FSDP unit (torchtitan's order: checkpoint, then
                # shard): FSDP2's hooks stay outside the checkpointed region
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                    checkpoint_wrapper,
                )

                for i, block in enumerate(model.blocks):
                    model.blocks[i] = checkpoint_wrapper(block)
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            step_model = model
        compiled = torch.compile(step_model, backend="ccgqa")
        x, y = _batch(rank)
        losses = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            loss = _loss(compiled(x), y)
            loss.backward()
            losses.append(loss.item())
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace(WRAPPED, "")] = grad.detach().clone()
        torch.save(
            {"losses": losses, "grads": grads, **_report_summary()}, Path(out) / f"rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def _spawn(mode: str, tmp_path: Path) -> list[dict]:
    start = time.perf_counter()
    mp.spawn(_worker, args=(mode, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    print(f"{mode}: {WORLD} ranks in {time.perf_counter() - start:.1f} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _assert_matches_eager(results: list[dict]) -> None:
    losses, grads = _eager_reference(WORLD)
    for rank, res in enumerate(results):
        for step, loss in enumerate(res["losses"]):
            assert_close(
                torch.tensor(loss),
                torch.tensor(losses[rank]),
                torch.float32,
                f"rank {rank} loss {step}",
            )
        assert res["grads"].keys() == grads.keys(), (rank, sorted(res["grads"]))
        for name, expected in grads.items():
            assert_close(res["grads"][name], expected, torch.float32, f"rank {rank} grad {name}")


def _assert_every_block_fused(res: dict, rank: int) -> None:
    expected = _model().expected_fusions()
    assert res["counts"] == expected, f"rank {rank}:\n{res['text']}"


@pytest.mark.slow
def test_ddp_with_split_graph(tmp_path):
    """DDP with 1 MiB buckets: DDPOptimizer cuts the graph in four pieces, each compiled
    alone. Every block's prologue and attention still fuse (2 whole blocks); torch 2.13's
    cuts fall in one block's MLP between silu and the multiply: that SwiGLU cannot fuse, and
    the report says so on every rank. Every other fusion fires."""
    results = _spawn("ddp", tmp_path)
    _assert_matches_eager(results)
    expected = _model().expected_fusions()
    for rank, res in enumerate(results):
        text = res["text"]
        assert max(res["pieces"]) >= 2, f"rank {rank}: DDPOptimizer did not split\n{text}"
        assert "DDPOptimizer split" in text
        assert res["cuts"], f"rank {rank}: no fusion reported cut by the split\n{text}"
        for fusion, reason in res["cuts"]:
            assert fusion == "swiglu" and "leaves this piece" in reason, (rank, fusion, reason)
        # what did not fire is exactly what the report names as cut
        cut = {f: sum(1 for c, _ in res["cuts"] if c == f) for f in expected}
        for fusion, n in expected.items():
            assert res["counts"].get(fusion, 0) + cut[fusion] == n, (rank, fusion, text)
        assert res["counts"]["ccgqa_block"] == LM["layers"], text


@pytest.mark.slow
def test_fsdp2_fully_shard_per_block(tmp_path):
    """FSDP2 per block: Dynamo compiles the block's forward once and runs that graph for
    both blocks (FSDP2's hooks break the graph between them); the report counts it once
    per block, and says so."""
    results = _spawn("fsdp", tmp_path)
    _assert_matches_eager(results)
    for rank, res in enumerate(results):
        _assert_every_block_fused(res, rank)
        assert LM["layers"] in res["sites"], (rank, res["sites"])
        assert f"run for {LM['layers']} modules" in res["text"], res["text"]


@pytest.mark.slow
def test_fsdp2_with_checkpointed_blocks(tmp_path):
    """FSDP2 over checkpoint-wrapped blocks: each block's forward is recomputed in the
    backward, inside the compiled graph; every fusion still fires in every block, on both
    ranks, and the gradients are eager's."""
    results = _spawn("fsdp_checkpoint", tmp_path)
    _assert_matches_eager(results)
    for rank, res in enumerate(results):
        _assert_every_block_fused(res, rank)


@pytest.mark.slow
def test_checkpointed_blocks_single_process():
    """torch.utils.checkpoint (non-reentrant) around each block, one process: every fusion
    fires in the checkpointed regions, and the recomputation in the backward runs the fused
    ops again (the profiler counts them), with eager's loss and gradients."""
    model = _model(checkpointed=True)
    compiled = torch.compile(model, backend="ccgqa")
    x, y = _batch(0)
    _loss(compiled(x), y).backward()  # compiles
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile() as prof:
        loss = _loss(compiled(x), y)
        loss.backward()
    expected = model.expected_fusions()
    assert ccgqa_compile.report().counts() == expected, str(ccgqa_compile.report())
    calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("ccgqa::")}
    # forward, then again in the backward's recomputation; one fused backward each
    for op, fusion in (("gqa_attention", "gqa_attention"), ("ccgqa_prologue", "ccgqa_prologue")):
        forward = sum(
            n for k, n in calls.items() if k.startswith(f"ccgqa::{op}") and "backward" not in k
        )
        backward = sum(n for k, n in calls.items() if k.startswith(f"ccgqa::{op}_backward"))
        assert (forward, backward) == (2 * expected[fusion], expected[fusion]), calls

    eager = _model()
    eager_loss = _loss(eager(x), y)
    eager_loss.backward()
    assert_close(loss.detach(), eager_loss.detach(), torch.float32, "loss")
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad {name}")


# --------------------------------------------------------------- the report, without compiling


def test_a_graph_run_for_several_modules_counts_once_per_module():
    """FSDP2's per-block graphs, or blocks compiled one by one: one compiled graph runs for
    every block of the same code. The report counts each fusion once per module it ran for,
    each module known by its first parameter (real ones only: DDPOptimizer runs each piece
    once on fake tensors), and forgets a module that is gone."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    record = reporting.start_graph("1/0", "training")
    record.fused[("ccgqa_block", "prologue+fused_attention")] += 1
    calls = []
    run = _run_tracking_modules(lambda *args: calls.append(len(args)) or "out", [record])
    blocks = [torch.nn.Linear(2, 2) for _ in range(3)]
    x = torch.randn(1, 2)
    assert record.sites == 1  # before its first run
    for _ in range(2):  # a second step adds no module
        for block in blocks[:2]:
            assert run(x, block.weight, block.bias) == "out"
    fake = FakeTensorMode().from_tensor(blocks[2].weight)
    assert isinstance(fake, torch.nn.Parameter)  # what DDPOptimizer's compile-time run passes
    run(fake)
    assert calls == [3, 3, 3, 3, 1]
    assert record.sites == 2
    rep = ccgqa_compile.report()
    assert rep.count("ccgqa_block") == 2 and rep.counts() == {"ccgqa_block": 2}
    assert rep.idioms() == {("ccgqa_block", "prologue+fused_attention"): 2}
    assert "run for 2 modules" in str(rep)
    run(x, blocks[2].weight)
    assert record.sites == 3
    gone = weakref.ref(blocks[2].weight)
    del blocks[2]
    assert gone() is None and record.sites == 2


def test_ddp_pieces_are_numbered_and_a_cut_is_named():
    earlier = reporting.start_graph("4/0", "training")
    earlier.ddp_piece = 1
    record = reporting.start_graph("4/0", "training")
    record.rejected.append(reporting.Rejection("swiglu", "swiglu", "silu", "no up tensor"))
    record.rejected.append(reporting.Rejection("rope", "rope", "cat_2", "not a rotation"))
    record.unfused_candidates.append(reporting.Rejection("ccgqa_block", "-", "softmax", "x"))
    _mark_ddp_piece([record], [earlier], leaving={"silu"}, entering={"softmax"})
    assert record.ddp_piece == 2
    silu, rope = record.rejected
    assert CUT in silu.reason and "silu leaves this piece" in silu.reason
    assert CUT not in rope.reason
    assert "reads a value of an earlier piece" in record.unfused_candidates[0].reason
    text = str(ccgqa_compile.report())
    assert "graph 4/0 piece 2 (training)" in text and "DDPOptimizer split" in text


# ------------------------------------------------------------------------ the main job, torchrun

TINY = [
    *("--dim", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--compression", "1"),
    *("--batch", "2", "--seq", "16", "--steps", "2", "--sample", "8", "--device", "cpu"),
]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--fsdp", "--ddp"])
def test_main_job_under_torchrun(flag, tmp_path):
    """``torchrun --nproc-per-node 2 examples/train_ccgqa_lm.py --fsdp`` (and ``--ddp``) on
    CPU (gloo): two steps; rank 0 prints the report and writes the log, whose fusion counts
    are the model's (every block, on FSDP2's reused graph too)."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc-per-node", str(WORLD), str(ROOT / "examples" / "train_ccgqa_lm.py")),
            *(flag, *TINY, "--out", str(tmp_path)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"torchrun {flag}: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["distributed"] == {"mode": flag[2:], "world_size": WORLD, "backend": "gloo"}
    assert log["fusions"] == log["fusions_expected"], log["fusions"]
    losses = log["providers"]["ccgqa"]["losses"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert proc.stdout.count("ccgqa fusion report") == 1  # rank 0 alone prints
    assert "sample from the trained model" in proc.stdout


BAD = [
    (["--ddp"], {}, "--ddp runs one process per device under torchrun"),
    (["--fsdp"], {}, "torchrun --nproc-per-node N examples/train_ccgqa_lm.py --fsdp"),
    (["--ddp", "--fsdp"], {}, "not allowed with argument"),
    (["--fsdp", "--compare"], {"RANK": "0", "WORLD_SIZE": "1"}, "--compare runs in one process"),
]


@pytest.mark.parametrize("argv, env, message", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_main_job_refuses_bad_parallel_arguments(argv, env, message, monkeypatch, capsys, tmp_path):
    from examples.train_ccgqa_lm import main

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()
