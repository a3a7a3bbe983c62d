"""A candidate's outputs against FP32's, in the terms of each output's task; and against ground truth when given.

Numbers that describe the tensors (cosine, SQNR) are reported for every output but gate only regressions: on a
detector or a recognizer they measure noise the application never sees (background anchors, blank steps). What
gates a task output is what its application reads: the top class, the decoded string, the detections at the
operating threshold, the regions of a text map. Each is counted (k of n), so the gate can account for the size of
the evaluation set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from pydantic import BaseModel

from converters.tasks import (
    Matches,
    OutputKind,
    OutputTask,
    average_precision,
    ctc_decode,
    edit_distance,
    map_regions,
    match_boxes,
    top_classes,
    yolo_decode,
)
from converters.truth import Truth

MAP_SCORE_FLOOR = 0.05  # detections ranked for mAP: down to this score (the operating threshold gates the rest)

__all__ = ["Agreement", "OutputFidelity", "OutputKind", "TruthFidelity", "cosine_per_sample", "output_fidelity",
           "per_call", "sqnr_db"]


class Agreement(BaseModel):
    """``agreed`` of ``total`` units (samples, detections, regions) came out the same as FP32's."""

    agreed: int
    total: int
    unit: str

    @property
    def rate(self) -> float:
        return self.agreed / self.total if self.total else 1.0

    @property
    def disagreed(self) -> int:
        return self.total - self.agreed


class TruthFidelity(BaseModel):
    """FP32 and the candidate scored against the user's ground truth, on the same samples."""

    metric: str
    fp32: float
    candidate: float
    samples: int
    losses: int | None = None  # samples FP32 got right and the candidate got wrong
    wins: int | None = None  # the reverse
    fp32_cer: float | None = None
    candidate_cer: float | None = None


