"""What every target pass shares: the pipeline's work it reads, the attempt it measures, the result it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from converters import onnx_int8, runtime
from converters.calibration import DataSet
from converters.fidelity import OutputFidelity, output_fidelity
from converters.gate import Check, Measured, judge
from converters.report import CoremlInfo, MixedPrecision, QuantizationInfo, SearchInfo, TfliteInfo
from converters.source import SourceModel
from converters.tasks import OutputTask
from converters.truth import Truth
from firmware_profiles import ArtifactTarget, Profile

if TYPE_CHECKING:  # the pipeline imports the passes; the passes only need its options' type
    import onnxruntime as ort

    from converters.pipeline import ConvertOptions


class SharedWork(Protocol):
    """The work all targets read and none repeats, computed once per source by the pipeline's ``Converter``."""

    source: SourceModel
    calibration: DataSet
    evaluation: DataSet
    workdir: Path
    options: ConvertOptions
    tasks: dict[str, OutputTask]  # what each output is for, inferred from what it returned (or declared)
    truth: Truth | None
    progress: Callable[[str], None]

    @property
    def prepared(self) -> onnx_int8.Prepared: ...

    @property
    def fp32_session(self) -> ort.InferenceSession: ...

    @property
    def fp32_outputs(self) -> dict[str, np.ndarray]: ...

    @property
    def search_samples(self) -> list[dict[str, np.ndarray]]:
        """The calibration samples a search scores its candidates on (never the evaluation set)."""
        ...

    @property
    def search_fp32(self) -> dict[str, np.ndarray]: ...


class TargetPass(Protocol):
    """One target format's pass: a candidate artifact for ``profile``'s ``target`` and its report fields; raises
    ``QuantizationError`` when the format's toolchain cannot build it."""

    def run(self, profile: Profile, target: ArtifactTarget) -> TargetResult: ...


@dataclass
class Attempt:
    """One candidate artifact (for ONNX: the prepared model with a set of nodes kept in float) and what it measured."""

    quantized: onnx_int8.Quantized
    stats: onnx_int8.WeightStats
    size_bytes: int
    outputs: list[OutputFidelity]
    latency: runtime.Latency | None = None


@dataclass
class TargetResult:
    """What one pass made for one profile: the attempt it settled on, the gate's checks, and the report fields of its
    format. ``notes`` come after the pipeline's own; ``latency_where`` says how ``attempt.latency`` was timed."""

    attempt: Attempt
    checks: list[Check]
    latency_where: str = ""
    quantization: QuantizationInfo | None = None
    mixed_precision: MixedPrecision | None = None
    tflite: TfliteInfo | None = None
    coreml: CoremlInfo | None = None
    search: SearchInfo | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def artifact(self) -> Path:
        """The candidate file (or Core ML package folder) in the work folder; shipped only if every check passed."""
        return self.attempt.quantized.path


def fidelity(tasks: dict[str, OutputTask], reference: dict[str, np.ndarray], got: dict[str, np.ndarray], *,
             truth: Truth | None = None) -> list[OutputFidelity]:
    """Per output, the candidate's answers against the FP32 reference's, in the terms of the output's task (and
    against ``truth`` for the output it names). Arrays are ``runtime.run_all``'s: calls stacked on axis 0."""
    out = []
    for name, ref in reference.items():
        task = tasks[name]
        calls = ref.shape[0] // task.shape[0] if task.shape and task.shape[0] else ref.shape[0]
        out.append(output_fidelity(task, ref, got[name], calls=calls,
                                   truth=truth if truth is not None and truth.output == name else None))
    return out


def judge_attempt(profile: Profile, attempt: Attempt, source_bytes: int, latency_ratio: float | None, *,
                  latency_caveat: str | None = None) -> list[Check]:
    """The profile's gate over an attempt's figures (``latency_ratio`` None: latency not judged; ``latency_caveat``:
    why the host's timing does not stand for the target's, see gate.judge)."""
    s = attempt.stats
    measured = Measured(outputs=attempt.outputs, artifact_bytes=attempt.size_bytes, source_bytes=source_bytes,
                        quantized_tensors=s.quantized_tensors,
                        source_has_weights=s.quantized_elements + s.float_elements + s.subgraph_float_elements > 0,
                        latency_ratio=latency_ratio)
    return judge(measured, profile.fidelity, max_artifact_bytes=int(profile.memory.max_artifact_mb * 1e6),
                 latency_caveat=latency_caveat)
