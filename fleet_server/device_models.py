"""A device's named models (issue 17): what each of them runs, from the device's retained state reports.

Agents with several models list each in ``DeviceState.models``; agents from before send only the ``active_*`` fields
of their one model, whose name is its label's first word ("<name> <version>"). The decisions are pure (the rows a
report stands for, what an update of one model may be a delta from); the writer and reader around them are thin.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from fleet_protocol import messages
from fleet_server.labels import is_version_of, model_of
from fleet_server.models import DeviceModel


def reported(state: messages.DeviceState) -> tuple[messages.ModelState, ...]:
    """The models a state report describes: its list, or an older agent's one running model (none when that agent
    runs nothing yet, or labels it with no name the registry could hold)."""
    if state.models:
        return state.models
    name = model_of(state.active_version)
    if state.active_sha256 is None or name is None:
        return ()
    return (messages.ModelState(name=name, active_version=state.active_version, active_sha256=state.active_sha256,
                                active_slot=state.active_slot),)


def running_sha256s(state: messages.DeviceState) -> set[str]:
    """Every artifact the device serves now, in any of its models (the top-level one too: an older agent that sent
    no label still names its sha256)."""
    return {sha for sha in (state.active_sha256, *(m.active_sha256 for m in state.models)) if sha}


def delta_base(models: Mapping[str, str | None], *, model: str, active_version: str | None,
               active_sha256: str | None) -> str | None:
    """What an update of ``model`` may be a delta from on a device: what that model's slot runs there (``models``:
    the device's model name → sha256). A device that does not run ``model`` gets the full file, never a delta from
    another model's artifact. Only a device with no model rows at all (not heard from since the server learnt of
    several models) falls back to its one active model, and only when that is a version of ``model``."""
    if models:
        return models.get(model)
    return active_sha256 if is_version_of(active_version, model) else None


def replace(session: Session, states: Mapping[str, messages.DeviceState], *, now: datetime) -> int:
    """Each reporting device's rows become what it reported (a model it no longer lists is deleted): one DELETE and
    one executemany INSERT for the batch, in the caller's transaction. Returns the rows written.

    The INSERT updates a row that exists: shared subscriptions may hand two of one device's reports to two replicas at
    once, and PostgreSQL's DELETE does not see the rows a concurrent transaction inserts (a plain INSERT would then fail
    on the primary key, and its batch with it)."""
    rows = [{"device_id": device_id, "model": m.name, "active_version": m.active_version,
             "active_sha256": m.active_sha256, "active_slot": m.active_slot, "update_state": m.update_state.value,
             "job": m.job, "updated_at": now}
            for device_id, state in states.items() for m in reported(state)]
    table = DeviceModel.__table__  # type: ignore[attr-defined]
    connection = session.connection()
    connection.execute(delete(table).where(table.c.device_id.in_(list(states))))
    if rows:
        upsert = (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)(table)
        connection.execute(upsert.on_conflict_do_update(
            index_elements=["device_id", "model"],
            set_={c: upsert.excluded[c] for c in rows[0] if c not in ("device_id", "model")}), rows)
    return len(rows)


def sha256_by_model(session: Session, device_id: str) -> dict[str, str | None]:
    """The device's model name → the sha256 its active slot runs (empty when it reported no model)."""
    table = DeviceModel.__table__  # type: ignore[attr-defined]
    return dict(session.connection().execute(select(table.c.model, table.c.active_sha256)
                                             .where(table.c.device_id == device_id)).all())
