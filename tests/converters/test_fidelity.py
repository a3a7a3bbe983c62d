"""Pure metrics, task inference, decoders and the gate: table tests, no runtime."""

import json

import numpy as np
import pytest

from converters.errors import CalibrationError
from converters.fidelity import cosine_per_sample, output_fidelity, sqnr_db, task_score
from converters.gate import Measured, allowed_misses, failed, fixable, judge
from converters.tasks import (
    Detections,
    OutputKind,
    OutputTask,
    average_precision,
    ctc_decode,
    declared,
    edit_distance,
    infer_task,
    match_boxes,
    yolo_decode,
)
from converters.truth import Truth, load_truth
from firmware_profiles import FidelityFloor, LatencyPolicy

rng = np.random.default_rng(0)
FLOOR = FidelityFloor()


def detector_calls(n=6, anchors=300, classes=8, objects=3):
    """YOLOv8-style [1, 4 + classes, anchors]: boxes in pixels, sigmoid scores, a few confident anchors."""
    calls = []
    for _ in range(n):
        boxes = np.concatenate([rng.uniform(40, 280, (1, 2, anchors)), rng.uniform(20, 60, (1, 2, anchors))], axis=1)
        scores = rng.uniform(0, 0.05, (1, classes, anchors))
        for k in range(objects):
            scores[0, k % classes, k * 40: k * 40 + 3] = 0.9
            boxes[0, :, k * 40: k * 40 + 3] = np.array([[60.0 + 80 * k], [100.0], [40.0], [40.0]])
        calls.append(np.concatenate([boxes, scores], axis=1).astype(np.float32))
    return calls


def stacked(calls):
    return np.concatenate(calls, axis=0)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------------- numbers


def test_cosine_and_sqnr_of_identical_and_noisy_tensors():
    a = rng.standard_normal((4, 100))
    assert np.allclose(cosine_per_sample(a, a), 1.0)
    assert sqnr_db(a, a) == 120.0
    noisy = a + 0.01 * rng.standard_normal(a.shape)
    assert 35 < sqnr_db(a, noisy) < 45


# ---------------------------------------------------------------------------------------------- task inference


def _seq_calls(t=20, c=12, time_first=False, probs=True):
    out = []
    for _ in range(4):
        logits = rng.standard_normal((t, c)) * 0.5
        logits[:, 0] += 3.0  # blank wins most steps
        x = softmax(logits) if probs else logits
        out.append((x[:, None, :] if time_first else x[None]).astype(np.float32))
    return out


@pytest.mark.parametrize(("calls", "hints", "kind"), [
    (detector_calls(), {}, OutputKind.DETECTION),
    ([softmax(rng.standard_normal((1, 10))).astype(np.float32) for _ in range(4)], {}, OutputKind.CLASSIFICATION),
    ([rng.uniform(0, 1, (1, 360)).astype(np.float32) for _ in range(4)], {"producer": "Sigmoid"},
     OutputKind.CLASSIFICATION),  # pitch bins
    ([rng.uniform(0, 1, (1, 10)).astype(np.float32) for _ in range(4)], {"producer": "Gemm"},
     OutputKind.REGRESSION),  # landmarks in [0, 1]
    ([rng.standard_normal((1, 1000)).astype(np.float32) for _ in range(4)], {"producer": "Gemm"},
     OutputKind.CLASSIFICATION),
    ([rng.standard_normal((1, 4)).astype(np.float32) for _ in range(4)], {"producer": "Gemm"},
     OutputKind.REGRESSION),
    (_seq_calls(), {"producer": "Softmax"}, OutputKind.SEQUENCE),
    (_seq_calls(time_first=True, probs=False), {"producer": "MatMul", "recurrent_upstream": True},
     OutputKind.SEQUENCE),  # a CNN+LSTM recognizer declared [1, seqlen] that returns [T, 1, C]
    ([rng.uniform(0, 1, (1, 1, 64, 64)).astype(np.float32) for _ in range(4)], {"producer": "Sigmoid"},
     OutputKind.SEGMENTATION),
    ([rng.standard_normal((1, 16, 384)).astype(np.float32) for _ in range(4)], {"producer": "LayerNormalization"},
     OutputKind.REGRESSION),  # a transformer's hidden states
])
def test_output_tasks_are_inferred_from_what_the_model_returns(calls, hints, kind):
    assert infer_task("y", calls, **hints).kind is kind


