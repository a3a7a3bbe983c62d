"""The per-artifact report: JSON next to the artifact, a table for people."""

from __future__ import annotations

import platform
from enum import StrEnum
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, Field

from converters.fidelity import OutputFidelity, primary_metric
from converters.gate import Check


class Status(StrEnum):
    SHIPPABLE = "shippable"
    REFUSED = "refused"  # measured and below the floor (or nothing quantized, or too big): not shipped
    FAILED = "failed"  # the quantizer itself failed on this profile


class DataInfo(BaseModel):
    origin: str
    samples: int
    sha256: str
    synthetic: bool


class SourceInfo(BaseModel):
    path: str
    sha256: str
    size_bytes: int
    opset: int
    original_opset: int
    inputs: list[str]
    outputs: list[str]


class QuantizationInfo(BaseModel):
    format: str
    per_channel_requested: bool
    per_channel_used: bool
    activation_type: str
    weight_type: str
    activation_symmetric: bool
    weight_symmetric: bool
    calibration_method: str
    percentile: float | None = None
    op_types: str = "all"  # which ops were quantized: the weight-bearing ones, or every quantizable op
    smoothing: str | None = None  # SmoothQuant applied before quantizing, and where
    quantized_weight_tensors: int
    float_weight_tensors: int
    quantized_weight_fraction: float
    subgraph_float_weights: int
    qdq_nodes: int


class SizeInfo(BaseModel):
    fp32_bytes: int
    int8_bytes: int
    ratio: float


class LatencyInfo(BaseModel):
    fp32_ms: float
    int8_ms: float
    ratio: float
    runs: int
    threads: int
    regression: bool
    where: str


class TfliteInfo(BaseModel):
    io_type: str
    input_layouts: dict[str, str]  # what the app must feed, per input
    float_ops: list[str]  # builtin ops that still compute in float
    variant: str = "full-int8"  # or "float-elementwise" / "float-outlier-layers" (more float), after full INT8 failed
    conversion_seconds: float
    conversion_peak_rss_mb: float
    runtime: str = "LiteRT (ai-edge-litert), XNNPACK delegate on CPU"


class CoremlInfo(BaseModel):
    minimum_ios: int
    model_type: str
    spec_version: int
    inputs: dict[str, dict]  # name → shape and dtype, as the app feeds them
    outputs: dict[str, dict]
    int8_weight_tensors: int
    int8_weight_fraction: float  # of weight elements stored in blobs
    float_weight_tensors: list[str]  # above the quantization threshold: should be none
    ops: dict[str, int]
    pytorch_route_cosine: float  # the intermediate FP32 PyTorch model against the ONNX model (worst output)
    numeric_fidelity_measured: bool  # False: Core ML itself could not run on this host
    fidelity_measured_by: str
    compute_precision: str = "fp16"  # "fp32" when FP16 compute failed the floor (no Neural Engine then)
    conversion_seconds: float
    conversion_peak_rss_mb: float


class Tried(BaseModel):
    """One candidate the search measured."""

    what: str
    float_nodes: int
    split: str  # "evaluation" (judged by the gate) or "calibration" (scored while searching)
    score: float  # the whole-output task score (higher is better)
    passed: bool | None  # the floor held (on that split)
    failed: list[str] = []


class SearchInfo(BaseModel):
    choice: str  # the quantization choice of the result
    tried: list[Tried]
    seconds: float
    budget_seconds: float
    stopped: str  # why the search ended


class MixedPrecision(BaseModel):
    float_nodes: list[str]
    sixteen_bit_nodes: list[str] = []  # weights INT8, activations 16-bit (ONNX Runtime CPU)
    float_weight_fraction: float  # the share of the model's weights that the float nodes read
    rounds: int
    why: str
    full_int8_failed: list[str]
    size_cost_bytes: int | None = None  # vs the all-INT8 attempt
    latency_cost_ms: float | None = None


class ArtifactReport(BaseModel):
    profile: str
    profile_version: str
    format: str
    status: Status
    shippable: bool
    reasons: list[str] = []
    artifact: str | None = None
    artifact_sha256: str | None = None
    source: SourceInfo | None = None
    calibration: DataInfo | None = None
    evaluation: DataInfo | None = None
    quantization: QuantizationInfo | None = None
    size: SizeInfo | None = None
    latency: LatencyInfo | None = None
    fidelity: list[OutputFidelity] = []
    mixed_precision: MixedPrecision | None = None
    search: SearchInfo | None = None
    peak_rss_mb: float | None = None  # the converting process's peak resident memory after this artifact
    tflite: TfliteInfo | None = None
    coreml: CoremlInfo | None = None
    checks: list[Check] = []
    notes: list[str] = []
    versions: dict[str, str] = Field(default_factory=lambda: library_versions())

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("edgefleet", "onnx", "onnxruntime", "numpy", "torch", "tensorflow-cpu", "onnx2tf", "ai-edge-litert",
                 "coremltools", "onnx2torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def summary_rows(reports: list[ArtifactReport]) -> list[dict[str, str]]:
    """One row per artifact with the figures a person scans first."""
    rows = []
    for r in reports:
        task = [primary_metric(o) for o in r.fidelity]
        worst = min(task, key=lambda t: t[1]) if task else None
        truth = [o.truth for o in r.fidelity if o.truth is not None]
        rows.append({
            "profile": r.profile,
            "format": r.format,
            "status": r.status.value,
            "size": f"{r.size.int8_bytes / 1e6:.2f} MB ({r.size.ratio:.3f}×)" if r.size else "-",
            "task vs FP32": f"{worst[0]} {worst[1]:.2%}" if worst else "-",
            "vs truth": f"{truth[0].metric} {truth[0].fp32:.3f}→{truth[0].candidate:.3f}" if truth else "-",
            "latency": f"{r.latency.fp32_ms:.2f}→{r.latency.int8_ms:.2f} ms ({r.latency.ratio:.2f}×)"
            if r.latency else "-",
            "float nodes": _mixed_cell(r.mixed_precision) if r.mixed_precision else
            (f"ops: {', '.join(r.tflite.float_ops)}" if r.tflite and r.tflite.float_ops else "0"),
        })
    return rows


def _mixed_cell(mp: MixedPrecision) -> str:
    return f"{len(mp.float_nodes)} (+{len(mp.sixteen_bit_nodes)} 16-bit)" if mp.sixteen_bit_nodes else \
        str(len(mp.float_nodes))
