"""Store-and-forward: every event and telemetry batch goes into the on-disk outbox first, and leaves it only when
the broker acknowledged it (QoS 1 PUBACK).

Oldest first, a bounded window in flight; after a disconnect the unacknowledged ones are sent again in order (the
receiver de-duplicates by sequence number, so a redelivery is harmless). Bounded in rows: beyond the bound the
oldest are dropped and the drop count travels in the next telemetry batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from agent.store import Store

log = logging.getLogger(__name__)

WINDOW = 16


class Outbox:
    def __init__(self, store: Store, publish, *, max_rows: int):
        """``publish(topic, payload) -> mid | None`` sends with QoS 1 (None while offline)."""
        self.store, self._publish, self.max_rows = store, publish, max_rows
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid → outbox seq
        self._sent: set[int] = set()  # seqs in flight
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reset = threading.Event()
        self._thread: threading.Thread | None = None
        self.acked = 0

    def put(self, topic: str, payload: bytes) -> None:
        dropped = self.store.enqueue(topic, payload, max_rows=self.max_rows)
        if dropped:
            log.warning("outbox full: dropped the %d oldest message(s)", dropped)
        self._wake.set()

    # called from the link thread: never block there
    def acknowledged(self, mid: int) -> None:
        self._acks.put(mid)
        self._wake.set()

    def connection_lost(self) -> None:
        self._reset.set()
        self._wake.set()

    def connected(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is acknowledged (graceful shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.store.outbox_size() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        return self.store.outbox_size() == 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._step()
            except Exception:  # the database is local; a failure here is logged and retried, never fatal
                log.exception("outbox step failed")

    def _step(self) -> None:
        if self._reset.is_set():
            self._reset.clear()
            self._inflight.clear()
            self._sent.clear()
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            seq = self._inflight.pop(mid, None)
            if seq is not None:
                self.store.acknowledge(seq)
                self._sent.discard(seq)
                self.acked += 1
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        for seq, topic, payload in self.store.pending(limit=WINDOW + len(self._sent)):
            if seq in self._sent:
                continue
            mid = self._publish(topic, payload)
            if mid is None:  # offline: try again on reconnect
                return
            self._inflight[mid] = seq
            self._sent.add(seq)
            room -= 1
            if room <= 0:
                return
