"""Read-only aggregates the console needs and the resource API does not answer in one call: who is signed in, the
fleet's counts, a device page with an id search, a device's telemetry as chart series, its update history and
drift, a rollout selector's preview, and a model version's artifacts with their reports and jobs.

Every action the console takes (create, pause, abort, register, revoke…) goes through the resource routes, so it is
authorised and audited exactly as a REST client's; nothing here writes."""

from __future__ import annotations

import json
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import String, cast, func, type_coerce
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.types import NullType
from sqlmodel import Session, select

from fleet_server import drift
from fleet_server.artifacts import ArtifactError
from fleet_server.auth import SessionDep, Viewer
from fleet_server.labels import model_of
from fleet_server.limits import MAX_OFFSET
from fleet_server.models import (
    ConversionJob,
    ConversionPart,
    ConvertedArtifact,
    Device,
    DeviceModel,
    DriftAlert,
    ModelVersion,
    Rollout,
    RolloutDevice,
    TelemetryWindow,
)
from fleet_server.rollouts.engine import releasable
from fleet_server.routes.devices import _RAW_COLUMNS, TAG, _item_json, _public, runs, with_models
from fleet_server.routes.rollouts import GatesIn, StrategyIn
from fleet_server.routes.rollouts import _public as rollout_public

router = APIRouter(prefix="/v1/console", tags=["console"])
MAX_SERIES_WINDOWS = 100_000  # a week of one-minute windows is 10,080
REPORT_BYTES_MAX = 256 * 1024  # a conversion report shown in the console
NAME = Query(max_length=64)  # a profile, a version label or a model name, as the columns hold them
SELECTOR_ITEMS_MAX = 100  # profiles or tags in a selector preview (a device list may be long: 10,000 ids)


@router.get("/me")
def who_am_i(principal: Viewer) -> dict:
    """The signed-in token's name and role (the console enables the actions that role may take)."""
    return {"name": principal.name, "role": principal.role.value}


@router.get("/fleet")
def fleet_summary(session: SessionDep, _: Viewer) -> dict:
    """Counts by state, profile and running version (group-bys: one pass over the device table's indexes)."""
    live = Device.decommissioned_at.is_(None)  # type: ignore[union-attr]
    online = dict(session.exec(select(Device.online, func.count()).where(live).group_by(Device.online)).all())
    profiles = dict(session.exec(select(Device.profile, func.count()).where(live).group_by(Device.profile)).all())
    versions = _version_counts(session)
    alerts = session.exec(select(func.count()).select_from(DriftAlert).where(DriftAlert.open == True)).one()  # noqa: E712
    running = session.exec(select(Rollout).where(Rollout.state.in_(("running", "paused")))  # type: ignore[attr-defined]
                           .order_by(Rollout.id.desc()).limit(20)).all()  # type: ignore[union-attr]
    return {"total": sum(online.values()), "online": online.get(True, 0), "offline": online.get(False, 0),
            "profiles": profiles, "versions": versions, "open_alerts": alerts,
            "rollouts": [rollout_public(session, r).model_dump() for r in running]}


def _version_counts(session) -> dict[str, int]:
    """Live devices per running label, one count per model: a device with two models counts under both labels, and
    one that runs no model under "none"."""
    device, model = Device.__table__, DeviceModel.__table__  # type: ignore[attr-defined]
    live = device.c.decommissioned_at.is_(None)
    counts = dict(session.connection().execute(
        sa_select(model.c.active_version, func.count()).join(device, device.c.id == model.c.device_id)
        .where(live, model.c.active_version.is_not(None)).group_by(model.c.active_version)).all())
    none = session.connection().execute(sa_select(func.count()).select_from(device)
                                        .where(live, ~runs(device))).scalar_one()
    return {**counts, "none": none} if none else counts


@router.get("/tags")
def fleet_tags(session: SessionDep, _: Viewer) -> list[str]:
    """Every tag in use (for the filter's suggestions); tags are a JSON column, so read as text and parsed."""
    seen: set[str] = set()
    for (raw,) in session.connection().execute(sa_select(type_coerce(Device.__table__.c.tags, NullType()))  # type: ignore[attr-defined]
                                               .where(Device.__table__.c.decommissioned_at.is_(None)).distinct()):  # type: ignore[attr-defined]
        seen.update(json.loads(raw) if isinstance(raw, str) else raw or [])
    return sorted(seen)[:1000]


