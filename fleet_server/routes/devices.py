"""Enrollment tokens (admin), device enrollment (with an enrollment token, no API token), and the devices API."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField
from sqlalchemy import func, type_coerce
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import NullType
from sqlmodel import select

from firmware_profiles import ProfileError, builtin_profile_ids, load_profile
from fleet_protocol import config
from fleet_protocol.windows import Window
from fleet_server import keys, remote_config
from fleet_server.auth import (
    Admin,
    Operator,
    SessionDep,
    Viewer,
    audit,
    current_request_audit,
    hash_secret,
    new_secret,
)
from fleet_server.broker import mosquitto_hash
from fleet_server.limits import MAX_OFFSET
from fleet_server.models import (
    DesiredConfig,
    Device,
    DeviceConfig,
    DeviceModel,
    DeviceModelPublic,
    DevicePatch,
    DevicePublic,
    EnrollmentToken,
    EnrollmentTokenCreate,
    EnrollmentTokenIssued,
    EnrollRequest,
    EnrollResponse,
    Page,
    TagWindows,
    utcnow,
)
from fleet_server.pki import FleetCA, PKIError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["devices"])
# A device's id is dev-<the first 16 hex digits of its signing key> (every id so far); a longer prefix only when
# another key took the shorter id. 60 digits fill Device.id's 64 characters.
ID_KEY_DIGITS = (16, 32, 60)
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$")


def _check_tags(tags: list[str]) -> list[str]:
    bad = [t for t in tags if not TAG.match(t)]
    if bad:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"invalid tag(s) {bad[:3]}: letters, digits and ._:=-")
    return sorted(set(tags))


def _check_profile(profile: str) -> str:
    if profile not in builtin_profile_ids():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"unknown hardware profile {profile!r}; known: {', '.join(builtin_profile_ids())}")
    try:
        load_profile(profile)
    except ProfileError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
    return profile


@router.post("/enrollment-tokens", status_code=status.HTTP_201_CREATED, response_model=EnrollmentTokenIssued)
def create_enrollment_token(body: EnrollmentTokenCreate, session: SessionDep, admin: Admin):
    if body.profile is not None:
        _check_profile(body.profile)
    token = new_secret("efe_")
    row = EnrollmentToken(token_hash=hash_secret(token), expires_at=utcnow() + timedelta(seconds=body.expires_in_s),
                          max_uses=body.max_uses, profile=body.profile, tags=_check_tags(body.tags),
                          created_by=admin.name)
    session.add(row)
    session.commit()
    session.refresh(row)
    audit(session, actor=admin.name, action="enrollment_token.create", target=f"enrollment_token:{row.id}")
    return EnrollmentTokenIssued(id=row.id, token=token, expires_at=row.expires_at, max_uses=row.max_uses,
                                 profile=row.profile, tags=row.tags)


@router.post("/enroll", status_code=status.HTTP_201_CREATED, response_model=EnrollResponse)
def enroll(body: EnrollRequest, request: Request, session: SessionDep):
    """A device presents an enrollment token and its public keys; it gets its id, MQTT credentials, trust root."""
    row = session.exec(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_secret(body.token))
                       .with_for_update()).first()
    now = utcnow()
    problem = None
    if row is None or row.revoked_at is not None:
        problem = "unknown or revoked enrollment token"
    elif row.expires_at.replace(tzinfo=row.expires_at.tzinfo or UTC) <= now:
        problem = "enrollment token expired"
    elif row.uses >= row.max_uses:
        problem = "enrollment token exhausted"
    if problem:
        _audit_refused_enrollment(request, session, problem)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, problem)
    profile = _check_profile(body.profile or row.profile or "")
    if row.profile and body.profile and body.profile != row.profile:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"this enrollment token is for profile {row.profile!r}")
    if session.exec(select(Device).where(Device.signing_public_key == body.signing_public_key)).first():
        audit(session, actor="device", action="device.enroll", outcome="denied", status_code=409,
              detail="signing key already enrolled")
        raise HTTPException(status.HTTP_409_CONFLICT, "a device with this signing key is already enrolled")
    settings = request.app.state.settings
    device_id = _free_device_id(session, body.signing_public_key)
    if device_id is None:
        audit(session, actor="device", action="device.enroll", outcome="denied", status_code=409,
              detail="every device id this signing key gives is taken")
        raise HTTPException(status.HTTP_409_CONFLICT, "every device id this signing key gives is taken by devices "
                                                      "with other keys: enroll with a new key")
    ca = _fleet_ca(settings.pki_folder, required=body.client_csr is not None)
    issued = None
    if body.client_csr is not None:
        try:
            issued = ca.sign_client(body.client_csr, device_id)
        except PKIError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
    password = new_secret("", 24)
    device = Device(id=device_id, profile=profile, tags=_check_tags([*row.tags, *body.tags]),
                    agent_version=body.agent_version, signing_public_key=body.signing_public_key,
                    x25519_public_key=body.x25519_public_key, mqtt_password_hash=mosquitto_hash(password),
                    client_cert_serial=f"{issued.serial:x}" if issued else None, enrollment_token_id=row.id)
    row.uses += 1
    session.add(device)
    session.add(row)
    try:
        session.commit()
    except IntegrityError as e:  # a concurrent enrollment took this id or key; the error text holds the new row
        session.rollback()
        log.warning("enrollment conflicted with a concurrent one", extra={"ctx": {"device_id": device_id}})
        raise HTTPException(status.HTTP_409_CONFLICT, "another enrollment took this device id or signing key at the "
                                                      "same time: try again") from e
    request.app.state.broker_sync.sync(session)  # the new account works as soon as this answer arrives
    audit(session, actor=f"device:{device_id}", action="device.enroll", target=f"device:{device_id}")
    if remote_config.effective(session, device):
        send_config(request, session, [device])  # its tags' settings, retained for its first connection
    try:
        root = keys.pinned_root(settings.data_dir).decode()
    except keys.KeysError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from e
    return EnrollResponse(device_id=device_id, profile=profile, mqtt_username=device_id, mqtt_password=password,
                          broker_url=settings.device_broker_url or settings.broker_url, trust_root=root,
                          broker_ca=ca.cert_pem.decode() if ca else None,
                          client_cert=issued.cert_pem.decode() if issued else None)


def _audit_refused_enrollment(request: Request, session, problem: str) -> None:
    """Unauthenticated, like any 401: at most a few rows a minute per client address (the rest are counted)."""
    current = current_request_audit()
    if request.app.state.audit_limiter.admit(current.source if current else ""):
        audit(session, actor="device", action="device.enroll", outcome="denied", status_code=401, detail=problem)


def _free_device_id(session, signing_key: str) -> str | None:
    """The shortest id from the key that no other device holds (the caller checked that the key is not enrolled)."""
    for digits in ID_KEY_DIGITS:
        candidate = f"dev-{signing_key[:digits]}"
        if session.get(Device, candidate) is None:
            return candidate
    return None


def _fleet_ca(folder, *, required: bool) -> FleetCA | None:
    """The fleet CA, loaded per enrollment (rare; a rotated CA is picked up without a restart)."""
    if not FleetCA.exists(folder):
        if required:
            raise HTTPException(status.HTTP_409_CONFLICT, "this server issues no client certificates: it has no "
                                                          "fleet CA (fleet-server pki init)")
        return None
    try:
        return FleetCA.load(folder)
    except PKIError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from e


_PUBLIC = [name for name in DevicePublic.model_fields if name != "models"]  # models: from device_model
_DATETIMES = {"enrolled_at", "decommissioned_at", "last_seen"}
# The driver's own values, no SQLAlchemy result processing: its SQLite JSON and DateTime processors cost more than
# the query. SQLite then gives text (converted below); psycopg gives lists and datetimes.
_RAW_COLUMNS = [type_coerce(Device.__table__.c[name], NullType()).label(name)  # type: ignore[attr-defined]
                for name in _PUBLIC]
_MODEL_FIELDS = list(DeviceModelPublic.model_fields)  # name first: the table's ``model`` column
_MODEL_TABLE = DeviceModel.__table__  # type: ignore[attr-defined]
_RAW_MODEL_COLUMNS = [_MODEL_TABLE.c.device_id, _MODEL_TABLE.c.model,
                      *(type_coerce(_MODEL_TABLE.c[name], NullType()) for name in _MODEL_FIELDS[1:])]


def _iso(value: datetime | str | None) -> str | None:
    """A stored UTC time as ISO 8601 with Z (as DevicePublic answers), from a datetime or SQLite's
    'YYYY-MM-DD HH:MM:SS[.ffffff]'."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.replace(" ", "T", 1) + "Z"
    return (value.astimezone(UTC) if value.tzinfo else value).replace(tzinfo=None).isoformat() + "Z"


