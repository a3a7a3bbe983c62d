"""The real-model zoo (tests/realzoo): its task metrics on hand-made cases, its cache's checks, and a CI subset of
two small published models prepared from PyPI wheels, whose FP32 accuracy on the generated data must be high."""

from __future__ import annotations

import numpy as np
import pytest

from tests import realzoo
from tests.realzoo import cache, metrics, ppocr, yolo_nudenet
from tests.realzoo.recipe import WheelPin
from tests.realzoo.runner import run_onnx

# The smallest models: ppocr_cls (0.6 MB ONNX) and mtcnn_onet (1.6 MB, built as a .pt2 through torch.export).
CI_SUBSET = {"ppocr_cls": ("top1", 0.95), "mtcnn_onet": ("accuracy", 0.95)}


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    steps = np.eye(4)[[0, 2, 2, 0, 2, 3, 3, 1, 0]]
    assert metrics.ctc_greedy(steps, blank=0) == [2, 2, 3, 1]


@pytest.mark.parametrize(("a", "b", "distance"), [([], [], 0), ([1, 2, 3], [1, 2, 3], 0), ([1, 2, 3], [1, 3], 1),
                                                  ([1, 2], [3, 4, 5], 3), ([], [7, 7], 2)])
def test_edit_distance(a, b, distance):
    assert metrics.edit_distance(a, b) == distance


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], float)
    assert metrics.nms(boxes, np.array([0.6, 0.9, 0.5]), 0.45) == [1, 2]


def test_average_precision_is_one_for_perfect_ranked_detections_and_drops_with_a_confident_miss():
    truth = [[[0, 0, 10, 10, 1]], [[5, 5, 15, 15, 1]]]
    perfect = [[[0, 0, 10, 10, 1, 0.9]], [[5, 5, 15, 15, 1, 0.8]]]
    assert metrics.average_precision(perfect, truth) == pytest.approx(1.0)
    confident_miss = [[[50, 50, 60, 60, 1, 0.99], [0, 0, 10, 10, 1, 0.9]], [[5, 5, 15, 15, 1, 0.8]]]
    assert metrics.average_precision(confident_miss, truth) < 1.0
    assert metrics.precision_recall(confident_miss, truth) == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8})


def test_yolo_decode_turns_centre_boxes_into_corners_and_maps_face_classes():
    output = np.zeros((1, 22, 3), np.float32)
    output[0, :4, 0] = [50, 40, 20, 10]  # cx, cy, w, h
    output[0, 4 + yolo_nudenet.FACE_MALE, 0] = 0.8
    output[0, 4 + 7, 1] = 0.1  # under the threshold
    found = yolo_nudenet.decode(output, 0.25, 0.45, yolo_nudenet.CLASS_MAP)
    assert found == [[40.0, 35.0, 60.0, 45.0, yolo_nudenet.FACE_FEMALE, pytest.approx(0.8)]]


def test_db_boxes_find_each_text_blob_and_unclip_it():
    probability = np.zeros((1, 1, 64, 64), np.float32)
    probability[0, 0, 10:16, 5:40] = 0.9
    probability[0, 0, 40:44, 10:20] = 0.2  # under the binarisation threshold
    boxes = ppocr.db_boxes(probability, 0.3, 0.5, 1.6)
    assert len(boxes) == 1
    x1, y1, x2, y2 = boxes[0][:4]
    assert x1 < 5 and y1 < 10 and x2 > 40 and y2 > 16  # grown by area * ratio / perimeter on every side


def test_a_wheel_whose_hash_differs_from_the_pin_is_refused_and_removed(tmp_path):
    pin = WheelPin("example", "1.0", "example-1.0-py3-none-any.whl", "0" * 64)
    wheel = tmp_path / "wheels" / pin.filename
    wheel.parent.mkdir()
    wheel.write_bytes(b"not the published wheel")
    with pytest.raises(cache.ZooError, match="sha256"):
        cache.fetch_wheel(pin, tmp_path)
    assert not wheel.exists()


def test_every_model_has_a_recipe_with_pinned_wheels():
    assert len(realzoo.names()) >= 8
    for name in realzoo.names():
        recipe = realzoo.recipe(name)
        assert all(len(w.sha256) == 64 and w.filename.endswith(".whl") for w in recipe.wheels), name
        assert recipe.model_file in ("model.onnx", "model.pt2")
    assert any(realzoo.recipe(n).model_file == "model.pt2" for n in CI_SUBSET)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CI_SUBSET))
def test_published_model_does_its_job_on_the_generated_data_in_fp32(name, tmp_path):
    from converters.source import load_source

    prepared = realzoo.prepare(name)  # from the cache; the first time fetches the wheels from PyPI
    evaluation, calibration = prepared.evaluation_samples(), prepared.calibration_samples()
    assert len(prepared.truth["samples"]) == len(evaluation) >= 64
    assert len(calibration) >= 32
    seen = {sample_bytes(s) for s in calibration}
    assert not any(sample_bytes(s) in seen for s in evaluation), "calibration and evaluation overlap"
    source = load_source(prepared.model, tmp_path)  # a .pt2 goes through our loader's pickle-free path
    assert {i.name for i in source.inputs} == set(evaluation[0])
    assert prepared.truth["output"] in {o.name for o in source.outputs}
    metric, floor = CI_SUBSET[name]
    scores = prepared.score(run_onnx(source.path, evaluation))
    assert scores[metric] >= floor, scores


def sample_bytes(sample: dict[str, np.ndarray]) -> bytes:
    return b"".join(sample[k].tobytes() for k in sorted(sample))
