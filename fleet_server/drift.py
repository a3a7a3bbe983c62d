"""Input drift: recent input statistics from devices against the reference recorded from the calibration data.

The reference is an equal-mass histogram per input (quantile edges over the calibration values). Devices report
their own histograms with their own edges (``fleet_protocol.messages.InputStats``); each is re-binned onto the
reference edges through its piecewise-linear CDF, the masses are summed over the cohort, and compared with the
population stability index: PSI = Σ (o − r)·ln(o / r). Customary reading: < 0.1 stable, 0.1–0.25 a shift worth a
look, ≥ 0.25 drift. Pure functions; the engine and the API feed them rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

BINS = 10
EPS = 1e-4
WARN, ALERT = 0.1, 0.25
MAX_VALUES = 1_000_000


def reference(arrays: Mapping[str, np.ndarray], bins: int = BINS) -> dict:
    """Per input: quantile edges, the share of values per bin, and moments (from at most MAX_VALUES values)."""
    out = {}
    for name, value in arrays.items():
        v = np.asarray(value, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        if v.size > MAX_VALUES:
            v = v[:: -(-v.size // MAX_VALUES)]
        edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)))
        if edges.size < 2:  # a constant input
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
        counts = np.histogram(v, edges)[0]
        out[name] = {"edges": [float(e) for e in edges], "shares": [float(c) / v.size for c in counts],
                     "mean": float(v.mean()), "std": float(v.std()), "count": int(v.size)}
    return out


def rebin(edges: Iterable[float], counts: Iterable[float], target: Iterable[float]) -> np.ndarray:
    """Mass of a histogram on other edges, through its piecewise-linear CDF; mass outside the target's range goes
    to its end bins."""
    e = np.asarray(list(edges), dtype=np.float64)
    c = np.asarray(list(counts), dtype=np.float64)
    t = np.asarray(list(target), dtype=np.float64)
    cdf = np.concatenate([[0.0], np.cumsum(c)])
    at = np.interp(t, e, cdf, left=0.0, right=cdf[-1])
    mass = np.diff(at)
    mass[0] += at[0]
    mass[-1] += cdf[-1] - at[-1]
    return mass


def psi(reference_shares: Iterable[float], observed_mass: np.ndarray) -> float:
    r = np.clip(np.asarray(list(reference_shares), dtype=np.float64), EPS, None)
    total = observed_mass.sum()
    if total <= 0:
        return 0.0
    o = np.clip(observed_mass / total, EPS, None)
    r, o = r / r.sum(), o / o.sum()
    return float(np.sum((o - r) * np.log(o / r)))


def level(value: float) -> str:
    return "drift" if value >= ALERT else "shift" if value >= WARN else "stable"


def compare(ref: dict, observed: Iterable[dict]) -> dict:
    """PSI per reference input over a cohort's reported input statistics (dicts shaped like InputStats)."""
    mass: dict[str, np.ndarray] = {}
    seen: dict[str, int] = {}
    for stats in observed:
        name = stats.get("name")
        if name not in ref:
            continue
        h = stats["histogram"]
        m = rebin(h["edges"], h["counts"], ref[name]["edges"])
        mass[name] = mass[name] + m if name in mass else m
        seen[name] = seen.get(name, 0) + int(stats.get("count", 0))
    out = {}
    for name, r in ref.items():
        if name not in mass:
            out[name] = {"psi": None, "level": "no data", "values": 0}
            continue
        value = psi(r["shares"], mass[name])
        out[name] = {"psi": round(value, 5), "level": level(value), "values": seen[name]}
    return out
