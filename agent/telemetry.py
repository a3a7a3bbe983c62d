"""Telemetry: what the local API served in a window, turned into a ``TelemetryBatch`` for the outbox.

Latency goes into a fixed log-spaced histogram (comparable across devices and windows) and exact percentiles over
the window's samples (bounded: a reservoir beyond ``MAX_SAMPLES``). Each model input gets count, mean, std, min, max
and a histogram whose edges are fixed per input for the life of the loaded model (taken from the first window that
saw the input), so the server can compare windows and devices bin by bin for drift. Input statistics come from a
strided sample of at most ``SAMPLE_PER_REQUEST`` values per request, kept for up to ``MAX_INPUT_SAMPLES`` requests
per window (a reservoir beyond) and reduced at harvest: the request path only copies the sample (a few µs), where
full statistics of a 128×128 image cost it a millisecond. Counts are exact; the rest is estimated from the sample.
"""

from __future__ import annotations

import bisect
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleet_protocol.messages import LATENCY_EDGES_MS, Histogram, InputStats, TelemetryBatch

INPUT_BINS = 16
MAX_SAMPLES = 20_000
MAX_INPUTS = 64
SAMPLE_PER_REQUEST = 1024  # input values per request that feed the drift statistics
MAX_INPUT_SAMPLES = 256  # requests per window whose samples are kept (a reservoir beyond)


@dataclass
class _InputAcc:
    """Per input: the exact count of values seen, and a reservoir of per-request samples the statistics are computed
    from at harvest time (off the request path)."""

    edges: np.ndarray
    n: int = 0
    requests: int = 0
    samples: list[np.ndarray] = field(default_factory=list)

    def add(self, values: np.ndarray, rng: random.Random) -> None:
        flat = values.reshape(-1)
        self.n += flat.size
        self.requests += 1
        sample = flat[:: -(-flat.size // SAMPLE_PER_REQUEST)].copy()
        if len(self.samples) < MAX_INPUT_SAMPLES:
            self.samples.append(sample)
        else:
            j = rng.randrange(self.requests)
            if j < MAX_INPUT_SAMPLES:
                self.samples[j] = sample

    def stats(self, name: str) -> InputStats | None:
        """Statistics of the finite sampled values (the server refuses NaN and infinities in telemetry: one NaN
        input must not cost the whole window); None when no sampled value was finite."""
        v = np.concatenate(self.samples).astype(np.float64)
        v = v[np.isfinite(v)]
        if not v.size:
            return None
        idx = np.clip(np.searchsorted(self.edges, v, side="right") - 1, 0, len(self.edges) - 2)
        counts = np.bincount(idx, minlength=len(self.edges) - 1)
        return InputStats(name=name, count=self.n, mean=float(v.mean()), std=float(v.std()), min=float(v.min()),
                          max=float(v.max()), histogram=Histogram(edges=tuple(float(e) for e in self.edges),
                                                                  counts=tuple(int(c) for c in counts)))


@dataclass
class _Window:
    start: float
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seen: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) - 1))
    inputs: dict[str, _InputAcc] = field(default_factory=dict)


class Telemetry:
    def __init__(self, *, clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        self._clock = clock
        self._rng = rng or random.Random(0)
        self._lock = threading.Lock()
        self._window = _Window(clock())
        self._edges: dict[str, np.ndarray] = {}  # per input, fixed while one model is loaded
        self._cpu = (time.monotonic(), _cpu_seconds())

    def model_changed(self) -> None:
        """A new model was activated: its inputs may mean other things, so histogram edges start afresh."""
        with self._lock:
            self._edges.clear()

    def record(self, latency_ms: float, *, error: str | None = None,
               inputs: dict[str, np.ndarray] | None = None) -> None:
        with self._lock:
            w = self._window
            w.requests += 1
            if error:
                w.errors[error] = w.errors.get(error, 0) + 1
                return
            w.seen += 1
            if len(w.latencies) < MAX_SAMPLES:
                w.latencies.append(latency_ms)
            else:  # reservoir sampling keeps the percentiles honest over any number of requests
                j = self._rng.randrange(w.seen)
                if j < MAX_SAMPLES:
                    w.latencies[j] = latency_ms
            b = min(max(bisect.bisect_right(LATENCY_EDGES_MS, latency_ms) - 1, 0), len(w.histogram) - 1)
            w.histogram[b] += 1
            for name, value in (inputs or {}).items():
                if name not in w.inputs:
                    if len(w.inputs) >= MAX_INPUTS or value.dtype.kind not in "fiu" or value.size == 0:
                        continue
                    w.inputs[name] = _InputAcc(self._edges_for(name, value))
                w.inputs[name].add(value, self._rng)

    def _edges_for(self, name: str, value: np.ndarray) -> np.ndarray:
        if name not in self._edges:
            lo, hi = float(value.min()), float(value.max())
            if not np.isfinite([lo, hi]).all():
                lo, hi = -1.0, 1.0
            pad = (hi - lo) * 0.5 or max(abs(lo), 1.0)
            self._edges[name] = np.linspace(lo - pad, hi + pad, INPUT_BINS + 1)
        return self._edges[name]

    def harvest(self, *, seq: int, model_version: str | None, slot: str | None, dropped: int = 0) -> TelemetryBatch:
        """Close the current window and return it as a batch; a new window starts now."""
        now = self._clock()
        with self._lock:
            w, self._window = self._window, _Window(now)
        lat = np.asarray(w.latencies) if w.latencies else None
        cpu = self._cpu_percent()
        return TelemetryBatch(
            seq=seq, window_start=w.start, window_end=now, model_version=model_version, slot=slot,  # type: ignore[arg-type]
            requests=w.requests, errors=w.errors,
            latency_ms=Histogram(edges=LATENCY_EDGES_MS, counts=tuple(int(c) for c in w.histogram))
            if w.seen else None,
            p50_ms=float(np.percentile(lat, 50)) if lat is not None else None,
            p95_ms=float(np.percentile(lat, 95)) if lat is not None else None,
            p99_ms=float(np.percentile(lat, 99)) if lat is not None else None,
            cpu_percent=cpu, rss_mb=rss_mb(), temperature_c=temperature_c(),
            inputs=tuple(stats for name, acc in w.inputs.items() if acc.n and (stats := acc.stats(name))),
            dropped_batches=dropped)

    def _cpu_percent(self) -> float | None:
        now, cpu = time.monotonic(), _cpu_seconds()
        (t0, c0), self._cpu = self._cpu, (now, cpu)
        return max(0.0, (cpu - c0) / (now - t0) * 100) if now > t0 else None


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def temperature_c() -> float | None:
    """The first thermal zone's temperature where the platform exposes one (Jetson, Raspberry Pi); else None."""
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")):
        try:
            return int(zone.read_text().strip()) / 1000
        except (OSError, ValueError):
            continue
    return None
