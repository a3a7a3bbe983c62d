"""The fidelity gate: a pure decision over measured figures and a profile's floor.

Every check says what it measured, the bound, and whether mixed precision could fix it (fidelity can be bought back
by keeping nodes in float; an artifact bigger than its source or a model with nothing quantized cannot).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from converters.fidelity import OutputFidelity, OutputKind
from firmware_profiles import FidelityFloor, LatencyPolicy


class Check(BaseModel):
    name: str
    value: float | None
    bound: float | None
    passed: bool
    upper: bool = False  # the value must stay at or below the bound (sizes, latency), not above it
    fixable: bool = False  # by mixed precision
    warning: bool = False  # passed, but worth a look (e.g. a tolerated latency regression)
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


def fidelity_checks(outputs: list[OutputFidelity], floor: FidelityFloor) -> list[Check]:
    checks: list[Check] = []

    def bound(name: str, value: float | None, limit: float, detail: str = "") -> None:
        if value is not None:
            checks.append(Check(name=name, value=value, bound=limit, passed=value >= limit, fixable=True,
                                detail=detail))

    for o in outputs:
        bound(f"{o.name}: cosine", o.cosine, floor.min_cosine)
        bound(f"{o.name}: SQNR dB", o.sqnr_db, floor.min_sqnr_db)
        if o.kind is OutputKind.CLASSIFICATION:
            bound(f"{o.name}: top-1 agreement", o.top1_agreement, floor.min_top1_agreement)
        elif o.kind is OutputKind.SEQUENCE:
            bound(f"{o.name}: per-step agreement", o.top1_agreement, floor.min_top1_agreement)
            bound(f"{o.name}: sequence agreement", o.sequence_agreement, floor.min_sequence_agreement)
        for r in o.ranges or []:
            label = f"{o.name}[axis {r.axis}: {r.start}:{r.stop}]"
            bound(f"{label} cosine", r.cosine, floor.min_range_cosine,
                  f"values up to {r.magnitude:.3g} share this output with larger ones")
            bound(f"{label} top-class agreement", r.top1_agreement, floor.min_range_top1_agreement)
            bound(f"{label} box IoU", r.box_iou, floor.min_box_iou)
    return checks


def judge(m: Measured, floor: FidelityFloor, *, max_artifact_bytes: int,
          latency_policy: LatencyPolicy | None = None) -> list[Check]:
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
        checks.append(Check(
            name="latency ratio INT8/FP32", value=m.latency_ratio, bound=floor.max_latency_ratio, upper=True,
            passed=not slow or policy is LatencyPolicy.WARN, warning=slow and policy is LatencyPolicy.WARN,
            fixable=True,  # by keeping the slowest INT8 kernels in float
            detail=("INT8 is slower than allowed on this CPU (no fast INT8 kernels?)" if slow else "")
            + (f"; the profile's policy is '{policy.value}'" if slow else "")))
    return checks


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.passed]


def fixable(checks: list[Check]) -> bool:
    """True when every failed check is one that mixed precision can address."""
    bad = failed(checks)
    return bool(bad) and all(c.fixable for c in bad)
