"""What each model output is for, and how to read it the way its application does. Pure numpy.

An output's *task* decides how INT8 is judged against FP32: a classifier by its top class, a CTC recognizer by the
strings it decodes, a detector by the detections it returns at its operating score threshold, a text-segmentation
map by the regions it finds, anything else by numeric error. Tasks are inferred from what the model really returns
on the calibration data (the declared ONNX shape can lie: a recognizer declared ``[1, seqlen]`` returns
``[T, 1, C]``), helped by the graph (a Softmax or a recurrent layer upstream), and the user can declare them.

All functions here take *per-call* outputs: one array per model call, shaped as the model returned it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np


class OutputKind(StrEnum):
    CLASSIFICATION = "classification"  # one class vector per call: top-1 agreement
    SEQUENCE = "sequence"  # per-step class scores, CTC: decoded strings (exact match, CER)
    DETECTION = "detection"  # anchor-free head [4 box + N class rows]: matched detections at the score threshold
    SEGMENTATION = "segmentation"  # a probability map: the regions found above the binarisation threshold
    REGRESSION = "regression"  # anything else: cosine / SQNR


# The names users know the decoders by.
DECODERS = {"softmax": OutputKind.CLASSIFICATION, "ctc": OutputKind.SEQUENCE, "yolo": OutputKind.DETECTION,
            "segmentation": OutputKind.SEGMENTATION, "regression": OutputKind.REGRESSION}

# A bare Gemm/MatMul output this wide is a classifier's logits; narrower ones (box offsets, landmarks, a small
# classifier without a Softmax) are judged as regressions unless the name says logits or scores.
MIN_CLASSES_FROM_LOGITS = 100
PROBABILITY_OPS = ("Softmax", "LogSoftmax", "Sigmoid", "HardSigmoid")
MIN_MAP_SIDE = 16
MAX_DETECTION_FEATURES = 1024  # 4 box rows + up to 1020 classes
MAX_DETECTIONS = 300  # per call after NMS, as detectors' own post-processing caps them
BLANK_SHARE = 0.3  # a CTC output's blank wins at least this share of steps


@dataclass(frozen=True)
class OutputTask:
    """One output's task and the parameters its decoder needs, in the per-call shape the model returns."""

    name: str
    kind: OutputKind
    shape: tuple[int, ...]
    why: str
    declared: bool = False
    class_axis: int = -1  # classification, sequence: the class axis of the per-call array
    time_axis: int | None = None  # sequence: the step axis
    blank: int = 0  # sequence: the CTC blank index
    feature_axis: int | None = None  # detection: the axis of the 4 + N rows
    score_threshold: float = 0.25  # detection: the operating threshold
    nms_iou: float = 0.45  # detection: non-maximum suppression
    match_iou: float = 0.5  # detection and segmentation: a match between two boxes
    map_threshold: float = 0.3  # segmentation: DB's binarisation threshold
    box_threshold: float = 0.5  # segmentation: a region's mean probability must reach this
    unclip_ratio: float = 1.5  # segmentation: DB's maps mark shrunk text; regions grow back by this ratio

    def describe(self) -> str:
        return f"{self.kind.value} ({'declared' if self.declared else self.why})"


# ---------------------------------------------------------------------------------------------------- inference


def _squeezed_axes(shape: tuple[int, ...]) -> list[int]:
    return [i for i, d in enumerate(shape) if d != 1]


def _probabilities(x: np.ndarray, axis: int) -> bool:
    return bool(x.size) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0 + 1e-6 and x.shape[axis] >= 2


