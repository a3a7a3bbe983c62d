"""Server replicas and their broker sessions: a dead replica's session is drained and retired, not left to swallow
its share of the fleet's messages.

Each server process keeps a persistent MQTT session (so a restart loses nothing) in the fleet's shared subscription
group, and Mosquitto hands a disconnected member of a group its share of new messages all the same: when a process
dies and does not come back (kill -9, a lost host), half of what devices send — telemetry, events, chunk requests —
would wait in its session until it expires. So every process registers its session here with a heartbeat, and the
process holding the rollout engine's lease watches the others: a session whose heartbeat is older than
``DEAD_AFTER_S`` is taken over with the dead process's own client id (the server's accounts share one password),
leaves the shared subscriptions at once (no new messages), has its queued messages delivered through the usual
router (stored, then acknowledged), and is ended with a session expiry of 0. A process that comes back later starts
a fresh session and registers again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy import delete, update
from sqlmodel import Session, select

from fleet_server.models import ServerReplica

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
DEAD_AFTER_S = 8.0  # four missed heartbeats
DRAIN_IDLE_S = 1.0  # an adopted session that delivered nothing for this long is drained
DRAIN_MAX_S = 120.0


class Replicas:
    """This process's heartbeat, and (while ``leading()``) the adoption of dead replicas' sessions."""

    def __init__(self, db, client_id: str, username: str | None, *, leading: Callable[[], bool],
                 adopt: Callable[[ServerReplica], int], clock: Callable[[], float] = time.time):
        self.db, self.client_id, self.username = db, client_id, username
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._leading, self._adopt, self._clock = leading, adopt, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.adopted: list[tuple[str, int]] = []  # (client id, messages drained)

    def beat(self) -> None:
        now = self._clock()
        with Session(self.db) as s:
            updated = s.execute(update(ServerReplica).where(ServerReplica.client_id == self.client_id)  # type: ignore[arg-type]
                                .values(holder=self.holder, heartbeat_at=now, username=self.username))
            if updated.rowcount == 0:  # type: ignore[attr-defined]
                s.add(ServerReplica(client_id=self.client_id, username=self.username, holder=self.holder,
                                    heartbeat_at=now))
            try:
                s.commit()
            except Exception:  # another process registered the same client id at the same moment
                s.rollback()

    def orphans(self) -> list[ServerReplica]:
        cutoff = self._clock() - DEAD_AFTER_S
        with Session(self.db) as s:
            rows = s.exec(select(ServerReplica).where(ServerReplica.heartbeat_at < cutoff,  # type: ignore[arg-type]
                                                      ServerReplica.client_id != self.client_id)).all()
            return [ServerReplica.model_validate(r) for r in rows]

    def retire(self, row: ServerReplica) -> None:
        """Forget the dead replica, unless it came back meanwhile (a newer heartbeat)."""
        with Session(self.db) as s:
            s.execute(delete(ServerReplica).where(ServerReplica.client_id == row.client_id,  # type: ignore[arg-type]
                                                  ServerReplica.heartbeat_at <= row.heartbeat_at))  # type: ignore[arg-type]
            s.commit()

    def check(self) -> None:
        """One round: heartbeat, then adopt what died if this process leads."""
        self.beat()
        if not self._leading():
            return
        for row in self.orphans():
            log.warning("server replica %s (%s) stopped sending heartbeats %.0f s ago: draining its broker session",
                        row.client_id, row.holder, self._clock() - row.heartbeat_at)
            drained = self._adopt(row)
            self.adopted.append((row.client_id, drained))
            self.retire(row)
            log.warning("server replica %s: %d queued message(s) drained, its session ended", row.client_id, drained)

    def start(self) -> Replicas:
        self._thread = threading.Thread(target=self._run, name="replicas", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.check()
            except Exception:  # a database outage: the heartbeat resumes with it
                log.warning("replica heartbeat failed", exc_info=True)

    def stop(self) -> None:
        """Stop beating and leave the registry (a clean stop keeps nothing to adopt: the session is ours again on
        restart)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with Session(self.db) as s:
                s.execute(delete(ServerReplica).where(ServerReplica.client_id == self.client_id))  # type: ignore[arg-type]
                s.commit()
        except Exception:  # the database is gone: the row ages, and a peer finds the session empty
            log.warning("could not leave the replica registry", exc_info=True)


def drain(make_link, on_message, *, idle_s: float = DRAIN_IDLE_S, max_s: float = DRAIN_MAX_S) -> int:
    """Take over a session with ``make_link(handler)`` (a ``FleetLink`` in adopt mode), hand what it delivers to
    ``on_message``, wait until every delivered message was acknowledged (stored) and nothing came for ``idle_s``,
    then end the session. Returns how many messages it delivered."""
    lock = threading.Lock()
    counts = {"delivered": 0, "acked": 0}
    last = [time.monotonic()]

    def handler(topic: str, payload: bytes, ack, user_properties: list) -> None:
        def counted_ack() -> None:
            ack()
            with lock:
                counts["acked"] += 1

        with lock:
            counts["delivered"] += 1
            last[0] = time.monotonic()
        on_message(topic, payload, counted_ack, user_properties)

    link = make_link(handler).start()
    started = time.monotonic()
    try:
        if not link.connected.wait(10):
            log.warning("could not take over %s's session: the broker did not accept the connection", link.client_id)
            return 0
        while time.monotonic() - started < max_s:
            time.sleep(0.1)
            link.flush_acks()
            with lock:
                settled = counts["acked"] >= counts["delivered"]
            if settled and time.monotonic() - last[0] > idle_s:
                break
        link.flush_acks()
    finally:
        link.retire()
    return counts["delivered"]