def _public(row) -> dict:
    d = dict(zip(_PUBLIC, row, strict=True))
    for name in _DATETIMES:
        d[name] = _iso(d[name])
    d["online"] = bool(d["online"])
    return d


def models_by_device(conn, device_ids: list[str]) -> dict[str, list[dict]]:
    """Each device's named models (as DevicePublic.models answers them), by name: one query for a page of devices."""
    out: dict[str, list[dict]] = {}
    if not device_ids:
        return out
    for device_id, *values in conn.execute(sa_select(*_RAW_MODEL_COLUMNS)
                                           .where(_MODEL_TABLE.c.device_id.in_(device_ids))
                                           .order_by(_MODEL_TABLE.c.device_id, _MODEL_TABLE.c.model)):
        model = dict(zip(_MODEL_FIELDS, values, strict=True))
        model["updated_at"] = _iso(model["updated_at"])
        out.setdefault(device_id, []).append(model)
    return out


def with_models(conn, items: list[dict]) -> list[dict]:
    """A page's items with their ``models`` (an empty list for a device that reported none)."""
    models = models_by_device(conn, [d["id"] for d in items])
    for d in items:
        d["models"] = models.get(d["id"], [])
    return items


def runs(table, *, label: str | None = None, model: str | None = None):
    """EXISTS over a device's models (``table``: the device table in the outer query): one of them runs ``label``,
    or is named ``model``; with neither, one of them runs any version at all."""
    which = [_MODEL_TABLE.c.device_id == table.c.id]
    if label is not None:
        which.append(_MODEL_TABLE.c.active_version == label)
    if model is not None:
        which.append(_MODEL_TABLE.c.model == model)
    if label is None and model is None:
        which.append(_MODEL_TABLE.c.active_version.is_not(None))
    return sa_select(_MODEL_TABLE.c.device_id).where(*which).exists()