def infer_task(name: str, calls: Sequence[np.ndarray], *, producer: str | None = None,
               recurrent_upstream: bool = False, name_hint: bool = False) -> OutputTask:
    """The task of one output from what it returned on a few calls (``producer``: the op that computes it, after
    reshapes; ``recurrent_upstream``: an LSTM/GRU/RNN feeds it; ``name_hint``: its name says logits/scores)."""
    first = np.asarray(calls[0])
    shape = tuple(first.shape)
    if not np.issubdtype(first.dtype, np.floating) or any(np.asarray(c).shape != shape for c in calls):
        why = "integer output" if not np.issubdtype(first.dtype, np.floating) else "its shape varies between calls"
        return OutputTask(name, OutputKind.REGRESSION, shape, why)
    stacked = np.stack([np.asarray(c, dtype=np.float32) for c in calls])
    live = _squeezed_axes(shape)
    softmaxed = producer in ("Softmax", "LogSoftmax")
    if len(live) == 1:
        axis, width = live[0], shape[live[0]]
        scores = _probabilities(stacked, axis + 1) and (producer in PROBABILITY_OPS
                                                         or _rows_sum_to_one(stacked, axis + 1))
        if width >= 2 and (softmaxed or scores):
            return OutputTask(name, OutputKind.CLASSIFICATION, shape, f"a vector of scores from a {producer}"
                              if producer else "a probability vector", class_axis=axis)
        if producer in ("Gemm", "MatMul") and (width >= MIN_CLASSES_FROM_LOGITS or name_hint):
            return OutputTask(name, OutputKind.CLASSIFICATION, shape, f"{width} logits from a {producer}",
                              class_axis=axis)
        return OutputTask(name, OutputKind.REGRESSION, shape, "a vector of values")
    if len(live) == 2:
        a, b = live
        detection = _detection_layout(stacked, shape, a, b)
        if detection is not None:
            return OutputTask(name, OutputKind.DETECTION, shape, "4 box rows (pixels) beside class scores in "
                              f"[0, 1] for {shape[b if detection == a else a]} anchors", feature_axis=detection)
        if min(shape[a], shape[b]) >= MIN_MAP_SIDE and _probabilities(stacked, a + 1) and not softmaxed:
            return OutputTask(name, OutputKind.SEGMENTATION, shape, f"a {shape[a]}×{shape[b]} probability map")
        sequence_evidence = softmaxed or recurrent_upstream or name_hint or _rows_sum_to_one(stacked, b + 1)
        if sequence_evidence and shape[b] >= 2 and producer not in ("LayerNormalization",):
            why = ("per-step Softmax" if softmaxed else "a recurrent layer upstream" if recurrent_upstream
                   else "per-step scores")
            return OutputTask(name, OutputKind.SEQUENCE, shape, why, class_axis=b, time_axis=a,
                              blank=_blank(stacked, a + 1, b + 1))
    return OutputTask(name, OutputKind.REGRESSION, shape, "no task pattern matched")


def _rows_sum_to_one(x: np.ndarray, axis: int) -> bool:
    if not _probabilities(x, axis):
        return False
    return bool(np.allclose(x.sum(axis=axis), 1.0, atol=1e-3))


def _detection_layout(x: np.ndarray, shape: tuple[int, ...], a: int, b: int) -> int | None:
    """The feature axis of an anchor-free detector's output (YOLOv8: [1, 4 + N, anchors]), or None."""
    for features, anchors in ((a, b), (b, a)):
        f = shape[features]
        if not 5 <= f <= MAX_DETECTION_FEATURES or shape[anchors] < 2 * f:
            continue
        rows = np.moveaxis(x, features + 1, 1)  # [calls, features, ...]
        boxes, scores = rows[:, :4], rows[:, 4:]
        if float(np.abs(boxes).max()) > 2.0 and float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0 + 1e-6:
            return features
    return None


def _blank(x: np.ndarray, time_axis: int, class_axis: int) -> int:
    """The CTC blank: the class that wins most steps (when it wins enough of them), else 0."""
    winners = np.moveaxis(x, (time_axis, class_axis), (-2, -1)).argmax(axis=-1).ravel()
    counts = np.bincount(winners)
    top = int(counts.argmax())
    return top if counts[top] >= BLANK_SHARE * winners.size else 0


def declared(task: OutputTask, kind: OutputKind, **params: float) -> OutputTask:
    """The user's declaration over an inferred task; the parameters it needs are re-derived where the shape allows."""
    shape = task.shape
    live = _squeezed_axes(shape) or [len(shape) - 1]
    fields: dict[str, object] = {"kind": kind, "declared": True, "why": "declared by the user"}
    if kind is OutputKind.CLASSIFICATION:
        fields["class_axis"] = live[-1]
    elif kind is OutputKind.SEQUENCE and len(live) >= 2:
        fields.update(time_axis=live[-2], class_axis=live[-1])
    elif kind is OutputKind.DETECTION and len(live) >= 2:
        fields["feature_axis"] = live[0] if shape[live[0]] < shape[live[-1]] else live[-1]
    fields.update(params)
    return replace(task, **fields)


# ---------------------------------------------------------------------------------------------------- decoders


def top_classes(task: OutputTask, call: np.ndarray, k: int = 1) -> np.ndarray:
    v = np.moveaxis(np.asarray(call), task.class_axis, -1).reshape(-1)
    return np.argsort(-v, kind="stable")[:k]


