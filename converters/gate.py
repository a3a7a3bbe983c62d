"""The fidelity gate: a pure decision over measured figures and a profile's floor.

Every check says what it measured, on how many units, the bound, and whether mixed precision could fix it
(fidelity can be bought back by keeping nodes in float; an artifact bigger than its source or a model with nothing
quantized cannot). Counted checks (k of n units agreed) account for the evaluation's size: a floor of 0.99 means
"a true disagreement rate of 1% could have produced what we saw", tested one-sided at the floor's confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel
from scipy.stats import binom

from converters.fidelity import Agreement, OutputFidelity, OutputKind, TruthFidelity
from firmware_profiles import FidelityFloor, LatencyPolicy


class Check(BaseModel):
    name: str
    value: float | None
    bound: float | None
    passed: bool
    upper: bool = False  # the value must stay at or below the bound (sizes, latency), not above it
    fixable: bool = False  # by mixed precision
    warning: bool = False  # passed, but worth a look (e.g. a tolerated latency regression)
    samples: int | None = None  # the units that decided it
    detail: str = ""

    def line(self) -> str:
        if self.value is None:
            return f"{self.name}: {self.detail}"
        op = "≤" if self.upper else "≥"
        detail = f" — {self.detail}" if self.detail else ""
        return f"{self.name} = {self.value:.4g} (needs {op} {self.bound:.4g}){detail}"


@dataclass(frozen=True)
class Measured:
    outputs: list[OutputFidelity]
    artifact_bytes: int
    source_bytes: int
    quantized_tensors: int
    source_has_weights: bool
    latency_ratio: float | None = None  # None when latency was not measured (fidelity already failed)


@lru_cache(maxsize=4096)
def allowed_misses(total: int, floor: float, confidence: float) -> int:
    """The most misses out of ``total`` that a true miss rate of ``1 - floor`` still explains: the largest k with
    P(X ≥ k) > 1 - confidence for X ~ Binomial(total, 1 - floor)."""
    rate = 1.0 - floor
    if total <= 0 or rate <= 0.0:
        return 0
    k = int(rate * total)  # the expected count is always explained
    while k < total and binom.sf(k, total, rate) > 1.0 - confidence:  # sf(k) = P(X > k) = P(X ≥ k + 1)
        k += 1
    return k


def agreement_check(name: str, a: Agreement, floor: float, confidence: float) -> Check:
    limit = allowed_misses(a.total, floor, confidence)
    passed = a.disagreed <= limit
    detail = (f"{a.disagreed} of {a.total} {a.unit} differ from FP32; at most {limit} allowed at this count "
              f"(floor {floor:g}, one-sided binomial test, {confidence:.0%})")
    return Check(name=name, value=a.rate, bound=floor, passed=passed, fixable=True, samples=a.total, detail=detail)


def truth_checks(o: OutputFidelity, t: TruthFidelity, floor: FidelityFloor) -> list[Check]:
    name = f"{o.name}: {t.metric} against ground truth"
    detail = f"FP32 {t.fp32:.4g}, INT8 {t.candidate:.4g} on {t.samples} labelled samples"
    if t.losses is not None and t.wins is not None:
        net = t.losses - t.wins
        limit = allowed_misses(t.samples, 1.0 - floor.max_accuracy_drop, floor.confidence)
        return [Check(name=name, value=t.candidate, bound=t.fp32 - limit / max(t.samples, 1), passed=net <= limit,
                      fixable=True, samples=t.samples,
                      detail=f"{detail}; {t.losses} lost and {t.wins} gained against FP32, at most {limit} net "
                             f"losses allowed (drop ≤ {floor.max_accuracy_drop:g})")]
    bound = t.fp32 - floor.max_map_drop
    return [Check(name=name, value=t.candidate, bound=bound, passed=t.candidate >= bound - 1e-12, fixable=True,
                  samples=t.samples, detail=f"{detail}; drop ≤ {floor.max_map_drop:g}")]


def fidelity_checks(outputs: list[OutputFidelity], floor: FidelityFloor) -> list[Check]:
    checks: list[Check] = []
    c = floor.confidence
    for o in outputs:
        if o.kind is OutputKind.REGRESSION or not _decoded(o):
            checks.append(Check(name=f"{o.name}: cosine", value=o.cosine, bound=floor.min_cosine,
                                passed=o.cosine >= floor.min_cosine, fixable=True, samples=o.samples))
            checks.append(Check(name=f"{o.name}: SQNR dB", value=o.sqnr_db, bound=floor.min_sqnr_db,
                                passed=o.sqnr_db >= floor.min_sqnr_db, fixable=True, samples=o.samples))
        if o.top1 is not None:
            checks.append(agreement_check(f"{o.name}: top-1 agreement", o.top1, floor.min_top1_agreement, c))
        if o.exact is not None:
            checks.append(agreement_check(f"{o.name}: decoded-string agreement", o.exact,
                                          floor.min_sequence_agreement, c))
            checks.append(Check(name=f"{o.name}: character error rate vs FP32", value=o.cer, bound=floor.max_cer,
                                upper=True, passed=(o.cer or 0.0) <= floor.max_cer, fixable=True, samples=o.samples))
        if o.recall is not None and o.precision is not None:
            unit = o.recall.unit.removeprefix("FP32 ")
            if o.recall.total == 0:
                checks.append(Check(
                    name=f"{o.name}: {unit}", value=None, bound=None, passed=False, samples=o.samples,
                    detail=f"FP32 finds no {unit} in the {o.samples} evaluation samples, so the gate cannot judge "
                           "this output: evaluate on data where the model finds something, or declare the "
                           "output's kind (--output-kind NAME=regression)"))
            else:
                checks.append(agreement_check(f"{o.name}: {unit} recall vs FP32", o.recall,
                                              floor.min_detection_agreement, c))
                checks.append(agreement_check(f"{o.name}: {unit} precision vs FP32", o.precision,
                                              floor.min_detection_agreement, c))
        if o.truth is not None:
            checks += truth_checks(o, o.truth, floor)
    return checks


def _decoded(o: OutputFidelity) -> bool:
    """A task output whose decoder ran (its per-call shape matched what inference saw)."""
    return any(x is not None for x in (o.top1, o.exact, o.recall))


def judge(m: Measured, floor: FidelityFloor, *, max_artifact_bytes: int,
          latency_policy: LatencyPolicy | None = None, latency_caveat: str | None = None) -> list[Check]:
    """The profile's floor over measured figures. ``latency_caveat``: why the host's latency does not stand for the
    target's; a regression is then reported as a warning, never a refusal."""
    checks: list[Check] = []
    if m.source_has_weights and m.quantized_tensors == 0:
        checks.append(Check(name="weights quantized", value=None, bound=None, passed=False,
                            detail="nothing quantized: no weight became INT8 (weights inside If/Loop subgraphs "
                                   "or ops without INT8 kernels); not shipped as INT8"))
    ratio = m.artifact_bytes / m.source_bytes if m.source_bytes else 0.0
    checks.append(Check(name="size ratio", value=ratio, bound=1.0, passed=ratio < 1.0, upper=True,
                        detail="" if ratio < 1.0 else "the INT8 artifact is not smaller than its FP32 source"))
    checks.append(Check(name="artifact size MB", value=m.artifact_bytes / 1e6, bound=max_artifact_bytes / 1e6,
                        passed=m.artifact_bytes <= max_artifact_bytes, upper=True))
    checks += fidelity_checks(m.outputs, floor)
    if m.latency_ratio is not None:
        policy = latency_policy or floor.latency_regression
        slow = m.latency_ratio > floor.max_latency_ratio
        excused = slow and policy is LatencyPolicy.REFUSE and latency_caveat is not None
        checks.append(Check(
            name="latency ratio INT8/FP32", value=m.latency_ratio, bound=floor.max_latency_ratio, upper=True,
            passed=not slow or policy is LatencyPolicy.WARN or excused,
            warning=slow and (policy is LatencyPolicy.WARN or excused),
            fixable=True,  # by keeping the slowest INT8 kernels in float
            detail=("INT8 is slower than allowed on this CPU (no fast INT8 kernels?)" if slow else "")
            + (f"; the profile's policy is '{policy.value}'" if slow else "")
            + (f", not enforced: {latency_caveat}; measure on the device" if excused else "")))
    return checks


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.passed]


def fixable(checks: list[Check]) -> bool:
    """True when every failed check is one that mixed precision can address."""
    bad = failed(checks)
    return bool(bad) and all(c.fixable for c in bad)
