"""FP32-versus-INT8 fidelity metrics. Pure numpy: values in, values out.

Whole-tensor cosine hides the failures that matter (a YOLO-style head whose class scores all collapse keeps a
cosine of 0.99999 because the box coordinates dominate it), so every output is also judged by what it is for:
top-1 agreement for classifiers, whole-sequence agreement for recognizers, and, for an output that concatenates
quantities of very different ranges, the same metrics per value range.
"""

from __future__ import annotations

import itertools
from enum import StrEnum

import numpy as np
from pydantic import BaseModel

# Adjacent slices whose magnitudes differ by more than this start a new value range...
RANGE_STEP = 10.0
# ...and an output counts as mixed-range when its largest and smallest ranges differ by at least this much.
MIXED_RANGE_RATIO = 30.0
MAX_RANGE_AXIS = 4096
# Class-score ranges are compared where the FP32 top score reaches a typical detection threshold.
CONFIDENT_SCORE = 0.25


class OutputKind(StrEnum):
    CLASSIFICATION = "classification"  # [N, classes]: judged by top-1 agreement
    SEQUENCE = "sequence"  # [N, steps, vocab]: per-step and whole-sequence agreement
    REGRESSION = "regression"  # anything else: cosine / SQNR / error


class RangeFidelity(BaseModel):
    axis: int
    start: int
    stop: int
    magnitude: float  # the largest |value| in this range on the FP32 model
    cosine: float
    sqnr_db: float
    max_abs_error: float
    relative_max_error: float
    top1_agreement: float | None = None  # probability-like range of ≥ 2 values (class scores), confident positions
    box_iou: float | None = None  # for a 4-wide coordinate range next to a score range (cx, cy, w, h)


class OutputFidelity(BaseModel):
    name: str
    kind: OutputKind
    shape: list[int]
    cosine: float  # mean over samples
    cosine_min: float
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None = None
    sequence_agreement: float | None = None
    ranges: list[RangeFidelity] | None = None


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


def find_value_ranges(ref: np.ndarray) -> tuple[int, list[tuple[int, int, float]]] | None:
    """Find an axis along which the output concatenates quantities of very different magnitudes.

    ``ref`` holds the FP32 outputs of all evaluation samples stacked on axis 0. Returns ``(axis, [(start, stop,
    magnitude), ...])`` for the axis with the largest magnitude spread, or None when no axis is mixed-range.
    """
    best: tuple[float, int, list[tuple[int, int, float]]] | None = None
    for axis in range(1, ref.ndim):
        size = ref.shape[axis]
        if size < 2 or size > MAX_RANGE_AXIS:
            continue
        mags = np.abs(np.moveaxis(ref, axis, 0)).reshape(size, -1).max(axis=1).astype(np.float64)
        logm = np.log10(np.maximum(mags, 1e-12))
        cuts = [i + 1 for i in range(size - 1) if abs(logm[i + 1] - logm[i]) > np.log10(RANGE_STEP)]
        if not cuts:
            continue
        bounds = [0, *cuts, size]
        groups = [(s, e, float(mags[s:e].max())) for s, e in itertools.pairwise(bounds)]
        spread = max(g[2] for g in groups) / max(min(g[2] for g in groups), 1e-12)
        if spread >= MIXED_RANGE_RATIO and (best is None or spread > best[0]):
            best = (spread, axis, groups)
    return None if best is None else (best[1], best[2])


def _box_iou_cxcywh(a: np.ndarray, b: np.ndarray) -> float:
    """Mean IoU of matching boxes; ``a`` and ``b`` have the 4 coordinates on axis 0."""

    def corners(x: np.ndarray) -> tuple[np.ndarray, ...]:
        cx, cy, w, h = (x[i].astype(np.float64) for i in range(4))
        w, h = np.abs(w), np.abs(h)
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    ax1, ay1, ax2, ay2 = corners(a)
    bx1, by1, bx2, by2 = corners(b)
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 1.0)
    return float(iou.mean())


def range_fidelity(ref: np.ndarray, test: np.ndarray, axis: int,
                   groups: list[tuple[int, int, float]]) -> list[RangeFidelity]:
    out: list[RangeFidelity] = []
    score_groups = []
    for start, stop, magnitude in groups:
        r = np.take(ref, range(start, stop), axis=axis)
        t = np.take(test, range(start, stop), axis=axis)
        err = float(np.abs(r.astype(np.float64) - t).max()) if r.size else 0.0
        probability_like = stop - start >= 2 and float(r.min()) >= 0.0 and float(r.max()) <= 1.0
        top1 = None
        if probability_like:  # judged where the FP32 model is confident: background anchors' argmax is noise
            agree = r.argmax(axis=axis) == t.argmax(axis=axis)
            confident = r.max(axis=axis) >= CONFIDENT_SCORE
            top1 = float(agree[confident].mean()) if confident.any() else float(agree.mean())
        if probability_like:
            score_groups.append(len(out))
        out.append(RangeFidelity(axis=axis, start=start, stop=stop, magnitude=magnitude,
                                 cosine=float(cosine_per_sample(r, t).mean()), sqnr_db=sqnr_db(r, t),
                                 max_abs_error=err, relative_max_error=err / max(magnitude, 1e-12),
                                 top1_agreement=top1))
    if score_groups:  # a detector head: 4 coordinates beside class scores
        for g in out:
            if g.stop - g.start == 4 and g.top1_agreement is None:
                r = np.moveaxis(np.take(ref, range(g.start, g.stop), axis=axis), axis, 0)
                t = np.moveaxis(np.take(test, range(g.start, g.stop), axis=axis), axis, 0)
                g.box_iou = _box_iou_cxcywh(r, t)
    return out


def output_fidelity(name: str, kind: OutputKind, ref: np.ndarray, test: np.ndarray) -> OutputFidelity:
    """Compare FP32 (``ref``) and INT8 (``test``) outputs of all evaluation samples, stacked on axis 0."""
    if ref.shape != test.shape:
        raise ValueError(f"output {name}: FP32 shape {ref.shape} != INT8 shape {test.shape}")
    ref64 = ref.astype(np.float64)
    cos = cosine_per_sample(ref64, test)
    result = OutputFidelity(
        name=name, kind=kind, shape=list(ref.shape[1:]), cosine=float(cos.mean()), cosine_min=float(cos.min()),
        sqnr_db=sqnr_db(ref64, test), max_abs_error=float(np.abs(ref64 - test).max()) if ref.size else 0.0)
    if ref.ndim >= 2 and ref.shape[-1] >= 2:
        agree = ref.argmax(axis=-1) == test.argmax(axis=-1)
        result.top1_agreement = float(agree.mean())
        if kind is OutputKind.SEQUENCE and ref.ndim >= 3:
            result.sequence_agreement = float(agree.reshape(agree.shape[0], -1).all(axis=1).mean())
    if np.issubdtype(ref.dtype, np.floating):
        found = find_value_ranges(ref)
        if found is not None:
            result.ranges = range_fidelity(ref, test, *found)
    return result
