"""PSI against the calibration reference, through histograms with the devices' own edges."""

import numpy as np
import pytest

from fleet_server.drift import compare, psi, rebin, reference


def stats(name, values, bins=32):
    lo, hi = float(values.min()), float(values.max())
    pad = (hi - lo) * 0.5
    edges = np.linspace(lo - pad, hi + pad, bins + 1)  # like the agent: its own edges, wider than the data
    counts = np.histogram(values, edges)[0]
    return {"name": name, "count": int(values.size),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def test_rebin_keeps_the_mass_and_moves_it_with_the_cdf():
    m = rebin([0, 1, 2], [10, 30], [-5, 0.5, 1.5, 9])
    assert m.sum() == pytest.approx(40) and m.tolist() == pytest.approx([5, 20, 15])
    assert rebin([0, 1], [4], [2, 3, 4]).tolist() == pytest.approx([4, 0])  # beyond the range: the end bin


def test_same_distribution_is_stable_and_a_shift_is_drift():
    rng = np.random.default_rng(0)
    ref = reference({"x": rng.standard_normal(20_000)})
    same = compare(ref, [stats("x", rng.standard_normal(5_000)), stats("x", rng.standard_normal(5_000))])
    assert same["x"]["level"] == "stable" and same["x"]["psi"] < 0.05 and same["x"]["values"] == 10_000
    moved = compare(ref, [stats("x", rng.standard_normal(5_000) + 1.0)])
    assert moved["x"]["level"] == "drift" and moved["x"]["psi"] > 0.25
    scaled = compare(ref, [stats("x", rng.standard_normal(5_000) * 1.4)])
    assert scaled["x"]["psi"] > 0.1
    assert compare(ref, [stats("other", rng.standard_normal(10))])["x"]["level"] == "no data"


def test_constant_inputs_and_empty_observations():
    ref = reference({"c": np.zeros(100)})
    assert len(ref["c"]["edges"]) == 2 and psi(ref["c"]["shares"], np.zeros(1)) == 0.0