def test_sequence_axes_and_blank_are_read_from_the_values():
    task = infer_task("y", _seq_calls(time_first=True, probs=False), producer="MatMul", recurrent_upstream=True)
    assert (task.time_axis, task.class_axis, task.blank) == (0, 2, 0)


def test_a_declaration_overrides_inference():
    task = infer_task("y", [rng.standard_normal((1, 16, 384)).astype(np.float32)], producer="LayerNormalization")
    seq = declared(task, OutputKind.SEQUENCE, blank=3)
    assert seq.kind is OutputKind.SEQUENCE and seq.declared and (seq.time_axis, seq.class_axis, seq.blank) == (1, 2, 3)


# ---------------------------------------------------------------------------------------------- decoders


def test_ctc_greedy_decoding_collapses_repeats_and_drops_blanks():
    task = OutputTask("y", OutputKind.SEQUENCE, (1, 7, 4), "t", time_axis=1, class_axis=2, blank=0)
    steps = np.eye(4)[[1, 1, 0, 1, 2, 2, 0]][None]
    assert ctc_decode(task, steps) == (1, 1, 2)
    assert edit_distance((1, 2, 3), (1, 3)) == 1 and edit_distance((), (4, 4)) == 2


def test_yolo_decoding_thresholds_and_suppresses_duplicates():
    task = infer_task("y", detector_calls())
    det = yolo_decode(task, detector_calls(n=1)[0])
    assert len(det.boxes) == 3  # three objects, each seen by three overlapping anchors
    assert sorted(det.classes.tolist()) == [0, 1, 2] and det.scores.min() >= 0.25


