"""The typed shape of a hardware profile.

Profiles are data (one TOML file each); this module only says what a valid one looks like. Every model forbids
unknown fields so that a typo in a profile is an error, not a silently ignored setting.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactFormat(StrEnum):
    """What a converter produces. The value is also the artifact's file-name suffix family."""

    ONNX_INT8 = "onnx-int8"
    TFLITE_INT8 = "tflite-int8"
    COREML_INT8 = "coreml-int8"


class QuantFormat(StrEnum):
    QDQ = "QDQ"
    QOPERATOR = "QOperator"


class QuantDtype(StrEnum):
    INT8 = "int8"
    UINT8 = "uint8"


class CalibrationMethod(StrEnum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class FallbackPrecision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"


class LatencyPolicy(StrEnum):
    """What the gate does when the INT8 artifact is slower than the FP32 source on the measuring CPU."""

    WARN = "warn"
    REFUSE = "refuse"


class QuantizationScheme(_Strict):
    format: QuantFormat = QuantFormat.QDQ
    per_channel: bool = True
    activation_type: QuantDtype = QuantDtype.UINT8
    weight_type: QuantDtype = QuantDtype.INT8
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: Annotated[float, Field(gt=90.0, le=100.0)] = 99.999
    fallback_precision: FallbackPrecision = FallbackPrecision.FP32
    min_opset: Annotated[int, Field(ge=10, le=23)] = 13
    # Op types that always stay in float for this target (the runtime has no good INT8 kernel for them).
    float_ops: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _symmetric_int8_for_signed(self) -> QuantizationScheme:
        if self.activation_symmetric and self.activation_type is QuantDtype.UINT8:
            raise ValueError("activation_symmetric needs activation_type = 'int8' (uint8 cannot be symmetric)")
        return self


class ArtifactTarget(_Strict):
    """One artifact format the device can run, with the runtime that runs it."""

    format: ArtifactFormat
    runtime: Annotated[str, Field(min_length=1)]
    runtime_versions: str = Field(description="PEP 440 version range of the runtime, e.g. '>=1.16,<2'")
    execution_providers: tuple[str, ...] = ()
    delegate: str | None = None
    # TFLite: int8 tensors at the model's edges (smallest, fastest) or float32 for apps that feed float tensors.
    io_type: Literal["int8", "float32"] = "int8"
    quantization: QuantizationScheme = QuantizationScheme()

    @field_validator("runtime_versions")
    @classmethod
    def _valid_specifier(cls, value: str) -> str:
        try:
            SpecifierSet(value)
        except InvalidSpecifier as e:
            raise ValueError(f"not a version range: {value!r} ({e})") from e
        return value


class Memory(_Strict):
    ram_mb: Annotated[int, Field(gt=0)]
    flash_mb: Annotated[int, Field(gt=0)]
    model_ram_budget_mb: Annotated[int, Field(gt=0)]
    max_artifact_mb: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _budgets_fit(self) -> Memory:
        if self.model_ram_budget_mb > self.ram_mb:
            raise ValueError("model_ram_budget_mb exceeds ram_mb")
        if self.max_artifact_mb > self.flash_mb:
            raise ValueError("max_artifact_mb exceeds flash_mb")
        return self


class FidelityFloor(_Strict):
    """The least an INT8 artifact must keep of its FP32 source's behaviour to ship, in the terms of each output's task.

    Agreement floors are rates over counted units (samples, detections); the gate refuses only when the count it saw
    is unlikely (one-sided binomial test at ``confidence``) under a true rate at the floor, so a floor of 0.99 over
    32 samples allows one flip, not zero, and over 1,000 samples allows 15.
    """

    min_top1_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99  # classifiers: the top class
    min_sequence_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95  # recognizers: whole decoded strings
    max_cer: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02  # recognizers: characters of the decoded strings
    # Detectors and text maps: FP32's detections (regions) the candidate finds, and the candidate's FP32 has.
    min_detection_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    # Outputs without a task decoder (embeddings, regressions): numeric closeness.
    min_cosine: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.99
    min_sqnr_db: float = 15.0
    # Against the user's ground truth, when given: the accuracy FP32 has that INT8 may lose.
    max_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    max_map_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    confidence: Annotated[float, Field(ge=0.5, lt=1.0)] = 0.95
    max_latency_ratio: Annotated[float, Field(gt=0.0)] = 1.0
    latency_regression: LatencyPolicy = LatencyPolicy.WARN
    # Mixed precision may keep at most this share of the weights in float (elementwise ops cost nothing here).
    max_float_weight_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25


class Ops(_Strict):
    unsupported: tuple[str, ...] = ()
    notes: str = ""


_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


class Profile(_Strict):
    schema_version: int
    id: str
    version: str
    name: str
    device_class: Annotated[str, Field(min_length=1)]
    arch: Annotated[str, Field(pattern=r"^(aarch64|armv7l|x86_64|arm64)$")]
    accelerator: str
    memory: Memory
    artifacts: Annotated[tuple[ArtifactTarget, ...], Field(min_length=1)]
    fidelity: FidelityFloor = FidelityFloor()
    ops: Ops = Ops()

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {value} (this loader reads {SCHEMA_VERSION})")
        return value

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("id must be lowercase letters, digits and dashes")
        return value

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not re.match(r"^\d+\.\d+\.\d+$", value):
            raise ValueError("version must be MAJOR.MINOR.PATCH")
        return value

    @model_validator(mode="after")
    def _formats_unique(self) -> Profile:
        formats = [a.format for a in self.artifacts]
        if len(formats) != len(set(formats)):
            raise ValueError("artifacts: each format may appear once")
        return self

    @property
    def formats(self) -> tuple[ArtifactFormat, ...]:
        return tuple(a.format for a in self.artifacts)

    def target(self, fmt: ArtifactFormat) -> ArtifactTarget | None:
        return next((a for a in self.artifacts if a.format is fmt), None)
