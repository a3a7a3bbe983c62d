"""Health gates: a pure verdict over what the rollout's devices reported.

- update failures: failed / finished, judged once at least ``min_finished`` devices finished;
- error rate after the update (errors / requests in the updated devices' telemetry on the new version);
- p99 latency ratio: the updated cohort's p99 on the new version over the same devices' p99 before the update
  (their own baseline, so a slow device class does not trip the gate by itself), on other versions of the same model
  only (a device serves several named models; another model's latency is no baseline);
- fidelity floor: the artifact's measured fidelity from conversion.

Each gate needs evidence: a gate with too few samples says WAIT, not PASS, unless the rollout has nothing left to
learn (then the engine treats WAIT as PASS for completion only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from fleet_server.labels import is_version_of
from fleet_server.rollouts.planner import Verdict


@dataclass(frozen=True)
class Gates:
    max_failure_share: float = 0.2
    min_finished: int = 1
    max_error_rate: float | None = None
    max_p99_ratio: float | None = None
    min_requests: int = 20  # telemetry requests needed (per side) before the latency / error gates judge
    min_fidelity: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.max_failure_share <= 1 or self.min_finished < 1 or self.min_requests < 1:
            raise ValueError("max_failure_share in [0, 1], min_finished ≥ 1, min_requests ≥ 1")


@dataclass(frozen=True)
class LatencyHistogram:
    edges: tuple[float, ...]
    counts: tuple[int, ...]


def merge(histograms: Iterable[LatencyHistogram]) -> LatencyHistogram | None:
    """Sum histograms that share their edges (the agent's latency edges are fixed); others are skipped."""
    edges, total = None, None
    for h in histograms:
        if edges is None:
            edges, total = h.edges, list(h.counts)
        elif h.edges == edges and total is not None:
            total = [a + b for a, b in zip(total, h.counts, strict=True)]
    return None if edges is None or total is None else LatencyHistogram(edges, tuple(total))


def quantile(h: LatencyHistogram, q: float) -> float | None:
    """The q-quantile, linear within its bin."""
    n = sum(h.counts)
    if n == 0:
        return None
    rank, seen = q * n, 0
    for i, c in enumerate(h.counts):
        if c and seen + c >= rank:
            lo, hi = h.edges[i], h.edges[i + 1]
            return lo + (hi - lo) * max(0.0, min(1.0, (rank - seen) / c))
        seen += c
    return h.edges[-1]


class Side(StrEnum):
    BEFORE = "before"
    AFTER = "after"


def window_side(label: str | None, window_end: float, *, model: str, version_label: str, offered_at: float | None,
                finished_at: float | None) -> Side | None:
    """Which side of a device's update a telemetry window is evidence for: AFTER (the new version, from the install
    on), BEFORE (another version of the same model, up to the offer: the device's own baseline), or neither.

    Windows of the device's other models are neither: with a fast model and a slow one on each device, counting the
    other model's windows as the baseline judged the slow one's latency against the fast one's."""
    if label == version_label:
        return Side.AFTER if finished_at and window_end >= finished_at else None
    if is_version_of(label, model) and offered_at and window_end <= offered_at:
        return Side.BEFORE
    return None


@dataclass(frozen=True)
class Evidence:
    finished: int
    failed: int
    requests_after: int = 0
    errors_after: int = 0
    latency_before: LatencyHistogram | None = None
    latency_after: LatencyHistogram | None = None
    fidelity: float | None = None


@dataclass(frozen=True)
class Evaluation:
    verdict: Verdict
    reasons: tuple[str, ...]
    figures: dict

    def as_dict(self) -> dict:
        return {"verdict": self.verdict.value, "reasons": list(self.reasons), "figures": self.figures}


def evaluate(gates: Gates, ev: Evidence) -> Evaluation:
    fails: list[str] = []
    waits: list[str] = []
    figures: dict = {"finished": ev.finished, "failed": ev.failed}
    if gates.min_fidelity is not None and ev.fidelity is not None and ev.fidelity < gates.min_fidelity:
        fails.append(f"fidelity {ev.fidelity:.5f} below the floor {gates.min_fidelity}")
    if ev.finished < gates.min_finished:
        waits.append(f"{ev.finished} of {gates.min_finished} finished devices needed to judge failures")
    else:
        share = ev.failed / ev.finished
        figures["failure_share"] = round(share, 4)
        if share > gates.max_failure_share:
            fails.append(f"update failures {ev.failed}/{ev.finished} = {share:.0%} > {gates.max_failure_share:.0%}")
    if gates.max_error_rate is not None:
        if ev.requests_after < gates.min_requests:
            waits.append(f"{ev.requests_after} of {gates.min_requests} requests needed to judge the error rate")
        else:
            rate = ev.errors_after / ev.requests_after
            figures["error_rate"] = round(rate, 5)
            if rate > gates.max_error_rate:
                fails.append(f"error rate {rate:.2%} > {gates.max_error_rate:.2%}")
    if gates.max_p99_ratio is not None:
        before = _p99(ev.latency_before, gates.min_requests)
        after = _p99(ev.latency_after, gates.min_requests)
        if before is None or after is None:
            waits.append(f"latency samples (≥ {gates.min_requests} each, before and after) needed to judge p99")
        else:
            ratio = after / before if before > 0 else float("inf")
            figures.update(p99_before_ms=round(before, 3), p99_after_ms=round(after, 3), p99_ratio=round(ratio, 3))
            if ratio > gates.max_p99_ratio:
                fails.append(f"p99 latency {after:.2f} ms vs {before:.2f} ms before = {ratio:.2f}× "
                             f"> {gates.max_p99_ratio}×")
    if fails:
        return Evaluation(Verdict.FAIL, tuple(fails), figures)
    if waits:
        return Evaluation(Verdict.WAIT, tuple(waits), figures)
    return Evaluation(Verdict.PASS, ("all gates pass",), figures)


def _p99(h: LatencyHistogram | None, min_count: int) -> float | None:
    if h is None or sum(h.counts) < min_count:
        return None
    return quantile(h, 0.99)


def failure_counts(statuses: Sequence[str]) -> tuple[int, int]:
    """(finished, failed) from member statuses; a device rolled back by order is finished, not failed."""
    finished = sum(1 for s in statuses if s in ("installed", "failed", "rolled_back"))
    return finished, sum(1 for s in statuses if s == "failed")