def ctc_decode(task: OutputTask, call: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC: the best class per step, repeats collapsed, blanks dropped."""
    assert task.time_axis is not None
    steps = np.moveaxis(np.asarray(call), (task.time_axis, task.class_axis), (0, -1))
    best = steps.reshape(steps.shape[0], -1, steps.shape[-1])[:, 0, :].argmax(axis=-1)
    out: list[int] = []
    previous = -1
    for c in best.tolist():
        if c != previous and c != task.blank:
            out.append(c)
        previous = c
    return tuple(out)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [k, 4] x1, y1, x2, y2
    scores: np.ndarray  # [k]
    classes: np.ndarray  # [k]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: np.clip(r[:, 2] - r[:, 0], 0, None) * np.clip(r[:, 3] - r[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Class-aware greedy non-maximum suppression; the kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(order), dtype=bool)
    ious = iou_matrix(boxes[order], boxes[order])
    same = classes[order][:, None] == classes[order][None, :]
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        if len(keep) >= MAX_DETECTIONS:
            break
        suppressed |= (ious[i] > iou) & same[i]
    return np.asarray(keep, dtype=np.int64)


def yolo_decode(task: OutputTask, call: np.ndarray) -> Detections:
    """An anchor-free head's rows (cx, cy, w, h, class scores...) to detections above the threshold, after NMS."""
    assert task.feature_axis is not None
    rows = np.moveaxis(np.asarray(call, dtype=np.float64), task.feature_axis, 0)
    rows = rows.reshape(rows.shape[0], -1)
    scores_all = rows[4:]
    classes = scores_all.argmax(axis=0)
    scores = scores_all.max(axis=0)
    hit = scores >= task.score_threshold
    cx, cy, w, h = (rows[i, hit] for i in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) if hit.any() else np.zeros((0, 4))
    keep = _nms(boxes, scores[hit], classes[hit], task.nms_iou)
    return Detections(boxes[keep], scores[hit][keep], classes[hit][keep])


def map_regions(task: OutputTask, call: np.ndarray) -> np.ndarray:
    """A probability map's regions as DB's post-processing finds them: connected pixels above the threshold whose
    mean probability reaches ``box_threshold``, each grown back by ``unclip_ratio`` (DB's offset: area × ratio /
    perimeter). Boxes [k, 4] as x1, y1, x2, y2 in map pixels."""
    from scipy import ndimage

    prob = np.squeeze(np.asarray(call, dtype=np.float64))
    labels, _ = ndimage.label(prob > task.map_threshold)
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels), 1):
        if found is None:
            continue
        ys, xs = found
        h, w = ys.stop - ys.start, xs.stop - xs.start
        if min(h, w) < 2 or float(prob[found][labels[found] == index].mean()) < task.box_threshold:
            continue  # DB drops specks and faint regions
        grow = h * w * task.unclip_ratio / (2 * (h + w))
        boxes.append([xs.start - grow, ys.start - grow, xs.stop + grow, ys.stop + grow])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


@dataclass(frozen=True)
class Matches:
    matched: int  # pairs at IoU ≥ the match threshold (same class where classes are given)
    reference: int  # boxes in the reference (FP32 or ground truth)
    found: int  # boxes in the candidate

    @property
    def recall(self) -> float:
        return self.matched / self.reference if self.reference else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.found if self.found else 1.0

    def __add__(self, other: Matches) -> Matches:
        return Matches(self.matched + other.matched, self.reference + other.reference, self.found + other.found)


def match_boxes(reference: np.ndarray, found: np.ndarray, iou: float, ref_classes: np.ndarray | None = None,
                found_classes: np.ndarray | None = None, found_scores: np.ndarray | None = None) -> Matches:
    """Greedy one-to-one matching, best-scoring candidates first (the COCO/VOC rule)."""
    if not len(reference) or not len(found):
        return Matches(0, len(reference), len(found))
    order = np.argsort(-found_scores, kind="stable") if found_scores is not None else np.arange(len(found))
    ious = iou_matrix(found[order], reference)
    if ref_classes is not None and found_classes is not None:
        ious = np.where(found_classes[order][:, None] == ref_classes[None, :], ious, 0.0)
    taken = np.zeros(len(reference), dtype=bool)
    matched = 0
    for row in ious:
        row = np.where(taken, -1.0, row)
        j = int(row.argmax())
        if row[j] >= iou:
            taken[j] = True
            matched += 1
    return Matches(matched, len(reference), len(found))


def average_precision(truth: list[np.ndarray], detections: list[Detections], iou: float = 0.5) -> float:
    """mAP@iou over classes present in the ground truth (VOC all-point interpolation); ``truth``: per call, rows of
    [x1, y1, x2, y2, class]."""
    classes = sorted({int(c) for t in truth for c in t[:, 4]}) if truth else []
    aps = []
    for cls in classes:
        scored: list[tuple[float, bool]] = []
        positives = 0
        for t, d in zip(truth, detections, strict=True):
            gt = t[t[:, 4] == cls][:, :4]
            positives += len(gt)
            mine = d.classes == cls
            boxes, scores = d.boxes[mine], d.scores[mine]
            taken = np.zeros(len(gt), dtype=bool)
            ious = iou_matrix(boxes, gt)
            for i in np.argsort(-scores, kind="stable"):
                row = np.where(taken, -1.0, ious[i]) if len(gt) else np.zeros(0)
                hit = bool(len(gt)) and row.max() >= iou
                if hit:
                    taken[int(row.argmax())] = True
                scored.append((float(scores[i]), hit))
        if not positives:
            continue
        scored.sort(key=lambda s: -s[0])
        hits = np.cumsum([h for _, h in scored]) if scored else np.zeros(0)
        precision = hits / np.arange(1, len(scored) + 1) if scored else np.zeros(0)
        recall = hits / positives if scored else np.zeros(0)
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[1.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        aps.append(float(((mrec[1:] - mrec[:-1]) * mpre[1:]).sum()))
    return float(np.mean(aps)) if aps else 0.0
