"""Per-device token buckets: how much of a shared resource one device may take (bytes stored, requests served), so
that a device holding its own credentials cannot crowd out the rest of the fleet. Pure: the caller passes the time."""

from __future__ import annotations


class TokenBuckets:
    """One bucket per key, refilled at ``rate`` per second up to ``burst``. ``take`` admits a cost while the bucket
    is positive and charges it (so one large cost may overdraw it once, and then the key waits for the refill)."""

    def __init__(self, *, rate: float, burst: float, max_keys: int = 100_000):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when refilled)

    def take(self, key: str, cost: float, now: float) -> bool:
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        if tokens <= 0:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._buckets.clear()  # bounded: a forgotten key starts again with a full bucket
        self._buckets[key] = (tokens - cost, now)
        return True
