"""Reading the fleet's telemetry: drift per model input (against the calibration reference) with alerts, and the
A/B comparison report. The arithmetic is pure (``drift``, ``gates``, ``abstats``); this module feeds it rows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sqlmodel import Session, select

from fleet_server import drift
from fleet_server.models import ABTest, DriftAlert, ModelVersion, TelemetryWindow, utcnow
from fleet_server.rollouts.gates import LatencyHistogram, merge, quantile

MAX_WINDOWS = 50_000


def version_label(mv: ModelVersion) -> str:
    return f"{mv.name} {mv.version}"  # what agents put in their telemetry


def latency_histogram(w: TelemetryWindow) -> LatencyHistogram | None:
    if not w.latency_edges or not w.latency_counts:
        return None
    return LatencyHistogram(tuple(w.latency_edges), tuple(w.latency_counts))


def _windows(session: Session, *, label: str, since: float, devices: Sequence[str] | None = None):
    q = select(TelemetryWindow).where(TelemetryWindow.model_version == label, TelemetryWindow.window_end >= since)
    if devices is not None:
        q = q.where(TelemetryWindow.device_id.in_(list(devices)))  # type: ignore[attr-defined]
    return session.exec(q.order_by(TelemetryWindow.window_end.desc()).limit(MAX_WINDOWS)).all()  # type: ignore[union-attr]


def drift_report(session: Session, mv: ModelVersion, since: float) -> dict:
    windows = _windows(session, label=version_label(mv), since=since)
    observed = [s for w in windows for s in w.inputs if not str(s.get("name", "")).startswith("out/")]
    return {"model": mv.name, "version": mv.version, "since": since, "windows": len(windows),
            "devices": len({w.device_id for w in windows}),
            "inputs": drift.compare(mv.reference_stats or {}, observed),
            "reference": {k: {"mean": v["mean"], "std": v["std"], "count": v["count"]}
                          for k, v in (mv.reference_stats or {}).items()}}


def watch_drift(session: Session, now: float, window_s: float) -> int:
    """Open or refresh an alert for every (model version, input) that drifted over the last ``window_s``; close
    the ones that subsided. Returns the number of open alerts."""
    labels = set(session.exec(select(TelemetryWindow.model_version)  # type: ignore[call-overload]
                              .where(TelemetryWindow.window_end >= now - window_s).distinct()).all())
    for mv in session.exec(select(ModelVersion)).all():
        if version_label(mv) not in labels or not mv.reference_stats:
            continue
        report = drift_report(session, mv, now - window_s)
        for name, r in report["inputs"].items():
            alert = session.exec(select(DriftAlert).where(DriftAlert.model_version_id == mv.id,
                                                          DriftAlert.input_name == name,
                                                          DriftAlert.open == True)).first()  # noqa: E712
            if r["level"] == "drift":
                alert = alert or DriftAlert(model_version_id=mv.id or 0, input_name=name, psi=r["psi"],
                                            level=r["level"])
                alert.psi, alert.level, alert.values, alert.devices = r["psi"], r["level"], r["values"], \
                    report["devices"]
                alert.last_seen = utcnow()
                session.add(alert)
            elif alert is not None and r["level"] in ("stable", "shift"):
                alert.open, alert.last_seen = False, utcnow()
                session.add(alert)
    session.commit()
    return len(session.exec(select(DriftAlert.id).where(DriftAlert.open == True)).all())  # noqa: E712


# ----------------------------------------------------------------------------- A/B


def split(test_id: int, cohort: list[str], split_percent: float) -> tuple[list[str], list[str]]:
    """Arms A and B: the cohort ordered by a hash of (test, device), the first ``split_percent`` of it on B.

    The assignment is stable (the same cohort gives the same arms on every replica) and its sizes are exact, with
    at least one device per arm from two devices up: a per-device hash threshold would leave an arm empty for one
    small cohort in eight (4 devices at 50%)."""
    import hashlib

    ranked = sorted(cohort, key=lambda d: hashlib.sha256(f"ab{test_id}:{d}".encode()).digest())
    n_b = min(max(round(len(ranked) * split_percent / 100), 1), len(ranked) - 1) if len(ranked) >= 2 else 0
    return sorted(ranked[n_b:]), sorted(ranked[:n_b])


def _wilson(errors: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    if n == 0:
        return None
    p = errors / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def _moments(h: LatencyHistogram | None) -> tuple[int, float, float]:
    """Count, mean and variance of a latency histogram (bin midpoints; the first bin's lower edge may be 0)."""
    if h is None:
        return 0, math.nan, math.nan
    c = np.asarray(h.counts, dtype=np.float64)
    n = int(c.sum())
    if n == 0:
        return 0, math.nan, math.nan
    e = np.asarray(h.edges, dtype=np.float64)
    mid = (e[:-1] + e[1:]) / 2
    mean = float((c * mid).sum() / n)
    return n, mean, float((c * (mid - mean) ** 2).sum() / n)


def _outputs(windows) -> dict[str, dict]:
    """Per output: count-weighted mean and pooled std of the values the devices saw (from their statistics)."""
    acc: dict[str, list[tuple[int, float, float]]] = {}
    for w in windows:
        for s in w.inputs:
            name = str(s.get("name", ""))
            if name.startswith("out/") and s.get("count"):
                acc.setdefault(name[4:], []).append((int(s["count"]), float(s["mean"]), float(s["std"])))
    out = {}
    for name, parts in acc.items():
        n = sum(p[0] for p in parts)
        mean = sum(p[0] * p[1] for p in parts) / n
        var = sum(p[0] * (p[2] ** 2 + (p[1] - mean) ** 2) for p in parts) / n
        out[name] = {"values": n, "mean": mean, "std": math.sqrt(var)}
    return out


def _arm(session: Session, mv: ModelVersion, devices: list[str], since: float) -> dict:
    windows = _windows(session, label=version_label(mv), since=since, devices=devices) if devices else []
    requests, errors = sum(w.requests for w in windows), sum(w.errors for w in windows)
    h = merge(h for h in map(latency_histogram, windows) if h is not None)
    n, mean, var = _moments(h)
    ci = _wilson(errors, requests)
    return {"model": mv.name, "version": mv.version, "devices": len(devices),
            "reporting_devices": len({w.device_id for w in windows}), "requests": requests, "errors": errors,
            "error_rate": errors / requests if requests else None,
            "error_rate_ci95": list(ci) if ci else None, "latency_samples": n,
            "latency_mean_ms": None if n == 0 else round(mean, 4),
            "latency_p50_ms": None if h is None or n == 0 else round(quantile(h, 0.5) or 0, 4),
            "latency_p99_ms": None if h is None or n == 0 else round(quantile(h, 0.99) or 0, 4),
            "_var": var, "outputs": _outputs(windows)}


def ab_report(session: Session, test: ABTest) -> dict:
    """Both arms side by side, with the differences (B − A) and 95% intervals that say whether they are real:
    error rates by a two-proportion normal interval, mean latency by Welch's normal interval (from the merged
    histograms' moments). A difference whose interval spans 0 is not established by this sample."""
    mv_a, mv_b = session.get(ModelVersion, test.model_a_id), session.get(ModelVersion, test.model_b_id)
    if mv_a is None or mv_b is None:
        raise ValueError("a model version of this test is gone")
    a = _arm(session, mv_a, test.devices_a, test.started_at)
    b = _arm(session, mv_b, test.devices_b, test.started_at)
    diff: dict = {}
    if a["requests"] and b["requests"]:
        pa, pb = a["error_rate"], b["error_rate"]
        se = math.sqrt(pa * (1 - pa) / a["requests"] + pb * (1 - pb) / b["requests"])
        diff["error_rate"] = {"b_minus_a": pb - pa, "ci95": [pb - pa - 1.96 * se, pb - pa + 1.96 * se]}
    if a["latency_samples"] > 1 and b["latency_samples"] > 1:
        d = b["latency_mean_ms"] - a["latency_mean_ms"]
        se = math.sqrt(a["_var"] / a["latency_samples"] + b["_var"] / b["latency_samples"])
        diff["latency_mean_ms"] = {"b_minus_a": round(d, 4), "ci95": [round(d - 1.96 * se, 4),
                                                                      round(d + 1.96 * se, 4)],
                                   "significant": not (d - 1.96 * se <= 0 <= d + 1.96 * se)}
    for arm in (a, b):
        arm.pop("_var")
    return {"id": test.id, "name": test.name, "split_percent": test.split_percent, "since": test.started_at,
            "a": a, "b": b, "difference": diff,
            "note": "intervals are normal approximations; wait for a few hundred requests per arm before reading them"}