def test_box_matching_and_average_precision():
    truth = np.array([[10, 10, 50, 50, 0], [100, 100, 150, 150, 1]], dtype=float)
    perfect = Detections(truth[:, :4], np.array([0.9, 0.8]), truth[:, 4].astype(int))
    assert average_precision([truth], [perfect]) == pytest.approx(1.0)
    shifted = Detections(truth[:, :4] + 30, np.array([0.9, 0.8]), truth[:, 4].astype(int))
    assert average_precision([truth], [shifted]) == 0.0
    m = match_boxes(truth[:, :4], perfect.boxes[:1], 0.5)
    assert (m.matched, m.recall, m.precision) == (1, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------- fidelity + gate


def test_the_gate_does_not_refuse_fp32_itself_under_a_grey_level_of_noise():
    """Detections and decoded strings are what the application reads: small numeric noise must not fail them."""
    calls = detector_calls(n=16)
    task = infer_task("output0", calls)
    noisy = [c + rng.normal(0, 0.004, c.shape).astype(np.float32) for c in calls]
    f = output_fidelity(task, stacked(calls), stacked(noisy), calls=16)
    seq_calls = _seq_calls()
    seq = infer_task("text", seq_calls, producer="Softmax")
    g = output_fidelity(seq, stacked(seq_calls), stacked([c + 0.001 for c in seq_calls]), calls=4)
    checks = judge(Measured([f, g], 30, 100, 5, True), FLOOR, max_artifact_bytes=10**9)
    assert not failed(checks), [c.line() for c in failed(checks)]
    assert not any("cosine" in c.name for c in checks)  # tensor numbers gate regressions only


def test_collapsed_detector_scores_fail_on_detections():
    calls = detector_calls(n=8)
    task = infer_task("output0", calls)
    collapsed = [np.concatenate([c[:, :4], np.where(c[:, 4:] > 0.5, 0.2, 0.0)], axis=1) for c in calls]
    f = output_fidelity(task, stacked(calls), stacked(collapsed), calls=8)
    assert f.cosine > 0.99  # whole-tensor cosine hides it
    bad = failed(judge(Measured([f], 30, 100, 5, True), FLOOR, max_artifact_bytes=10**9))
    assert any("recall" in c.name for c in bad) and fixable(bad)


def test_a_detector_evaluated_where_it_finds_nothing_cannot_be_judged():
    calls = [np.concatenate([c[:, :4], c[:, 4:] * 0.1], axis=1) for c in detector_calls(n=4)]
    task = infer_task("output0", detector_calls())
    f = output_fidelity(task, stacked(calls), stacked(calls), calls=4)
    bad = failed(judge(Measured([f], 30, 100, 5, True), FLOOR, max_artifact_bytes=10**9))
    assert bad and "finds no detections" in bad[0].detail and not fixable(bad)


@pytest.mark.parametrize(("total", "floor", "allowed"), [(5, 0.99, 0), (32, 0.99, 1), (200, 0.99, 5),
                                                         (1000, 0.99, 15), (32, 0.95, 4)])
def test_floors_account_for_the_evaluation_size(total, floor, allowed):
    assert allowed_misses(total, floor, 0.95) == allowed


@pytest.mark.parametrize(("flips", "passes"), [(0, True), (1, True), (2, False)])
def test_one_flip_in_32_samples_does_not_decide_a_99_percent_floor(flips, passes):
    ref = np.eye(10)[rng.integers(0, 10, 32)][:, None, :].astype(np.float32)
    test = ref.copy()
    test[:flips] = np.roll(test[:flips], 1, axis=-1)
    task = infer_task("probs", list(ref))
    f = output_fidelity(task, ref.reshape(32, 10), test.reshape(32, 10), calls=32)
    check = next(c for c in judge(Measured([f], 30, 100, 5, True), FLOOR, max_artifact_bytes=10**9)
                 if "top-1" in c.name)
    assert check.passed is passes and check.samples == 32 and f"{flips} of 32" in check.detail


def test_ground_truth_counts_losses_against_wins():
    probs = np.eye(5)[[0, 1, 2, 3, 4, 0, 1, 2]].astype(np.float32)
    task = infer_task("p", list(probs[:, None, :]))
    truth = Truth("p", OutputKind.CLASSIFICATION, [0, 1, 2, 3, 4, 0, 1, 3])  # FP32 wrong on the last one
    test = probs.copy()
    test[7] = np.eye(5)[3]  # INT8 right where FP32 was wrong...
    test[0] = np.eye(5)[1]  # ...and wrong where FP32 was right
    f = output_fidelity(task, probs, test, calls=8, truth=truth)
    assert (f.truth.fp32, f.truth.candidate, f.truth.losses, f.truth.wins) == (7 / 8, 7 / 8, 1, 1)
    check = next(c for c in judge(Measured([f], 30, 100, 5, True), FLOOR, max_artifact_bytes=10**9)
                 if "ground truth" in c.name)
    assert check.passed


def test_task_score_prefers_the_candidate_that_agrees():
    calls = detector_calls(n=4)
    task = infer_task("output0", calls)
    good = output_fidelity(task, stacked(calls), stacked(calls), calls=4)
    half = [np.concatenate([c[:, :4], c[:, 4:] * np.where(np.arange(c.shape[2]) < 60, 0.2, 1.0)], axis=1) for c in calls]
    bad = output_fidelity(task, stacked(calls), stacked(half), calls=4)
    assert task_score([good]) > task_score([bad])


# ---------------------------------------------------------------------------------------------- truth files


@pytest.mark.parametrize(("doc", "error"), [
    ({"output": "y", "task": "classification"}, "missing samples"),
    ({"output": "y", "task": "yolo", "samples": [1]}, "unknown task"),
    ({"output": "y", "task": "classification", "samples": ["cat"]}, "samples\\[0\\]"),
    ({"output": "y", "task": "detection", "samples": [[[1, 2, 3]]]}, "samples\\[0\\]"),
    ({"output": "y", "task": "sequence", "samples": [[1]], "blank": "x"}, "blank must be a non-negative number"),
    ({"output": "y", "task": "detection", "samples": [[]], "class_map": {"a": 1}}, "class_map"),
])
def test_bad_truth_files_say_what_is_wrong(tmp_path, doc, error):
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match=error):
        load_truth(path)