class OutputFidelity(BaseModel):
    name: str
    kind: OutputKind
    task: str  # how the kind was decided
    shape: list[int]  # per call, as the model returns it
    samples: int
    cosine: float  # mean over samples
    cosine_min: float
    sqnr_db: float
    max_abs_error: float
    top1: Agreement | None = None  # classification
    top5_agreement: float | None = None  # FP32's top class among the candidate's five best
    exact: Agreement | None = None  # sequence: whole decoded strings
    cer: float | None = None  # sequence: character error rate of the candidate's strings against FP32's
    recall: Agreement | None = None  # detection, segmentation: FP32's detections/regions the candidate finds too
    precision: Agreement | None = None  # ...and the candidate's that FP32 has too
    truth: TruthFidelity | None = None

    @property
    def top1_agreement(self) -> float | None:
        return self.top1.rate if self.top1 else None

    @property
    def sequence_agreement(self) -> float | None:
        return self.exact.rate if self.exact else None


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2, b2 = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    dot = (a2 * b2).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-30))
    return np.clip(cos, -1.0, 1.0)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; capped at 120 dB for an exact match."""
    ref = reference.astype(np.float64)
    noise = float(((ref - test.astype(np.float64)) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return 120.0
    if signal == 0.0:
        return -120.0
    return float(min(120.0, 10.0 * np.log10(signal / noise)))


def per_call(stacked: np.ndarray, calls: int) -> np.ndarray:
    """Outputs of ``calls`` model calls concatenated on axis 0 (``runtime.run_all``), as [calls, per-call shape]."""
    if calls <= 0 or stacked.shape[0] % calls:
        raise ValueError(f"{stacked.shape[0]} rows cannot be {calls} calls' outputs")
    return stacked.reshape(calls, stacked.shape[0] // calls, *stacked.shape[1:])


def output_fidelity(task: OutputTask, ref: np.ndarray, test: np.ndarray, *, calls: int,
                    truth: Truth | None = None) -> OutputFidelity:
    """Compare FP32 (``ref``) and candidate (``test``) outputs of ``calls`` evaluation samples (stacked on axis 0)."""
    if ref.shape != test.shape:
        raise ValueError(f"output {task.name}: FP32 shape {ref.shape} != candidate shape {test.shape}")
    r, t = per_call(ref, calls), per_call(test, calls)
    ref64 = r.astype(np.float64)
    cos = cosine_per_sample(ref64, t)
    result = OutputFidelity(
        name=task.name, kind=task.kind, task=task.describe(), shape=list(r.shape[1:]), samples=calls,
        cosine=float(cos.mean()), cosine_min=float(cos.min()), sqnr_db=sqnr_db(ref64, t),
        max_abs_error=float(np.abs(ref64 - t).max()) if r.size else 0.0)
    if not np.issubdtype(r.dtype, np.floating):
        return result
    shaped = tuple(r.shape[1:]) == task.shape
    if task.kind is OutputKind.CLASSIFICATION and shaped:
        _classification(task, r, t, result, truth)
    elif task.kind is OutputKind.SEQUENCE and shaped:
        _sequence(task, r, t, result, truth)
    elif task.kind is OutputKind.DETECTION and shaped:
        _detection(task, r, t, result, truth)
    elif task.kind is OutputKind.SEGMENTATION and shaped:
        _segmentation(task, r, t, result, truth)
    return result


def _classification(task: OutputTask, r: np.ndarray, t: np.ndarray, result: OutputFidelity,
                    truth: Truth | None) -> None:
    ref_top = [int(top_classes(task, x)[0]) for x in r]
    test_top5 = [top_classes(task, x, 5) for x in t]
    test_top = [int(x[0]) for x in test_top5]
    # Where the truth says near misses count (ordinal classes: pitch bins), they count against FP32 too.
    tolerance = int(truth.params.get("tolerance_bins", 0)) if truth is not None else 0
    result.top1 = Agreement(agreed=sum(abs(a - b) <= tolerance for a, b in zip(ref_top, test_top, strict=True)),
                            total=len(r), unit="samples" if not tolerance else f"samples (±{tolerance} classes)")
    result.top5_agreement = float(np.mean([a in b for a, b in zip(ref_top, test_top5, strict=True)]))
    if truth is not None:
        right = lambda got, want: abs(got - int(want)) <= tolerance  # noqa: E731
        result.truth = _paired("top-1 accuracy" + (f" (±{tolerance} classes)" if tolerance else ""),
                               [right(g, w) for g, w in zip(truth.classes(ref_top), truth.samples, strict=True)],
                               [right(g, w) for g, w in zip(truth.classes(test_top), truth.samples, strict=True)])


def _sequence(task: OutputTask, r: np.ndarray, t: np.ndarray, result: OutputFidelity, truth: Truth | None) -> None:
    ref_text = [ctc_decode(task, x) for x in r]
    test_text = [ctc_decode(task, x) for x in t]
    if truth is not None:  # the truth's equivalences (letter case, spaces) hold against FP32 too
        ref_text, test_text = [truth.tokens(s) for s in ref_text], [truth.tokens(s) for s in test_text]
    result.exact = Agreement(agreed=sum(a == b for a, b in zip(ref_text, test_text, strict=True)), total=len(r),
                             unit="samples")
    result.cer = _cer(ref_text, test_text)
    if truth is not None:
        want = [truth.tokens(s) for s in truth.samples]
        result.truth = _paired("exact-line accuracy", [a == b for a, b in zip(ref_text, want, strict=True)],
                               [a == b for a, b in zip(test_text, want, strict=True)])
        result.truth.fp32_cer, result.truth.candidate_cer = _cer(want, ref_text), _cer(want, test_text)


def _cer(reference: Sequence[Sequence[int]], got: Sequence[Sequence[int]]) -> float:
    chars = sum(len(s) for s in reference)
    errors = sum(edit_distance(a, b) for a, b in zip(reference, got, strict=True))
    return errors / chars if chars else float(errors > 0)


def _detection(task: OutputTask, r: np.ndarray, t: np.ndarray, result: OutputFidelity, truth: Truth | None) -> None:
    ref_det = [yolo_decode(task, x) for x in r]
    test_det = [yolo_decode(task, x) for x in t]
    total = Matches(0, 0, 0)
    for a, b in zip(ref_det, test_det, strict=True):
        total = total + match_boxes(a.boxes, b.boxes, task.match_iou, a.classes, b.classes, b.scores)
    _record_matches(result, total, "detections")
    if truth is not None:  # mAP ranks every detection down to a low score, as COCO/VOC evaluation does
        loose = replace(task, score_threshold=min(MAP_SCORE_FLOOR, task.score_threshold))
        boxes = [np.asarray(s, dtype=np.float64).reshape(-1, 5) for s in truth.samples]

        def mean_ap(calls: np.ndarray) -> float:
            found = [yolo_decode(loose, x) for x in calls]
            return average_precision(boxes, [replace(d, classes=np.asarray(truth.classes(d.classes), dtype=np.int64))
                                             for d in found])

        result.truth = TruthFidelity(metric=f"mAP@{task.match_iou:g}", fp32=mean_ap(r), candidate=mean_ap(t),
                                     samples=len(r))


def _segmentation(task: OutputTask, r: np.ndarray, t: np.ndarray, result: OutputFidelity,
                  truth: Truth | None) -> None:
    ref_regions = [map_regions(task, x) for x in r]
    test_regions = [map_regions(task, x) for x in t]
    total = Matches(0, 0, 0)
    for a, b in zip(ref_regions, test_regions, strict=True):
        total = total + match_boxes(a, b, task.match_iou)
    _record_matches(result, total, "regions")
    if truth is not None:
        boxes = [np.asarray(s, dtype=np.float64).reshape(-1, 4) for s in truth.samples]

        def f1(found: list[np.ndarray]) -> float:
            m = Matches(0, 0, 0)
            for want, got in zip(boxes, found, strict=True):
                m = m + match_boxes(want, got, task.match_iou)
            return 2 * m.matched / (m.reference + m.found) if m.reference + m.found else 1.0

        result.truth = TruthFidelity(metric=f"region F1@{task.match_iou:g}", fp32=f1(ref_regions),
                                     candidate=f1(test_regions), samples=len(r))


def _record_matches(result: OutputFidelity, m: Matches, unit: str) -> None:
    result.recall = Agreement(agreed=m.matched, total=m.reference, unit=f"FP32 {unit}")
    result.precision = Agreement(agreed=m.matched, total=m.found, unit=f"candidate {unit}")


def _paired(metric: str, fp32_right: list[bool], candidate_right: list[bool]) -> TruthFidelity:
    n = len(fp32_right)
    pairs = list(zip(fp32_right, candidate_right, strict=True))
    return TruthFidelity(metric=metric, fp32=sum(fp32_right) / n if n else 0.0,
                         candidate=sum(candidate_right) / n if n else 0.0, samples=n,
                         losses=sum(a and not b for a, b in pairs), wins=sum(b and not a for a, b in pairs))


def primary_metric(o: OutputFidelity) -> tuple[str, float]:
    """The one figure that says whether this output still does its job (for tables and the search)."""
    if o.top1 is not None:
        return "top-1 agreement", o.top1.rate
    if o.exact is not None:
        return "decoded-string agreement", o.exact.rate
    if o.recall is not None and o.precision is not None:
        r, p = o.recall.rate, o.precision.rate
        return f"{o.recall.unit.removeprefix('FP32 ')} F1 vs FP32", 2 * r * p / (r + p) if r + p else 0.0
    return "cosine", o.cosine


def task_score(outputs: list[OutputFidelity]) -> float:
    """A candidate's whole-output score, higher is better: the worst output's task metric (minus its CER for a
    recognizer), with SQNR breaking ties between candidates that agree on every counted unit."""
    if not outputs:
        return 0.0
    scores = []
    for o in outputs:
        value = primary_metric(o)[1] - (o.cer or 0.0)
        scores.append(value + 1e-3 * min(max(o.sqnr_db, 0.0), 60.0))
    return float(min(scores))
