"""Latency figures: paired rounds, so that a shared host's load hits FP32 and INT8 alike."""

import time

import pytest

from converters.runtime import MAX_PAIRS, Latency, time_pairs


def _busy(seconds: float):
    def run():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    return run


def test_paired_ratio_reads_the_real_ratio():
    lat = time_pairs(_busy(0.001), _busy(0.002), runs=20, warmup=1, min_s=0.2)
    assert lat.runs >= 20
    assert lat.ratio == pytest.approx(2.0, rel=0.25)
    assert lat.int8_ms > lat.fp32_ms


def test_a_burst_of_load_on_one_side_does_not_move_the_ratio():
    """Every tenth call of the INT8 model is hit by 'the host' (ten times slower): the median of paired ratios
    ignores those rounds where a ratio of means would not."""
    calls = {"n": 0}

    def int8():
        calls["n"] += 1
        _busy(0.01 if calls["n"] % 10 == 0 else 0.001)()

    lat = time_pairs(_busy(0.001), int8, runs=40, warmup=0, min_s=0.1)
    assert lat.ratio == pytest.approx(1.0, abs=0.2)


def test_small_models_are_timed_for_a_minimum_duration_and_every_loop_is_bounded():
    t0 = time.perf_counter()
    lat = time_pairs(_busy(1e-4), _busy(1e-4), runs=5, warmup=0, min_s=0.3, budget_s=5.0)
    assert time.perf_counter() - t0 >= 0.3
    assert lat.runs > 5
    lat = time_pairs(lambda: None, lambda: None, runs=5, warmup=0, min_s=60.0)
    assert lat.runs == MAX_PAIRS  # bounded in count too
    t0 = time.perf_counter()
    lat = time_pairs(_busy(0.05), _busy(0.05), runs=1000, warmup=0, budget_s=0.3)
    assert time.perf_counter() - t0 < 1.0 and lat.runs < 1000


def test_unpaired_figures_keep_their_plain_ratio():
    assert Latency(2.0, 1.0, 10).ratio == 0.5
    assert Latency(2.0, 1.0, 10, paired=0.6).ratio == 0.6
