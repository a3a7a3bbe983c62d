"""PSI against the calibration reference, through histograms with the devices' own edges."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server import insights
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


@given(st.lists(st.text(alphabet="0123456789abcdef", min_size=4, max_size=8), min_size=2, max_size=60, unique=True),
       st.floats(min_value=0.5, max_value=99.5), st.integers(min_value=1, max_value=10**6))
def test_ab_split_is_exact_stable_and_never_leaves_an_arm_empty(cohort, percent, test_id):
    a, b = insights.split(test_id, cohort, percent)
    assert a and b and sorted(a + b) == sorted(cohort) and not set(a) & set(b)
    assert abs(len(b) - len(cohort) * percent / 100) <= 1  # exact up to rounding (and the one-per-arm floor)
    assert insights.split(test_id, list(reversed(cohort)), percent) == (a, b)  # order of the query is irrelevant
