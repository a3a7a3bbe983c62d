"""Task metrics over model outputs, written from the packages' own post-processing; numpy only."""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of [n, 4] and [m, 4] boxes (x1, y1, x2, y2)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy class-agnostic NMS, as cv2.dnn.NMSBoxes does it (highest score first)."""
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        best = order.pop(0)
        keep.append(best)
        if order:
            ious = box_iou(boxes[best], boxes[order])[0]
            order = [i for i, iou in zip(order, ious, strict=True) if iou <= iou_threshold]
    return keep


def match_detections(detections: list[list[float]], truth: list[list[float]], iou_threshold: float = 0.5,
                     ) -> list[bool]:
    """Greedy matching by descending score: detections [x1,y1,x2,y2,class,score], truth [x1,y1,x2,y2,class].
    True where a detection matched a not-yet-matched truth box of its class."""
    order = sorted(range(len(detections)), key=lambda i: -detections[i][5])
    used = [False] * len(truth)
    hits = [False] * len(detections)
    for i in order:
        det = detections[i]
        best, best_iou = -1, iou_threshold
        for j, gt in enumerate(truth):
            if used[j] or int(gt[4]) != int(det[4]):
                continue
            iou = float(box_iou(np.array(det[:4]), np.array(gt[:4]))[0, 0])
            if iou >= best_iou:
                best, best_iou = j, iou
        if best >= 0:
            used[best] = hits[i] = True
    return hits


def average_precision(per_sample_dets: list[list[list[float]]], per_sample_truth: list[list[list[float]]],
                      iou_threshold: float = 0.5) -> float:
    """VOC-style AP (all-point interpolation) at one IoU, averaged over the classes present in the truth."""
    classes = sorted({int(t[4]) for truth in per_sample_truth for t in truth})
    aps = []
    for cls in classes:
        scored: list[tuple[float, bool]] = []
        n_truth = 0
        for dets, truth in zip(per_sample_dets, per_sample_truth, strict=True):
            dets_c = [d for d in dets if int(d[4]) == cls]
            truth_c = [t for t in truth if int(t[4]) == cls]
            n_truth += len(truth_c)
            scored += [(d[5], hit) for d, hit in zip(dets_c, match_detections(dets_c, truth_c, iou_threshold),
                                                     strict=True)]
        scored.sort(key=lambda s: -s[0])
        hits = np.array([h for _, h in scored], np.float64)
        tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
        recall = tp / max(n_truth, 1)
        precision = tp / np.maximum(tp + fp, 1e-9)
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1])))
    return float(np.mean(aps)) if aps else 0.0


def precision_recall(per_sample_dets: list[list[list[float]]], per_sample_truth: list[list[list[float]]],
                     iou_threshold: float = 0.5) -> dict[str, float]:
    tp = fp = n_truth = 0
    for dets, truth in zip(per_sample_dets, per_sample_truth, strict=True):
        hits = match_detections(dets, truth, iou_threshold)
        tp += sum(hits)
        fp += len(hits) - sum(hits)
        n_truth += len(truth)
    precision = tp / max(tp + fp, 1)
    recall = tp / max(n_truth, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    return {"precision": precision, "recall": recall, "f1": f1}


def ctc_greedy(probabilities: np.ndarray, blank: int) -> list[int]:
    """[T, C] scores → token ids: argmax per step, repeats merged, blanks dropped (PaddleOCR's CTCLabelDecode)."""
    best = np.asarray(probabilities).argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(t) for t in best[keep] if t != blank]


def edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def sequence_scores(decoded: list[list[int]], truth: list[list[int]]) -> dict[str, float]:
    exact = sum(d == t for d, t in zip(decoded, truth, strict=True))
    errors = sum(edit_distance(d, t) for d, t in zip(decoded, truth, strict=True))
    return {"line_accuracy": exact / len(truth), "cer": errors / max(sum(len(t) for t in truth), 1)}
