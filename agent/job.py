"""The update job in progress, typed: what the journal holds beside the state machine's snapshot, and how a step of
the job fails.

The journal record keeps the keys it always had (``job``, ``metadata`` and ``probe`` as base64, ``payload``, …), so a
journal written by an earlier agent resumes under this one. Steps fill in fields as they go (the payload chosen by
the fetch, the slot written by the stage); what they fill in is persisted with the next transition, and every step
is idempotent, so a step that is interrupted before that simply runs again.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Literal

from fleet_protocol.vocabulary import Reason


class StepFailed(Exception):
    """A step of the job failed for a reason the server should hear (and the job ends, never retried as is)."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Payload:
    """What the fetch downloads: a delta from the active artifact, or the full artifact (signed hash and length)."""

    kind: Literal["delta", "full"]
    sha256: str
    length: int
    path: str  # the signed path: the chunk requests' ``path``, and URL/<path> over HTTP


@dataclass
class Job:
    """One update (or an ordered rollback) from offer to report. ``Job()`` is "no job" (the idle journal)."""

    id: str | None = None
    metadata: bytes | None = None  # the signed update metadata of the offer (verified again after a restart)
    probe: bytes | None = None  # golden inputs and expected outputs (npz), checked against the signed sha256
    url: str | None = None  # HTTP(S) base the offer named: files at URL/<signed path>; else chunks over MQTT
    previous_slot: str | None = None  # the slot serving before the job: what a rollback goes back to
    received: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # "<step>_ms", reported with the result
    download_started: float | None = None  # wall clock: a download resumed after a restart counts from the first
    payload: Payload | None = None
    target_slot: str | None = None
    probe_result: str | None = None

    @classmethod
    def rollback(cls, job_id: str | None, previous_slot: str | None) -> Job:
        """A rollback the server ordered while idle: back to the slot active before the current one."""
        return cls(id=job_id, previous_slot=previous_slot)

    def to_record(self) -> dict:
        if self.id is None:
            return {}
        record = {k: v for k, v in asdict(self).items() if k not in ("id", "metadata", "probe")}
        return {"job": self.id, "metadata": _b64(self.metadata), "probe": _b64(self.probe), **record}

    @classmethod
    def from_record(cls, record: dict) -> Job:
        if not record:
            return cls()
        payload = record.get("payload")
        return cls(id=record.get("job"), metadata=_unb64(record.get("metadata")), probe=_unb64(record.get("probe")),
                   url=record.get("url"), previous_slot=record.get("previous_slot"),
                   received=float(record.get("received") or 0.0),
                   timings={k: float(v) for k, v in (record.get("timings") or {}).items()},
                   download_started=record.get("download_started"),
                   payload=Payload(**payload) if payload else None, target_slot=record.get("target_slot"),
                   probe_result=record.get("probe_result"))

    def reported_timings(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.timings.items() if k.endswith("_ms")}


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)