def model_conditions(table, *, model_version: str | None = None, model: str | None = None) -> list:
    """The device list's model filters: a device matches when ANY of its models runs ``model_version`` (a label),
    and when one is named ``model``."""
    return [*([runs(table, label=model_version)] if model_version else []),
            *([runs(table, model=model)] if model else [])]


def _item_json(d: dict) -> str:
    """One device as JSON. SQLite's tags are already JSON text (written by us, from a validated list): spliced in
    as they are rather than parsed and re-encoded."""
    tags = d.pop("tags")
    return _dumps(d)[:-1] + ',"tags":' + (tags if isinstance(tags, str) else _dumps(tags)) + "}"


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _device_page(engine: Engine, *, profile: str | None, tags: list[str] | None, online: bool | None,
                 model_version: str | None, model: str | None, include_decommissioned: bool, offset: int,
                 limit: int) -> bytes:
    """One page of devices as JSON bytes: a Core select of the public columns (no ORM objects), serialised once.

    This is the hottest read of the API; hydrating 100 ORM rows and re-validating them through the response model
    cost several times more than the query itself."""
    table = Device.__table__  # type: ignore[attr-defined]
    conditions = []
    if profile:
        conditions.append(table.c.profile == profile)
    if online is not None:
        conditions.append(table.c.online == online)
    conditions += model_conditions(table, model_version=model_version, model=model)
    if not include_decommissioned:
        conditions.append(table.c.decommissioned_at.is_(None))
    with engine.connect() as conn:
        if tags:  # JSON tags: filtered here so SQLite and PostgreSQL agree
            wanted = set(tags)
            items = [d for d in map(_public, conn.execute(sa_select(*_RAW_COLUMNS).where(*conditions)
                                                          .order_by(table.c.id)))
                     if wanted <= set(json.loads(d["tags"]) if isinstance(d["tags"], str) else d["tags"])]
            total, items = len(items), items[offset:offset + limit]
        else:
            total = conn.execute(sa_select(func.count()).select_from(table).where(*conditions)).scalar_one()
            items = [_public(r) for r in conn.execute(sa_select(*_RAW_COLUMNS).where(*conditions)
                                                     .order_by(table.c.id).offset(offset).limit(limit))]
        with_models(conn, items)
    return (f'{{"total":{total},"offset":{offset},"limit":{limit},"items":['
            + ",".join(map(_item_json, items)) + "]}").encode()