def test_truth_parameters_reach_the_decoder(tmp_path):
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({"output": "y", "task": "detection", "score_threshold": 0.4,
                                "samples": [[[0, 0, 10, 10, 1]]]}))
    t = load_truth(path)
    assert t.kind is OutputKind.DETECTION and t.decoder_params() == {"score_threshold": 0.4}


# ---------------------------------------------------------------------------------------------- the rest of the gate


def _measured(top1_flips=0, artifact=30, source=100, quantized=5, latency=None, noise=0.0):
    ref = softmax(rng.standard_normal((20, 10))).astype(np.float32)
    test = ref + noise
    test[:top1_flips] = np.roll(test[:top1_flips], 1, axis=-1)
    f = output_fidelity(infer_task("p", list(ref[:, None])), ref, test, calls=20)
    return Measured(outputs=[f], artifact_bytes=artifact, source_bytes=source, quantized_tensors=quantized,
                    source_has_weights=True, latency_ratio=latency)


@pytest.mark.parametrize(("measured", "passes", "can_fix"), [
    (_measured(), True, False),
    (_measured(top1_flips=3), False, True),
    (_measured(quantized=0, artifact=101), False, False),  # nothing quantized, bigger: mixed precision can't help
    (_measured(artifact=100), False, False),
])
def test_gate(measured, passes, can_fix):
    checks = judge(measured, FLOOR, max_artifact_bytes=10**9)
    assert (not failed(checks)) is passes
    assert fixable(checks) is can_fix


def test_regressions_are_judged_by_cosine_and_sqnr():
    ref = rng.standard_normal((20, 1, 16, 8)).astype(np.float32)
    task = infer_task("h", list(ref), producer="LayerNormalization")
    f = output_fidelity(task, ref.reshape(20, 16, 8), (ref + rng.standard_normal(ref.shape)).reshape(20, 16, 8),
                        calls=20)
    bad = failed(judge(Measured([f], 30, 100, 5, True), FLOOR, max_artifact_bytes=10**9))
    assert {c.name for c in bad} == {"h: cosine", "h: SQNR dB"}


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


def test_the_truths_equivalences_hold_against_fp32_too():
    """Strings that differ only in spaces (token 3 here) agree when the truth file says spaces are ignored."""
    task = OutputTask("text", OutputKind.SEQUENCE, (1, 5, 4), "t", time_axis=1, class_axis=2, blank=0)
    ref = np.eye(4)[[1, 0, 3, 0, 2]][None, None].repeat(8, axis=0).reshape(8, 5, 4)
    test = np.eye(4)[[1, 0, 0, 0, 2]][None, None].repeat(8, axis=0).reshape(8, 5, 4)  # the space went missing
    plain = output_fidelity(task, ref, test, calls=8)
    assert plain.exact.rate == 0.0
    truth = Truth("text", OutputKind.SEQUENCE, [[1, 2]] * 8, token_map={3: None})
    judged = output_fidelity(task, ref, test, calls=8, truth=truth)
    assert judged.exact.rate == 1.0 and judged.cer == 0.0 and judged.truth.candidate == 1.0


def test_latency_regression_measured_on_an_unrepresentative_host_is_reported_not_enforced():
    floor = FidelityFloor(max_latency_ratio=1.0, latency_regression=LatencyPolicy.REFUSE)
    caveat = "this x86 CPU has no VNNI"
    checks = judge(_measured(latency=1.7), floor, max_artifact_bytes=10**9, latency_caveat=caveat)
    latency = next(c for c in checks if c.name.startswith("latency"))
    assert latency.passed and latency.warning and caveat in latency.line() and "not enforced" in latency.line()
    quick = judge(_measured(latency=0.8), floor, max_artifact_bytes=10**9, latency_caveat=caveat)
    assert not next(c for c in quick if c.name.startswith("latency")).warning  # nothing to excuse
