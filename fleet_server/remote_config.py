"""Remote configuration (issue 17, part 7), the server's side: desired settings per device or tag, each device's
effective document signed with the online key and published **retained** on its ``cfg`` topic (a device that is
offline gets the last one when it returns; versions only grow), and the device's report of what it applied.

Effective settings: the device's tags' documents in the tags' alphabetical order, then its own on top. The
database row is written before the message is published, as the rollout engine journals its offers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_protocol.metadata import ConfigSpec, build_config
from fleet_server import keys
from fleet_server.models import DesiredConfig, Device, DeviceConfig

CONFIG_TTL = timedelta(days=365)  # a device offline for longer refuses the retained document as expired
Publish = Callable[[str, bytes], object]


def device_scope(device_id: str) -> str:
    return f"device:{device_id}"


def tag_scope(tag: str) -> str:
    return f"tag:{tag}"


def effective(session: Session, device: Device) -> dict:
    scopes = [tag_scope(t) for t in sorted(device.tags)] + [device_scope(device.id)]
    rows = {r.scope: r.settings for r in session.exec(
        select(DesiredConfig).where(DesiredConfig.scope.in_(scopes)))}  # type: ignore[attr-defined]
    merged: dict = {}
    for scope in scopes:
        merged.update(rows.get(scope, {}))
    return merged


def send(session: Session, devices: Iterable[Device], *, data_dir, next_version: Callable[[], int],
         publish: Publish) -> int:
    """Sign and publish each device's effective settings (retained); the rows are committed first."""
    rows = []
    for device in devices:
        if device.decommissioned_at is not None:
            continue
        # The row locked first (PostgreSQL), then the settings read: of two concurrent changes the later-versioned
        # document is the one that read both. Versions also grow past the row's own, whichever replica signs.
        row = session.get(DeviceConfig, device.id, with_for_update=True) or DeviceConfig(device_id=device.id)
        row.desired = effective(session, device)
        row.desired_version = max(next_version(), row.desired_version + 1)
        rows.append(row)
    return _publish(session, rows, data_dir=data_dir, publish=publish)


def resend_lagging(session: Session, *, data_dir, publish: Publish, after_s: float, limit: int = 500) -> int:
    """Publish again, same version and settings, the document of each online device whose report lags what it
    was sent ``after_s`` ago: a publish lost between the commit and the broker (a crash, a dropped link) would
    otherwise leave the device out of sync until the next change. An agent that has it ignores it."""
    rows = session.exec(
        select(DeviceConfig).join(Device, Device.id == DeviceConfig.device_id)  # type: ignore[arg-type]
        .where(DeviceConfig.desired_version > DeviceConfig.reported_version,  # type: ignore[arg-type]
               Device.online == True, Device.decommissioned_at.is_(None),  # type: ignore[union-attr]  # noqa: E712
               (DeviceConfig.sent_at.is_(None)) | (DeviceConfig.sent_at < time.time() - after_s))  # type: ignore[union-attr,operator]
        .limit(limit)).all()
    return _publish(session, list(rows), data_dir=data_dir, publish=publish)


def _publish(session: Session, rows: list[DeviceConfig], *, data_dir, publish: Publish) -> int:
    """Sign each row's desired settings at its version, mark it sent, commit, then publish (retained)."""
    if not rows:
        return 0
    signer, expires, now = keys.online_signer(data_dir), datetime.now(UTC) + CONFIG_TTL, time.time()
    out = []
    for row in rows:
        spec = ConfigSpec(device=row.device_id, settings_json=json.dumps(row.desired, sort_keys=True))
        metadata = build_config(spec, [signer], version=row.desired_version, expires=expires)
        row.sent_at = now
        session.add(row)
        out.append((topics.topic(row.device_id, "cfg"), messages.ConfigOffer(metadata=metadata).to_bytes()))
    session.commit()
    for topic, payload in out:
        publish(topic, payload)
    return len(out)


def record_report(session: Session, device_id: str, m: messages.ConfigReport) -> bool:
    """Store a device's report unless a newer one is already there (the caller commits)."""
    row = session.get(DeviceConfig, device_id)
    if row is None or m.version < row.reported_version:
        return False
    row.reported_version, row.applied, row.refused, row.reported_at = m.version, dict(m.applied), \
        dict(m.refused), m.ts
    session.add(row)
    return True


def status(session: Session, device: Device) -> dict:
    row = session.get(DeviceConfig, device.id)
    desired = effective(session, device)
    if row is None:
        return {"device_id": device.id, "desired": desired, "desired_version": 0, "reported_version": 0,
                "applied": {}, "refused": {}, "reported_at": None, "in_sync": not desired}
    return {"device_id": device.id, "desired": desired, "desired_version": row.desired_version,
            "reported_version": row.reported_version, "applied": row.applied, "refused": row.refused,
            "reported_at": row.reported_at,
            "in_sync": row.reported_version == row.desired_version and row.desired == desired}