@router.get("/devices")
async def device_page(_: Viewer, request: Request, profile: Annotated[str | None, NAME] = None,
                      tag: Annotated[str | None, NAME] = None,
                      version: Annotated[str | None, Query(max_length=128)] = None, online: bool | None = None,
                      q: Annotated[str | None, Query(max_length=64, description="id contains")] = None,
                      offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                      limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Response:
    """Devices filtered as the fleet table asks (one tag, an id substring), in the /v1/devices page format."""
    if tag is not None and not TAG.match(tag):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid tag: letters, digits and ._:=-")
    body = await run_in_threadpool(_filtered_page, request.app.state.engine, profile=profile, tag=tag,
                                   version=version, online=online, q=q, offset=offset, limit=limit)
    return Response(body, media_type="application/json")


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filtered_page(engine: Engine, *, profile, tag, version, online, q, offset: int, limit: int) -> bytes:
    table = Device.__table__  # type: ignore[attr-defined]
    conditions = [table.c.decommissioned_at.is_(None)]
    if profile:
        conditions.append(table.c.profile == profile)
    if online is not None:
        conditions.append(table.c.online == online)
    if version:  # any of the device's models runs it; "none": none of them runs anything
        conditions.append(runs(table, label=version) if version != "none" else ~runs(table))
    if q:
        conditions.append(table.c.id.like(f"%{_like_escaped(q)}%", escape="\\"))
    if tag:  # JSON text holds each tag quoted: a LIKE on the quoted tag is exact (tags cannot hold quotes)
        conditions.append(cast(table.c.tags, String).like(f'%"{_like_escaped(tag)}"%', escape="\\"))
    with engine.connect() as conn:  # the same columns and JSON as GET /v1/devices (its serialisers, reused)
        total = conn.execute(sa_select(func.count()).select_from(table).where(*conditions)).scalar_one()
        items = with_models(conn, [_public(r) for r in conn.execute(sa_select(*_RAW_COLUMNS).where(*conditions)
                                                                   .order_by(table.c.id).offset(offset).limit(limit))])
    return (f'{{"total":{total},"offset":{offset},"limit":{limit},"items":['
            + ",".join(map(_item_json, items)) + "]}").encode()


@router.get("/devices/{device_id}/series")
def device_series(device_id: str, session: SessionDep, _: Viewer,
                  since: Annotated[float | None, Query(description="epoch seconds; default: a day ago")] = None,
                  points: Annotated[int, Query(ge=10, le=2000)] = 300) -> dict:
    """The device's telemetry over time in at most ``points`` buckets: p50/p99 from merged histograms (not averages
    of percentiles), error rate, CPU, RSS and temperature (when the windows carry it)."""
    if session.get(Device, device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id}")
    since = since if since is not None else time.time() - 86_400
    table = TelemetryWindow.__table__  # type: ignore[attr-defined]
    columns = [table.c.window_end, table.c.requests, table.c.errors, table.c.cpu_percent, table.c.rss_mb,
               type_coerce(table.c.latency_counts, NullType()), table.c.model_version, table.c.temperature_c]
    rows = session.connection().execute(
        sa_select(*columns)
        .where(table.c.device_id == device_id, table.c.window_end >= since)
        .order_by(table.c.window_end).limit(MAX_SERIES_WINDOWS)).all()
    return {"device_id": device_id, "since": since, "windows": len(rows), "series": bucket_series(rows, points)}


def bucket_series(rows, points: int) -> list[dict]:
    """Rows (window_end, requests, errors, cpu, rss, latency counts as JSON, version, temperature) → buckets."""
    if not rows:
        return []
    from fleet_protocol.messages import LATENCY_EDGES_MS

    edges = np.asarray(LATENCY_EDGES_MS)
    ends = np.fromiter((r[0] for r in rows), float, len(rows))
    span = max(ends[-1] - ends[0], 1.0)
    keys = np.minimum(((ends - ends[0]) / span * points).astype(int), points - 1)
    out = []
    for key in np.unique(keys):
        chosen = [rows[i] for i in np.flatnonzero(keys == key)]
        out.append(_bucket(chosen, edges))
    return out


def _bucket(rows, edges: np.ndarray) -> dict:
    requests, errors = sum(r[1] for r in rows), sum(r[2] for r in rows)
    counts = np.zeros(len(edges) - 1)
    for r in rows:
        c = json.loads(r[5]) if isinstance(r[5], str) else r[5]
        if c and len(c) == len(counts):
            counts += c
    cpu = [r[3] for r in rows if r[3] is not None]
    rss = [r[4] for r in rows if r[4] is not None]
    temps = [r[7] for r in rows if r[7] is not None]
    return {"t": rows[-1][0], "requests": requests, "errors": errors,
            "error_rate": errors / requests if requests else None,
            "p50_ms": _quantile(edges, counts, 0.5), "p99_ms": _quantile(edges, counts, 0.99),
            "cpu_percent": float(np.mean(cpu)) if cpu else None, "rss_mb": max(rss) if rss else None,
            "temperature_c": float(np.mean(temps)) if temps else None, "version": rows[-1][6]}


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float | None:
    """As rollouts.gates.quantile (linear within the bin), vectorised for many buckets."""
    n = counts.sum()
    if n == 0:
        return None
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, q * n))
    before = cum[i - 1] if i else 0.0
    share = (q * n - before) / counts[i] if counts[i] else 0.0
    return round(float(edges[i] + (edges[i + 1] - edges[i]) * min(max(share, 0.0), 1.0)), 4)


