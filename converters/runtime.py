"""ONNX Runtime on the converting host: run models over samples and time them side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from converters.calibration import Sample
from converters.errors import QuantizationError


def session(path: Path, *, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QuantizationError(f"{path.name}: ONNX Runtime refuses to load it: {str(e).splitlines()[0]}") from e


def run_all(sess: ort.InferenceSession, samples: list[Sample]) -> dict[str, np.ndarray]:
    """Outputs of every sample, stacked along axis 0, by output name."""
    names = [o.name for o in sess.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for sample in samples:
        for n, value in zip(names, sess.run(names, sample), strict=True):
            collected[n].append(np.asarray(value))
    return {n: np.concatenate(v, axis=0) if v[0].ndim else np.stack(v) for n, v in collected.items()}


@dataclass(frozen=True)
class Latency:
    fp32_ms: float
    int8_ms: float
    runs: int

    @property
    def ratio(self) -> float:
        return self.int8_ms / self.fp32_ms if self.fp32_ms > 0 else float("inf")


def compare_latency(fp32: ort.InferenceSession, int8: ort.InferenceSession, sample: Sample, *,
                    runs: int = 30, warmup: int = 5, budget_s: float = 20.0) -> Latency:
    """Median batch-1 latency of both models, measured interleaved so machine noise hits both alike."""
    for _ in range(warmup):
        fp32.run(None, sample)
        int8.run(None, sample)
    t_fp32: list[float] = []
    t_int8: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(runs):
        for sess, acc in ((fp32, t_fp32), (int8, t_int8)):
            t0 = time.perf_counter()
            sess.run(None, sample)
            acc.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return Latency(float(np.median(t_fp32) * 1e3), float(np.median(t_int8) * 1e3), len(t_fp32))