LABEL_FILTER = Query(max_length=128, description='devices any of whose models runs this label: "detector 1.2.0"')
MODEL_FILTER = Query(max_length=64, description="devices that run a model of this name")


@router.get("/devices", response_model=Page)
async def list_devices(_: Viewer, request: Request,
                       profile: str | None = None, tag: Annotated[list[str] | None, Query()] = None,
                       online: bool | None = None,
                       model_version: Annotated[str | None, LABEL_FILTER] = None,
                       model: Annotated[str | None, MODEL_FILTER] = None,
                       include_decommissioned: bool = False,
                       offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                       limit: Annotated[int, Query(ge=1, le=500)] = 100) -> Response:
    """Devices, filtered, ordered by id, each with its named models. Tags filter with AND (every given tag must be
    present)."""
    body = await run_in_threadpool(_device_page, request.app.state.engine, profile=profile, tags=tag, online=online,
                                   model_version=model_version, model=model,
                                   include_decommissioned=include_decommissioned, offset=offset, limit=limit)
    return Response(body, media_type="application/json")


def _device(session, device_id: str) -> Device:
    d = session.get(Device, device_id)
    if d is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id}")
    return d


def _device_public(session, d: Device) -> DevicePublic:
    models = models_by_device(session.connection(), [d.id]).get(d.id, [])
    return DevicePublic.model_validate({**d.model_dump(include=set(_PUBLIC)), "models": models})


@router.get("/devices/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, _: Viewer):
    return _device_public(session, _device(session, device_id))


@router.patch("/devices/{device_id}", response_model=DevicePublic)
def patch_device(device_id: str, body: DevicePatch, request: Request, session: SessionDep, op: Operator):
    d = _device(session, device_id)
    retag = body.tags is not None and _check_tags(body.tags) != d.tags
    if body.tags is not None:
        d.tags = _check_tags(body.tags)
    session.add(d)
    session.commit()
    session.refresh(d)
    if retag and (remote_config.effective(session, d) or session.get(DeviceConfig, d.id)):
        send_config(request, session, [d])  # its tags' settings changed with its tags
    public = _device_public(session, d)
    audit(session, actor=op.name, action="device.update", target=f"device:{device_id}")
    return public


@router.post("/devices/{device_id}/decommission", response_model=DevicePublic)
def decommission(device_id: str, request: Request, session: SessionDep, admin: Admin):
    """Revokes the device's credentials: its MQTT password stops working and its messages are refused."""
    d = _device(session, device_id)
    if d.decommissioned_at is None:
        d.decommissioned_at = utcnow()
        d.mqtt_password_hash = "!revoked"  # matches no password; the broker files leave the device out anyway
        d.online = False
        session.add(d)
        session.commit()
        session.refresh(d)
        request.app.state.broker_sync.sync(session)  # locked out of the broker now, not at the next reload
    public = _device_public(session, d)
    audit(session, actor=admin.name, action="device.decommission", target=f"device:{device_id}")
    return public


# ----------------------------------------------------------------------------- maintenance windows of a tag


class TagWindowsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    windows: list[Window] = PField(max_length=16, description="cron (5 fields, in tz) + duration_s; [] removes them")


class TagWindowsPublic(TagWindowsBody):
    tag: str
    updated_by: str = ""
    updated_at: datetime | None = None


@router.get("/tags/{tag}/windows", response_model=TagWindowsPublic)
def get_tag_windows(tag: str, session: SessionDep, _: Viewer):
    row = session.get(TagWindows, _check_tags([tag])[0])
    if row is None:
        return TagWindowsPublic(tag=tag, windows=[])
    return TagWindowsPublic(tag=row.tag, windows=row.windows, updated_by=row.updated_by, updated_at=row.updated_at)


@router.put("/tags/{tag}/windows", response_model=TagWindowsPublic)
def put_tag_windows(tag: str, body: TagWindowsBody, session: SessionDep, op: Operator):
    """A site's maintenance windows: devices with this tag switch to a new model only inside one of them. Applies to
    offers made from now on (an offer carries its windows, signed)."""
    tag = _check_tags([tag])[0]
    row = session.get(TagWindows, tag)
    if not body.windows:
        if row is not None:
            session.delete(row)
    else:
        row = row or TagWindows(tag=tag)
        row.windows, row.updated_by, row.updated_at = [w.model_dump() for w in body.windows], op.name, utcnow()
        session.add(row)
    session.commit()
    audit(session, actor=op.name, action="tag.windows", target=f"tag:{tag}",
          detail="; ".join(f"{w.cron} for {w.duration_s} s ({w.tz})" for w in body.windows) or "removed")
    return get_tag_windows(tag, session, op)


# ----------------------------------------------------------------------------- remote configuration


class ConfigBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    settings: dict[str, bool | int | float | str | None] = PField(
        max_length=config.MAX_SETTINGS, description="fleet_protocol.config.SETTINGS; {} removes this scope's")


class ConfigStatus(BaseModel):
    device_id: str
    desired: dict
    desired_version: int
    reported_version: int
    applied: dict
    refused: dict
    reported_at: float | None
    in_sync: bool


class ScopeConfig(BaseModel):
    scope: str
    settings: dict
    devices_sent: int = 0


def _checked_settings(settings: dict) -> dict:
    ok, refused = config.split(settings)
    if refused:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            "; ".join(f"{k}: {why}" for k, why in sorted(refused.items())))
    return ok


