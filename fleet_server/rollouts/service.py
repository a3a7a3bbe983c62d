"""Creating a rollout, written once: the operator's own rollouts and each arm of an A/B test go through here.

Checks first, then the row: the model version exists and has an artifact an agent can run, the strategy and gates
are ones the planner and the gates accept. Refusals are ``RolloutRefusedError`` subclasses; each carries the HTTP
status the API answers with, so the routes map them without knowing which check failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sqlmodel import Session, select

from fleet_server.auth import audit
from fleet_server.models import ModelVersion, Rollout, utcnow
from fleet_server.rollouts.engine import releasable, strategy_dict, strategy_of
from fleet_server.rollouts.gates import Gates
from fleet_server.rollouts.planner import RolloutState


class RolloutRefusedError(Exception):
    """A rollout that cannot be created as asked (the request's fault: never retried)."""

    status: ClassVar[int] = 422


class UnknownModelVersionError(RolloutRefusedError):
    status = 404


class NotReleasableError(RolloutRefusedError):
    status = 409


class InvalidPlanError(RolloutRefusedError):
    """A strategy or gates the planner or the gates refuse."""

    status = 422


@dataclass(frozen=True)
class Release:
    """What a rollout ships and how, every check passed."""

    model_version: ModelVersion
    model_version_id: int  # model_version.id, known to be stored
    strategy: dict  # as stored: planner.Strategy's fields
    gates: dict


def check_release(session: Session, *, model: str, version: str, strategy: dict, gates: dict) -> Release:
    """Every check a new rollout must pass, with no write: an A/B test checks both arms before it creates either."""
    mv = session.exec(select(ModelVersion).where(ModelVersion.name == model, ModelVersion.version == version)).first()
    if mv is None or mv.id is None:
        raise UnknownModelVersionError(f"no model version {model} {version}")
    if not releasable(session, mv.id):
        raise NotReleasableError(f"{model} {version} has no releasable artifact for any agent profile: convert it "
                                 "first")
    try:
        planned = strategy_of(strategy)
        Gates(**gates)
    except (TypeError, ValueError) as e:
        raise InvalidPlanError(str(e)) from e
    return Release(model_version=mv, model_version_id=mv.id, strategy=strategy_dict(planned), gates=dict(gates))


def create_rollout(session: Session, *, model: str, version: str, selector: dict, strategy: dict, gates: dict,
                   actor: str, name: str = "", on_gate_failure: str = "pause", encrypt: bool = False,
                   start: bool = False, retry_of: int | None = None) -> Rollout:
    """Check, then store a rollout (a draft, or running when ``start``) and audit it; the caller wakes the engine."""
    release = check_release(session, model=model, version=version, strategy=strategy, gates=gates)
    rollout = Rollout(name=name, model_version_id=release.model_version_id, selector=selector,
                      strategy=release.strategy, gates=release.gates, on_gate_failure=on_gate_failure,
                      encrypt=encrypt, created_by=actor, retry_of=retry_of)
    if start:
        rollout.state, rollout.started_at = RolloutState.RUNNING.value, utcnow()
    session.add(rollout)
    session.commit()
    session.refresh(rollout)
    audit(session, actor=actor, action="rollout.create", target=f"rollout:{rollout.id}",
          detail=f"{model} {version}{' started' if start else ''}"
                 f"{f' retrying rollout {retry_of}' if retry_of else ''}")
    return rollout
