"""Chunk downloads over MQTT: devices' chunk requests answered from the artifact store, on a thread of their own.

A chunk request writes nothing, so it never waits for the telemetry batch timer or an ingest outage's retry loop:
it reads its job's permission (the device's own job, still in flight, in a rollout not aborted or finished) with one
indexed query, cached for ``JOB_RECHECK_S``, and is dropped (counted) when the database cannot answer; the device
asks again on its stall timer. Each device is paced by a token bucket over the bytes it asks for. The answers are
binary frames for agents that asked for them (fleet_protocol.messages.BINARY_CHUNKS), base64 JSON otherwise.

Backpressure by a window: at most ``CHUNK_WINDOW_BYTES`` of chunks the broker has not acknowledged yet; past it,
the oldest is waited for (bounded). The server's memory holds that window instead of a whole wave's bytes (paho
queues every publish in memory), and the broker link stays busy: waiting for each answer's PUBACK before the next
served one device per round trip (~15 ms under load: 150 s for 10,000 devices).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_protocol.chunks import DEFAULT_CHUNK_SIZE
from fleet_protocol.errors import ProtocolError
from fleet_server.models import Rollout, RolloutDevice
from fleet_server.pacing import TokenBuckets
from fleet_server.rollouts.planner import IN_FLIGHT, RolloutState

log = logging.getLogger(__name__)
QUEUE_MAX = 100_000
CHUNK_ACK_TIMEOUT_S = 10.0
CHUNK_WINDOW_BYTES = 8 * 1024 * 1024  # chunk bytes published but not yet acknowledged by the broker
JOB_RECHECK_S = 2.0  # a job's permission is re-read this often (an abort stops its downloads within it)
JOBS_CACHED = 100_000
CHUNK_RATE_BYTES_S = 4 * 1024 * 1024  # per device: a device asking for chunks in a loop cannot saturate the server
CHUNK_BURST_BYTES = 64 * 1024 * 1024  # a whole artifact of up to this size downloads at full speed
# Requests per device, checked before anything else (a request naming an unknown job costs a database read): an
# agent asks once per file and again on its stall timer; a device flooding requests for made-up jobs kept the one
# downloads thread busy for every device (red team: ~3,100 reads/s saturated it).
REQUESTS_PER_S, REQUEST_BURST = 2.0, 20
SERVABLE_ROLLOUTS = (RolloutState.RUNNING.value, RolloutState.PAUSED.value)
# A chunk served to a job is not served again within this time: a device whose first answer waits in a wave's queue
# past its stall timer asks again for everything, and both requests were answered in full (10-20 % of a 1,000-device
# rollout's bytes went twice). QoS 1 and the device's persistent session deliver what was sent; a chunk really lost
# is asked for again after this.
RESEND_AFTER_S = 10.0


@dataclass(frozen=True)
class Grant:
    """What a job may download: its device and files (empty once the job is closed), and when that was read."""

    device_id: str
    files: dict
    checked_at: float


class Downloads:
    def __init__(self, engine: Engine, delivery, publish, *, clock=time.monotonic):
        self.engine, self.delivery, self.publish, self._clock = engine, delivery, publish, clock
        self.counts: Counter = Counter()
        self._queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self._grants: dict[str, Grant] = {}
        self._bytes = TokenBuckets(rate=CHUNK_RATE_BYTES_S, burst=CHUNK_BURST_BYTES, max_keys=JOBS_CACHED)
        self._requests = TokenBuckets(rate=REQUESTS_PER_S, burst=REQUEST_BURST, max_keys=JOBS_CACHED)
        self._served: dict[str, dict[int, float]] = {}  # job → chunk index → when it was last sent
        self._in_flight: collections.deque = collections.deque()  # (MQTTMessageInfo, bytes) not yet acknowledged
        self._window = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="downloads", daemon=True)

    def start(self) -> Downloads:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def submit(self, device_id: str, payload: bytes, *, binary: bool = False) -> None:
        """From the MQTT thread: never blocks (a full queue drops the request; the device asks again)."""
        try:
            self._queue.put_nowait((device_id, payload, binary))
        except queue.Full:
            self.counts["chunk_dropped"] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                device_id, payload, binary = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._answer(device_id, payload, binary)
            except Exception:  # a missing file or a broker hiccup: the device re-requests on its stall timer
                self.counts["chunk_failed"] += 1
                log.exception("serving chunks to %s failed", device_id)

    def _answer(self, device_id: str, payload: bytes, binary: bool) -> None:
        now = self._clock()
        if not self._requests.take(device_id, 1, now):
            self.counts["chunk_requests_paced"] += 1
            return
        try:
            request = messages.parse_for("dl-req", payload)
        except ProtocolError as e:
            self.counts["invalid"] += 1
            log.warning("invalid chunk request from %s: %s", device_id, str(e)[:200])
            return
        grant = self._grant(request.job, now)
        if grant is None:
            return
        if grant.device_id != device_id:
            self.counts["chunk_wrong_device"] += 1
            return
        if not grant.files:
            self.counts["chunk_job_closed"] += 1
            return
        request = self._not_sent_lately(request, now)
        if request is None:
            return
        cost = len(request.indices) * getattr(self.delivery, "chunk_size", DEFAULT_CHUNK_SIZE)
        if not self._bytes.take(device_id, cost, now):
            self.counts["chunk_rate_limited"] += 1
            return
        sent = self._served.setdefault(request.job, {})
        for index in request.indices:
            sent[index] = now
        for frame in self.delivery.chunks(request.job, grant.files, request, binary=binary):
            self._send(topics.topic(device_id, "dl", request.job), frame)

    def _not_sent_lately(self, request: messages.ChunkRequest, now: float) -> messages.ChunkRequest | None:
        """The request without the chunks sent to its job within ``RESEND_AFTER_S``; None when nothing is left."""
        sent = self._served.get(request.job, {})
        wanted = tuple(i for i in sorted(set(request.indices)) if now - sent.get(i, -RESEND_AFTER_S) >= RESEND_AFTER_S)
        if len(wanted) < len(set(request.indices)):
            self.counts["chunks_not_resent"] += len(set(request.indices)) - len(wanted)
        if not wanted:
            return None
        if len(self._served) >= JOBS_CACHED:  # bounded: finished jobs are never asked for again
            self._served.clear()
        return request.model_copy(update={"indices": wanted})

    def _grant(self, job: str, now: float) -> Grant | None:
        grant = self._grants.get(job)
        if grant is not None and now - grant.checked_at <= JOB_RECHECK_S:
            if not grant.device_id:
                self.counts["chunk_unknown_job"] += 1
                return None
            return grant
        if len(self._grants) >= JOBS_CACHED:  # bounded: finished jobs are never asked for again
            self._grants.clear()
        try:
            with Session(self.engine) as s:
                row = s.exec(select(RolloutDevice.device_id, RolloutDevice.files, RolloutDevice.status, Rollout.state)
                             .join(Rollout, Rollout.id == RolloutDevice.rollout_id)  # type: ignore[arg-type]
                             .where(RolloutDevice.job == job)).first()
        except Exception:  # the database is away: the device asks again later
            self.counts["chunk_database_unavailable"] += 1
            log.warning("cannot read the permission of job %s", job, exc_info=True)
            return None
        if row is None:  # remembered too: asking again for a made-up job costs no second read
            self.counts["chunk_unknown_job"] += 1
            self._grants[job] = Grant("", {}, now)
            return None
        device_id, files, member_status, rollout_state = row
        open_ = member_status in {status.value for status in IN_FLIGHT} and rollout_state in SERVABLE_ROLLOUTS
        grant = self._grants[job] = Grant(device_id, dict(files) if open_ else {}, now)
        return grant

    def _send(self, topic: str, frame: bytes) -> None:
        while self._in_flight and self._in_flight[0][0].is_published():  # acknowledged meanwhile
            self._window -= self._in_flight.popleft()[1]
        info = self.publish(topic, frame)
        self._in_flight.append((info, len(frame)))
        self._window += len(frame)
        self.counts["chunks_sent"] += 1
        self.counts["chunk_bytes_sent"] += len(frame)
        while self._window > CHUNK_WINDOW_BYTES and self._in_flight:
            oldest, size = self._in_flight.popleft()
            self._window -= size
            with contextlib.suppress(RuntimeError, ValueError):  # not connected: devices ask again
                oldest.wait_for_publish(CHUNK_ACK_TIMEOUT_S)
