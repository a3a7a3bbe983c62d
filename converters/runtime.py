"""ONNX Runtime on the converting host: run models over samples and time them side by side."""

from __future__ import annotations

import functools
import json
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from converters.calibration import Sample
from converters.errors import QuantizationError


def session(path: Path, *, threads: int = 2, exact: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session on the host's CPU. ``exact``: for measuring what a quantized (QDQ) model computes,
    not how fast: its QuantizeLinear/DequantizeLinear pairs run as written (basic graph optimizations only, no fusion
    into ONNX Runtime's x86 integer kernels). That is the arithmetic of the targets — TensorRT and the ARM integer
    kernels accumulate int8 products in int32 — while ORT's fused x86 kernels on a CPU without VNNI add pairs of
    u8×s8 products in saturating int16 (vpmaddubsw): measured on a Xeon without VNNI, a MobileNet-like classifier's
    artifact gave cosine 0.9879 fused and 0.99998 exact, so the fidelity verdict depended on the build host."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QuantizationError(f"{path.name}: ONNX Runtime refuses to load it: {str(e).splitlines()[0]}") from e


# The least cosine between what ONNX Runtime's optimized (fused) kernels and the artifact's own QDQ arithmetic answer
# for an artifact with 16-bit activations. Loose on purpose: a CPU without VNNI legitimately costs INT8 some (0.988
# measured on a MobileNet-like classifier); what it catches is a fused path that computes something else entirely.
OPTIMIZED_PATH_MIN_COSINE = 0.9


def optimized_path_cosine(path: Path, samples: list[Sample], *, threads: int = 2) -> float:
    """The worst cosine, over outputs, between the artifact run as a device runs it (full graph optimizations) and
    its exact QDQ arithmetic (``session(exact=True)``); -1 when the optimized path answers NaN or infinity.
    Measured on ONNX Runtime 1.32: a Gemm whose INT8 inputs feed a 16-bit output, with an INT32 bias, answered all
    zeros fused (the QDQ selector's fusion) and the right values unfused, so the search's exact scoring passed it
    and a device would have served zeros."""
    exact = run_all(session(path, threads=threads, exact=True), samples)
    fused = run_all(session(path, threads=threads), samples)
    worst = 1.0
    for name, want in exact.items():
        a, b = np.asarray(want, np.float64).ravel(), np.asarray(fused[name], np.float64).ravel()
        if not np.isfinite(b).all():
            return -1.0
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        worst = min(worst, 1.0 if na == nb == 0 else float(a @ b) / max(na * nb, 1e-30))
    return worst


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def int8_latency_caveat() -> str | None:
    """Why this host's ONNX Runtime INT8 timings do not stand for the targets', or None when they do.

    On an x86 CPU without VNNI (nor AMX) ONNX Runtime's integer kernels multiply through 16-bit pair sums and run
    slower than float ones (seen here: MTCNN's O-Net 1.36× FP32, QLinearConv 3.75 ms vs Conv 1.3 ms on PP-OCR's
    classifier), which is not what an ARM device or a VNNI host does with the same artifact."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    if not flags or any(f in flags for f in VNNI_FLAGS):
        return None
    return "this x86 CPU has no VNNI: ONNX Runtime's INT8 kernels here are slower than on the targets"


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
    paired: float | None = None  # median of the per-round INT8/FP32 ratios (see ``time_pairs``)

    @property
    def ratio(self) -> float:
        if self.paired is not None:
            return self.paired
        return self.int8_ms / self.fp32_ms if self.fp32_ms > 0 else float("inf")


MIN_TIMED_S = 2.0  # a sub-millisecond model is timed for at least this long: 30 runs of it are 30 ms of noise
MAX_PAIRS = 20_000


def time_pairs(fp32: Callable[[], object], int8: Callable[[], object], *, runs: int = 30, warmup: int = 5,
               budget_s: float = 20.0, min_s: float = MIN_TIMED_S) -> Latency:
    """Batch-1 latency of two models measured in pairs, so that a shared host's noise hits both alike.

    Each round runs both models back to back, in alternating order (the second of a pair runs with warmer caches);
    the ratio is the median of the per-round ratios, which a burst of load on the host moves far less than the ratio
    of two medians taken over a minute of drifting load. At least ``runs`` rounds and ``min_s`` seconds, at most
    ``budget_s`` seconds (and ``MAX_PAIRS`` rounds).
    """
    for _ in range(warmup):
        fp32()
        int8()
    t_fp32: list[float] = []
    t_int8: list[float] = []
    ratios: list[float] = []
    start = time.perf_counter()
    while len(ratios) < MAX_PAIRS:
        pair = ((fp32, t_fp32), (int8, t_int8))
        for fn, acc in pair if len(ratios) % 2 == 0 else reversed(pair):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
        ratios.append(t_int8[-1] / max(t_fp32[-1], 1e-9))
        elapsed = time.perf_counter() - start
        if elapsed > budget_s or (len(ratios) >= runs and elapsed >= min(min_s, budget_s)):
            break
    return Latency(float(np.median(t_fp32) * 1e3), float(np.median(t_int8) * 1e3), len(ratios),
                   paired=float(np.median(ratios)))


def compare_latency(fp32: ort.InferenceSession, int8: ort.InferenceSession, sample: Sample, *,
                    runs: int = 30, warmup: int = 5, budget_s: float = 20.0) -> Latency:
    """ONNX Runtime latency of both models on one sample, timed in pairs (``time_pairs``)."""
    return time_pairs(lambda: fp32.run(None, sample), lambda: int8.run(None, sample), runs=runs, warmup=warmup,
                      budget_s=budget_s)


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
