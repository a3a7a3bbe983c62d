"""What the device tells the server about updates: ``update_event`` messages (through the outbox, so none is lost
while offline) and the retained ``state`` message (sent directly: only the newest one matters)."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.offers import Offers
from agent.outbox import Outbox
from fleet_protocol import topics
from fleet_protocol.messages import DeviceState, ModelState, UpdateEvent
from fleet_protocol.vocabulary import Reason, UpdateResult, UpdateState


class Reporter:
    """``models`` says where each of the device's named models stands (``agent.models.ModelSet.states``), sorted by
    name; the device state's ``active_*`` fields repeat the first one that serves (what servers that predate several
    models per device read)."""

    def __init__(self, device_id: str, *, outbox: Outbox, send: Callable[..., int | None],
                 offers: Offers, models: Callable[[], list[ModelState]], clock: Callable[[], float] = time.time):
        self.device_id = device_id
        self._outbox, self._send, self._offers, self._clock = outbox, send, offers, clock
        self.models = models

    def event(self, job: str | None, state: UpdateState, result: UpdateResult, reason: Reason = Reason.OK,
              detail: str = "", timings: dict[str, float] | None = None) -> None:
        msg = UpdateEvent(job=job or "none", state=state, result=result, reason=reason, detail=detail[:1000],
                          progress=0.0 if result is UpdateResult.PENDING else 1.0, timings_ms=timings or {},
                          ts=self._clock())
        self._outbox.put(topics.topic(self.device_id, "evt"), msg.to_bytes())

    def device_state(self) -> None:
        models = self.models()
        first = next((m for m in models if m.active_sha256), None)
        verifier = self._offers.verifier
        state = DeviceState(active_version=first.active_version if first else None,
                            active_sha256=first.active_sha256 if first else None,
                            active_slot=first.active_slot if first else None,
                            staged_version=None, root_version=verifier.root_version,
                            update_version=verifier.update_version, ts=self._clock(), models=tuple(models))
        self._send(topics.topic(self.device_id, "state"), state.to_bytes(), True)
