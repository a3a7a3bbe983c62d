"""ONNX Runtime on the converting host: run models over samples and time them side by side."""

from __future__ import annotations

import json
import re
import tempfile
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


# Kernels that run in integer arithmetic: the candidates when INT8 turns out slower than float.
INTEGER_KERNELS = re.compile(r"^(QLinear|QGemm|QAttention|ConvInteger|MatMulInteger|DynamicQuantize)")


def integer_node_times(path: Path, sample: Sample, *, runs: int = 10, threads: int = 2) -> dict[str, float]:
    """Mean kernel time (ms) of each integer-arithmetic node, keyed by the source node it was fused from.

    ONNX Runtime names a fused QLinearConv after its Conv plus a ``_token_N`` suffix; the suffix is dropped so the
    name matches the node in the graph that was quantized.
    """
    with tempfile.TemporaryDirectory(prefix="ef-prof-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, sample)
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[str, float] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time") and \
                INTEGER_KERNELS.match(e.get("args", {}).get("op_name", "")):
            node = re.sub(r"_token_\d+$", "", name[: -len("_kernel_time")])
            times[node] = times.get(node, 0.0) + e["dur"] / 1e3 / runs
    return times