@router.get("/devices/{device_id}/history")
def device_history(device_id: str, session: SessionDep, _: Viewer) -> list[dict]:
    """Every rollout that included the device, newest first: the outcome, its reason code, delivery and timings."""
    rows = session.exec(select(RolloutDevice, Rollout, ModelVersion)
                        .where(RolloutDevice.device_id == device_id, RolloutDevice.rollout_id == Rollout.id,
                               Rollout.model_version_id == ModelVersion.id)
                        .order_by(RolloutDevice.id.desc()).limit(200)).all()  # type: ignore[union-attr]
    return [{"rollout_id": r.id, "rollout": r.name, "model": mv.name, "version": mv.version, "status": m.status,
             "reason": m.reason, "detail": m.detail, "delivery": m.delivery, "bytes_offered": m.bytes_offered,
             "offered_at": m.offered_at, "finished_at": m.finished_at, "timings": m.timings} for m, r, mv in rows]


@router.get("/devices/{device_id}/drift")
def device_drift(device_id: str, session: SessionDep, _: Viewer,
                 window_s: Annotated[float, Query(ge=1, le=30 * 86400)] = 3600.0) -> dict:
    """PSI per input of this device's recent inputs against the calibration data of the version it runs, for each
    of its models (``models``, by name; the top-level fields are the first one's)."""
    device = session.get(Device, device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id}")
    windows = session.exec(select(TelemetryWindow).where(TelemetryWindow.device_id == device_id,
                                                         TelemetryWindow.window_end >= time.time() - window_s)
                           .order_by(TelemetryWindow.window_end.desc()).limit(5000)).all()  # type: ignore[union-attr]
    newest: dict[str, str] = {}  # model name → the newest label it reported (windows come newest first)
    for w in windows:
        if (name := model_of(w.model_version)) is not None and " " in w.model_version:
            newest.setdefault(name, w.model_version)
    models = [_drift_of(session, label, windows) for _, label in sorted(newest.items())]
    first = models[0] if models else {"model_version": None, "windows": 0, "inputs": {}}
    return {**first, "windows": len(windows), "models": models}


def _drift_of(session: Session, label: str, windows: list[TelemetryWindow]) -> dict:
    name, version = label.rsplit(" ", 1)
    mv = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    mine = [w for w in windows if w.model_version == label]
    observed = [s for w in mine for s in w.inputs if not str(s.get("name", "")).startswith("out/")]
    return {"model_version": label, "windows": len(mine),
            "inputs": drift.compare(mv.reference_stats, observed) if mv and mv.reference_stats else {}}