def _store_scope(session, scope: str, settings: dict, actor: str) -> None:
    row = session.get(DesiredConfig, scope)
    if not settings:
        if row is not None:
            session.delete(row)
    else:
        row = row or DesiredConfig(scope=scope)
        row.settings, row.updated_by, row.updated_at = settings, actor, utcnow()
        session.add(row)
    session.commit()


def send_config(request: Request, session, devices) -> int:
    delivery = request.app.state.delivery
    return remote_config.send(session, devices, data_dir=request.app.state.settings.data_dir,
                              next_version=delivery.next_version,
                              publish=lambda t, p: request.app.state.link.publish(t, p, retain=True))


@router.get("/devices/{device_id}/config", response_model=ConfigStatus)
def get_device_config(device_id: str, session: SessionDep, _: Viewer):
    """What the device should run with (its tags' settings, then its own), and what it reported applying."""
    return remote_config.status(session, _device(session, device_id))


@router.put("/devices/{device_id}/config", response_model=ConfigStatus)
def put_device_config(device_id: str, body: ConfigBody, request: Request, session: SessionDep, op: Operator):
    """Signed and published retained: applied when the device is (or comes back) online; the last one wins."""
    d = _device(session, device_id)
    settings = _checked_settings(body.settings)
    _store_scope(session, remote_config.device_scope(d.id), settings, op.name)
    send_config(request, session, [d])
    audit(session, actor=op.name, action="device.config", target=f"device:{d.id}",
          detail=json.dumps(settings, sort_keys=True)[:1000])
    return remote_config.status(session, d)


@router.get("/tags/{tag}/config", response_model=ScopeConfig)
def get_tag_config(tag: str, session: SessionDep, _: Viewer):
    row = session.get(DesiredConfig, remote_config.tag_scope(_check_tags([tag])[0]))
    return ScopeConfig(scope=remote_config.tag_scope(tag), settings=row.settings if row else {})


@router.put("/tags/{tag}/config", response_model=ScopeConfig)
def put_tag_config(tag: str, body: ConfigBody, request: Request, session: SessionDep, op: Operator):
    """Settings for every device with the tag (a device's own settings win over its tags')."""
    tag = _check_tags([tag])[0]
    settings = _checked_settings(body.settings)
    _store_scope(session, remote_config.tag_scope(tag), settings, op.name)
    devices = [d for d in session.exec(select(Device).where(Device.decommissioned_at.is_(None)))  # type: ignore
               if tag in d.tags]
    sent = send_config(request, session, devices)
    audit(session, actor=op.name, action="tag.config", target=f"tag:{tag}",
          detail=json.dumps(settings, sort_keys=True)[:1000])
    return ScopeConfig(scope=remote_config.tag_scope(tag), settings=settings, devices_sent=sent)
