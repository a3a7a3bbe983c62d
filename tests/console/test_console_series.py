"""The device page's telemetry series: buckets merge latency histograms and agree with the gates' quantile."""

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol.messages import LATENCY_EDGES_MS
from fleet_server.console.api import _quantile, bucket_series
from fleet_server.rollouts.gates import LatencyHistogram, quantile

BINS = len(LATENCY_EDGES_MS) - 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=BINS, max_size=BINS), st.sampled_from([0.5, 0.9, 0.99]))
def test_console_quantile_agrees_with_the_gates(counts, q):
    expected = quantile(LatencyHistogram(LATENCY_EDGES_MS, tuple(counts)), q)
    got = _quantile(np.asarray(LATENCY_EDGES_MS), np.asarray(counts, dtype=float), q)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert abs(got - round(expected, 4)) < 1e-3


def test_console_series_buckets_a_week_into_at_most_the_points_asked():
    rows = []
    for k in range(7 * 24 * 60):
        counts = [0] * BINS
        counts[20 if k < 5000 else 30] = 10  # latency steps up two thirds of the way through
        rows.append((1000.0 + 60 * k, 10, k % 2, 40.0, 90.0, json.dumps(counts), "m 1.0.0", None))
    series = bucket_series(rows, 300)
    assert len(series) == 300 and sum(b["requests"] for b in series) == 10 * len(rows)
    assert series[0]["p99_ms"] < LATENCY_EDGES_MS[21] < LATENCY_EDGES_MS[30] < series[-1]["p99_ms"]
    assert abs(series[0]["error_rate"] - 0.05) < 0.01 and series[0]["temperature_c"] is None
    assert bucket_series([], 300) == []