@router.get("/selector-preview")
def selector_preview(session: SessionDep, _: Viewer, model: Annotated[str | None, NAME] = None,
                     version: Annotated[str | None, NAME] = None,
                     profile: Annotated[list[str] | None, Query(max_length=SELECTOR_ITEMS_MAX)] = None,
                     tag: Annotated[list[str] | None, Query(max_length=SELECTOR_ITEMS_MAX)] = None,
                     device: Annotated[list[str] | None, Query(max_length=10_000)] = None) -> dict:
    """How many devices a rollout selector matches, per profile, and which of those profiles the version has no
    releasable artifact for (those devices would be skipped)."""
    if any(len(v) > 64 for v in (*(profile or ()), *(device or ()))) or any(not TAG.match(t) for t in tag or ()):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "profiles and ids ≤ 64 characters; tags: "
                                                                   "letters, digits and ._:=-")
    table = Device.__table__  # type: ignore[attr-defined]
    conditions = [table.c.decommissioned_at.is_(None)]
    if profile:
        conditions.append(table.c.profile.in_(profile))
    if device:
        conditions.append(table.c.id.in_(device))
    for t in tag or []:
        conditions.append(cast(table.c.tags, String).like(f'%"{_like_escaped(t)}"%', escape="\\"))
    by_profile = dict(session.connection().execute(sa_select(table.c.profile, func.count()).where(*conditions)
                                                   .group_by(table.c.profile)).all())
    artifacts: set[str] | None = None
    if model and version:
        mv = session.exec(select(ModelVersion).where(ModelVersion.name == model,
                                                     ModelVersion.version == version)).first()
        artifacts = set(releasable(session, mv.id)) if mv and mv.id else set()
    return {"matches": sum(by_profile.values()), "by_profile": by_profile,
            "releasable_profiles": sorted(artifacts) if artifacts is not None else None,
            "without_artifact": sorted(p for p in by_profile if artifacts is not None and p not in artifacts)}


@router.get("/rollout-defaults")
def rollout_defaults(_: Viewer) -> dict:
    """The create form's starting values: the API's own defaults (so the form and a REST client agree), and the
    gates an operator usually turns on, suggested but left off (they judge only once telemetry arrives)."""
    return {"strategy": StrategyIn().model_dump(), "gates": GatesIn().model_dump(), "on_gate_failure": "pause",
            "suggested": {"max_p99_ratio": 1.5, "max_error_rate": 0.05, "min_fidelity": 0.99, "soak_s": 300}}


@router.get("/models/{name}/{version}")
def model_detail(name: str, version: str, request: Request, session: SessionDep, _: Viewer) -> dict:
    """A version's conversion jobs and artifacts, each artifact with its conversion report (size ratio, fidelity,
    float nodes, latency) read from the artifact store."""
    mv = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if mv is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name} {version}")
    jobs = session.exec(select(ConversionJob).where(ConversionJob.model_version_id == mv.id)
                        .order_by(ConversionJob.id.desc())).all()  # type: ignore[union-attr]
    arts = session.exec(select(ConvertedArtifact).where(ConvertedArtifact.model_version_id == mv.id)
                        .order_by(ConvertedArtifact.id)).all()  # type: ignore[arg-type]
    parts: dict[int, list[dict]] = {}
    if jobs:
        for p in session.exec(select(ConversionPart).where(ConversionPart.job_id.in_([j.id for j in jobs]))  # type: ignore[attr-defined]
                              .order_by(ConversionPart.id)).all():  # type: ignore[arg-type]
            parts.setdefault(p.job_id, []).append(p.model_dump(mode="json"))
    store = request.app.state.artifacts
    return {"model": mv.model_dump(mode="json", exclude={"reference_stats"}),
            "jobs": [{**j.model_dump(mode="json", exclude={"log"}), "parts": parts.get(j.id, [])} for j in jobs],
            "artifacts": [{**a.model_dump(mode="json"), "report": _report(store, a.report_sha256)} for a in arts]}


def _report(store, sha: str) -> dict | None:
    try:
        if not store.exists(sha) or store.size(sha) > REPORT_BYTES_MAX:
            return None
        report = json.loads(store.read_bytes(sha))
    except (OSError, ValueError, ArtifactError):  # a report that is gone or not JSON: shown as absent
        return None
    return report if isinstance(report, dict) else None
