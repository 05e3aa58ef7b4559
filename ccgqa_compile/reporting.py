"""What fused where: a record per compiled graph, readable after any compiled call.

``ccgqa_compile.report()`` returns a ``FusionReport``; ``print(report())`` gives a table.
Every event also goes to the ``ccgqa_compile`` logger: INFO for fusions, DEBUG for
rejected candidates (``logging.getLogger("ccgqa_compile").setLevel(logging.DEBUG)``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("ccgqa_compile")


@dataclass
class Rejection:
    fusion: str
    idiom: str
    node: str
    reason: str


@dataclass
class GraphRecord:
    """One graph our pass ran on (a joint fwd+bwd graph, or an inference graph)."""

    compile_id: str
    kind: str  # "training" (joint forward+backward) or "inference"
    fused: Counter = field(default_factory=Counter)  # (fusion, idiom) -> count
    # in a training graph: fusions matched by a forward-only pattern, whose backward was
    # left to Inductor (the gradient is right, but not computed by the fused kernel)
    forward_only: Counter = field(default_factory=Counter)  # fusion -> count
    rejected: list[Rejection] = field(default_factory=list)
    unfused_candidates: list[Rejection] = field(default_factory=list)
    note: str = ""

    def count(self, fusion: str) -> int:
        return sum(n for (name, _idiom), n in self.fused.items() if name == fusion)


@dataclass
class FusionReport:
    graphs: list[GraphRecord] = field(default_factory=list)

    def count(self, fusion: str) -> int:
        """Total number of times ``fusion`` fired over all recorded graphs."""
        return sum(g.count(fusion) for g in self.graphs)

    def counts(self) -> dict[str, int]:
        out: Counter = Counter()
        for g in self.graphs:
            for (fusion, _idiom), n in g.fused.items():
                out[fusion] += n
        return dict(out)

    def idioms(self) -> dict[tuple[str, str], int]:
        out: Counter = Counter()
        for g in self.graphs:
            out.update(g.fused)
        return dict(out)

    def forward_only(self) -> dict[str, int]:
        """Fusions that fired in training graphs without their backward (see GraphRecord)."""
        out: Counter = Counter()
        for g in self.graphs:
            out.update(g.forward_only)
        return dict(out)

    @property
    def rejected(self) -> list[Rejection]:
        return [r for g in self.graphs for r in g.rejected]

    @property
    def unfused_candidates(self) -> list[Rejection]:
        return [r for g in self.graphs for r in g.unfused_candidates]

    def __str__(self) -> str:
        if not self.graphs:
            return "ccgqa fusion report: no graph compiled with the ccgqa passes yet"
        lines = ["ccgqa fusion report"]
        for g in self.graphs:
            lines.append(f"graph {g.compile_id} ({g.kind}):")
            if g.note:
                lines.append(f"  {g.note}")
            elif not g.fused:
                lines.append("  no fusion fired")
            for (fusion, idiom), n in sorted(g.fused.items()):
                lines.append(f"  fused    {fusion:<14} x{n:<3} idiom={idiom}")
            for fusion, n in sorted(g.forward_only.items()):
                lines.append(
                    f"  forward only {fusion:<10} x{n:<3} backward left to Inductor "
                    "(its gradient sum did not match the fused pattern)"
                )
            for r in g.rejected:
                lines.append(f"  rejected {r.fusion:<14} at {r.node}: {r.reason} (idiom={r.idiom})")
            for r in g.unfused_candidates:
                lines.append(f"  not fused {r.fusion:<13} at {r.node}: {r.reason}")
        return "\n".join(lines)


_REPORT = FusionReport()


def report() -> FusionReport:
    """The fusion report of every graph compiled since the last ``reset_report()``.

    Note: a graph loaded from Inductor's FX graph cache does not run the passes again, so it
    adds no record; set ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` to see every graph.
    """
    return _REPORT


def reset_report() -> None:
    _REPORT.graphs.clear()


def start_graph(compile_id: str, kind: str) -> GraphRecord:
    record = GraphRecord(compile_id=compile_id, kind=kind)
    _REPORT.graphs.append(record)
    return record


def current_graph() -> GraphRecord | None:
    return _REPORT.graphs[-1] if _REPORT.graphs else None


def record_fusion(fusion: str, idiom: str, joint: bool = True) -> None:
    """``joint=False``: a forward-only replacement (its backward left as it was)."""
    record = current_graph()
    if record is not None:
        record.fused[(fusion, idiom)] += 1
        if record.kind == "training" and not joint:
            record.forward_only[fusion] += 1
        log.info("ccgqa: fused %s (idiom %s) in graph %s", fusion, idiom, record.compile_id)


def record_rejection(fusion: str, idiom: str, node: str, reason: str) -> None:
    record = current_graph()
    if record is not None:
        record.rejected.append(Rejection(fusion, idiom, node, reason))
        log.debug("ccgqa: rejected %s at %s: %s (idiom %s)", fusion, node, reason, idiom)


def record_unfused(fusion: str, node: str, reason: str) -> None:
    record = current_graph()
    if record is not None:
        record.unfused_candidates.append(Rejection(fusion, "-", node, reason))
        log.debug("ccgqa: %s candidate at %s not fused: %s", fusion, node, reason)
