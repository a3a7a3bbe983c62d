"""Telemetry: per device and per cohort (rollout, model, model version, profile) — latency percentiles over time, error
rates, resource use, update timings; and the ingest's own counters."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, status
from sqlmodel import col, select

from fleet_server.auth import SessionDep, Viewer
from fleet_server.insights import latency_histogram
from fleet_server.limits import MAX_ID
from fleet_server.models import Device, RolloutDevice, TelemetryWindow
from fleet_server.rollouts.gates import merge, quantile

router = APIRouter(prefix="/v1", tags=["telemetry"])
MAX_WINDOWS = 100_000  # a cohort query reads at most this many windows (newest first)


def _percentiles(hists) -> dict:
    h = merge(h for h in hists if h is not None)
    if h is None or sum(h.counts) == 0:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    return {f"p{int(q * 100)}_ms": round(quantile(h, q) or 0.0, 4) for q in (0.5, 0.95, 0.99)}


# a device sends one window per named model and telemetry interval, each labelled "<model> <version>"
MODEL = Query(max_length=64, description="only windows of this model's versions (its name, e.g. \"detector\")")


def _of_model(q, model: str | None):
    if model is None:
        return q
    return q.where(col(TelemetryWindow.model_version).startswith(f"{model} ", autoescape=True))


@router.get("/devices/{device_id}/telemetry")
def device_telemetry(device_id: str, session: SessionDep, _: Viewer,
                     since: Annotated[float | None, Query(description="epoch seconds")] = None,
                     model: Annotated[str | None, MODEL] = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 500) -> dict:
    if session.get(Device, device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id}")
    q = _of_model(select(TelemetryWindow).where(TelemetryWindow.device_id == device_id), model)
    if since is not None:
        q = q.where(TelemetryWindow.window_end >= since)
    rows = session.exec(q.order_by(TelemetryWindow.window_end.desc()).limit(limit)).all()  # type: ignore[union-attr]
    return {"device_id": device_id, "windows": [
        {"seq": w.seq, "window_start": w.window_start, "window_end": w.window_end, "model_version": w.model_version,
         "requests": w.requests, "errors": w.errors, "cpu_percent": w.cpu_percent, "rss_mb": w.rss_mb,
         **_percentiles([latency_histogram(w)])} for w in reversed(rows)]}


@router.get("/telemetry")
def cohort_telemetry(session: SessionDep, _: Viewer,
                     rollout: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
                     model_version: Annotated[str | None, Query(max_length=200,
                                                                description='e.g. "classifier 1.1.0"')] = None,
                     profile: Annotated[str | None, Query(max_length=64)] = None,
                     model: Annotated[str | None, MODEL] = None,
                     since: Annotated[float | None, Query(description="epoch seconds; default: the last hour")] = None,
                     bucket_s: Annotated[float, Query(ge=1, le=86_400)] = 60.0) -> dict:
    """Latency percentiles (merged histograms, not averages of percentiles), error rate, CPU and memory per time
    bucket over a cohort; with ``rollout``, also its devices' update timings."""
    since = since if since is not None else time.time() - 3600
    q = select(TelemetryWindow).where(TelemetryWindow.window_end >= since)
    devices: list[str] | None = None
    if rollout is not None:
        devices = list(session.exec(select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout)))
    if profile is not None:
        with_profile = set(session.exec(select(Device.id).where(Device.profile == profile)))
        devices = [d for d in devices if d in with_profile] if devices is not None else list(with_profile)
    if devices is not None:
        q = q.where(TelemetryWindow.device_id.in_(devices))  # type: ignore[attr-defined]
    if model_version is not None:
        q = q.where(TelemetryWindow.model_version == model_version)
    q = _of_model(q, model)
    rows = session.exec(q.order_by(TelemetryWindow.window_end.desc()).limit(MAX_WINDOWS)).all()  # type: ignore[union-attr]
    buckets: dict[int, list[TelemetryWindow]] = {}
    for w in rows:
        buckets.setdefault(int(w.window_end // bucket_s), []).append(w)
    series = []
    for key in sorted(buckets):
        ws = buckets[key]
        requests, errors = sum(w.requests for w in ws), sum(w.errors for w in ws)
        cpu = [w.cpu_percent for w in ws if w.cpu_percent is not None]
        rss = [w.rss_mb for w in ws if w.rss_mb is not None]
        series.append({"start": key * bucket_s, "devices": len({w.device_id for w in ws}), "requests": requests,
                       "errors": errors, "error_rate": errors / requests if requests else None,
                       "cpu_percent_mean": float(np.mean(cpu)) if cpu else None,
                       "rss_mb_max": max(rss) if rss else None, **_percentiles(latency_histogram(w) for w in ws)})
    out: dict = {"windows": len(rows), "truncated": len(rows) == MAX_WINDOWS, "bucket_s": bucket_s,
                 "series": series}
    if rollout is not None:
        timings: dict[str, list[float]] = {}
        for m in session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout)):
            for k, v in (m.timings or {}).items():
                timings.setdefault(k, []).append(float(v))
        out["update_timings_ms"] = {k: {"n": len(v), "p50": float(np.percentile(v, 50)),
                                        "p95": float(np.percentile(v, 95)), "max": max(v)}
                                    for k, v in sorted(timings.items())}
    return out


@router.get("/ingest/stats")
def ingest_stats(request: Request, _: Viewer) -> dict[str, int]:
    """This server process's ingest counters: messages by kind, invalid, refused, duplicates, dropped."""
    return dict(request.app.state.ingest.counts)
