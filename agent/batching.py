"""Dynamic micro-batching: concurrent requests to a model with a free batch dimension run as one batch.

A request waits at most ``max_wait_s`` for company; a batch holds at most ``max_batch`` samples. Requests are only
grouped with requests for the same loaded model (an update may switch models between two requests), and each gets
back exactly its own rows. Off unless configured (``batch_max`` > 1): on a small CPU it trades a little latency for
throughput, which is the right trade only under concurrent load.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from fleet_runtime.runtimes import Model


@dataclass
class _Item:
    model: Model
    feeds: dict[str, np.ndarray]
    rows: int
    future: Future


def batchable(model: Model) -> bool:
    """Every input's first dimension is free (a dynamic batch)."""
    return bool(model.inputs) and all(t.shape and t.shape[0] is None for t in model.inputs)


class MicroBatcher:
    def __init__(self, *, max_batch: int, max_wait_s: float):
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self.batches = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def run(self, model: Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(feeds.values())).shape[0]
        if rows >= self.max_batch:
            return model.run(feeds)  # already a full batch
        item = _Item(model, feeds, rows, Future())
        self._queue.put(item)
        return item.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        pending: _Item | None = None
        while True:
            first = pending or self._queue.get()
            pending = None
            if first is None:
                return
            group, rows = [first], first.rows
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:  # closing: finish this batch, then stop
                    self._execute(group)
                    return
                if nxt.model is not first.model or rows + nxt.rows > self.max_batch:
                    pending = nxt  # starts the next batch
                    break
                group.append(nxt)
                rows += nxt.rows
            self._execute(group)

    def _execute(self, group: list[_Item]) -> None:
        self.batches += 1
        self.requests += len(group)
        try:
            if len(group) == 1:
                group[0].future.set_result(group[0].model.run(group[0].feeds))
                return
            names = list(group[0].feeds)
            joined = {n: np.concatenate([g.feeds[n] for g in group]) for n in names}
            out = group[0].model.run(joined)
        except Exception as e:  # every request of the batch learns why
            for g in group:
                g.future.set_exception(e)
            return
        start = 0
        for g in group:
            g.future.set_result({k: v[start:start + g.rows] for k, v in out.items()})
            start += g.rows
