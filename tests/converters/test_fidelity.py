"""Pure metrics and the gate: table tests, no runtime."""

import numpy as np
import pytest

from converters.fidelity import (
    OutputKind,
    cosine_per_sample,
    find_value_ranges,
    output_fidelity,
    sqnr_db,
)
from converters.gate import Measured, failed, fixable, judge
from firmware_profiles import FidelityFloor, LatencyPolicy

rng = np.random.default_rng(0)


def detector_output(n=6, anchors=50, classes=8):
    boxes = rng.uniform(0, 640, (n, 4, anchors)).astype(np.float32)
    scores = rng.uniform(0, 1, (n, classes, anchors)).astype(np.float32)
    return np.concatenate([boxes, scores], axis=1)


def test_cosine_and_sqnr_of_identical_and_noisy_tensors():
    a = rng.standard_normal((4, 100))
    assert np.allclose(cosine_per_sample(a, a), 1.0)
    assert sqnr_db(a, a) == 120.0
    noisy = a + 0.01 * rng.standard_normal(a.shape)
    assert 35 < sqnr_db(a, noisy) < 45


def test_mixed_range_output_is_split_at_the_box_score_boundary():
    axis, groups = find_value_ranges(detector_output())
    assert axis == 1
    assert [(s, e) for s, e, _ in groups] == [(0, 4), (4, 12)]


@pytest.mark.parametrize("shape", [(6, 10), (6, 16, 32), (6, 3, 8, 8)])
def test_ordinary_outputs_are_not_mixed_range(shape):
    assert find_value_ranges(rng.standard_normal(shape).astype(np.float32)) is None


def test_collapsed_scores_hide_behind_whole_tensor_cosine_but_not_per_range():
    ref = detector_output()
    test = ref.copy()
    test[:, 4:] = np.where(ref[:, 4:] > 0.5, 1.52, 0.0)  # one shared INT8 scale: scores become 0 or ~1.5
    f = output_fidelity("output0", OutputKind.REGRESSION, ref, test)
    assert f.cosine > 0.999
    boxes, scores = f.ranges
    assert boxes.cosine > 0.999 and boxes.box_iou == pytest.approx(1.0)
    assert scores.cosine < 0.95 and scores.top1_agreement < 0.5


def test_sequence_agreement_counts_whole_sequences():
    ref = rng.standard_normal((10, 4, 11))
    test = ref.copy()
    test[0, 2] = test[0, 2][::-1]  # flips one step of one sequence
    f = output_fidelity("logprobs", OutputKind.SEQUENCE, ref, test)
    assert f.sequence_agreement == pytest.approx(0.9)
    assert f.top1_agreement == pytest.approx(39 / 40)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        output_fidelity("y", OutputKind.REGRESSION, np.zeros((2, 3)), np.zeros((2, 4)))


def _measured(top1=1.0, cosine=1.0, artifact=30, source=100, quantized=5, latency=None):
    ref = rng.standard_normal((20, 10))
    f = output_fidelity("logits", OutputKind.CLASSIFICATION, ref, ref)
    f.top1_agreement, f.cosine = top1, cosine
    return Measured(outputs=[f], artifact_bytes=artifact, source_bytes=source, quantized_tensors=quantized,
                    source_has_weights=True, latency_ratio=latency)


FLOOR = FidelityFloor()


@pytest.mark.parametrize(("measured", "passes", "can_fix"), [
    (_measured(), True, False),
    (_measured(top1=0.95), False, True),
    (_measured(cosine=0.9), False, True),
    (_measured(quantized=0, artifact=101), False, False),  # nothing quantized, bigger: mixed precision can't help
    (_measured(artifact=100), False, False),
])
def test_gate(measured, passes, can_fix):
    checks = judge(measured, FLOOR, max_artifact_bytes=10**9)
    assert (not failed(checks)) is passes
    assert fixable(checks) is can_fix


def test_artifact_over_the_profile_size_budget_is_refused():
    checks = judge(_measured(artifact=60), FLOOR, max_artifact_bytes=50)
    assert [c.name for c in failed(checks)] == ["artifact size MB"]


@pytest.mark.parametrize(("policy", "passes", "warning"), [(LatencyPolicy.WARN, True, True),
                                                           (LatencyPolicy.REFUSE, False, False)])
def test_latency_regression_is_decided_by_the_profile(policy, passes, warning):
    floor = FidelityFloor(max_latency_ratio=1.0, latency_regression=policy)
    checks = judge(_measured(latency=1.7), floor, max_artifact_bytes=10**9)
    latency = next(c for c in checks if c.name.startswith("latency"))
    assert latency.passed is passes and latency.warning is warning
    assert "slower" in latency.line()
