"""Downloads on a metered link (issue 17, part 6): a bandwidth cap, a daily byte budget, and a hold while the
integrator says the link is metered.

The integrator's condition is a file that exists (``metered_file``: a connection manager touches it while on
cellular) or a command that exits 0 (``metered_command``, run at most every ``check_every_s`` and given
``command_timeout_s``: a command that hangs or fails to start counts as *not* metered, and is logged, so a broken
hook cannot stop updates forever). While the link is metered or today's budget is spent the download holds (what is
on disk stays: it resumes where it stopped) and the agent reports ``waiting: metered`` / ``waiting: data budget``
with the bytes outstanding; the server shows it on the rollout member.

The cap is a token bucket that may go into debt by one request: a request of ``k`` chunks is granted whenever the
bucket is positive, then nothing until it has refilled, so the average rate is the cap whatever the chunk size. The
daily budget counts bytes *received* (UTC days), in a small ledger file written at most once a second (and when a
download stops): a power cut may forget up to a second of accounting. Requests are sized to fit what is left of
the budget, so it is exceeded by at most the chunks of one re-request after a stall.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from fleet_protocol.vocabulary import Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkPolicy:
    max_download_bps: int | None = None  # bytes per second
    daily_download_bytes: int | None = None
    metered_file: Path | None = None  # the link is metered while this file exists
    metered_command: str | None = None  # … or while this command exits 0
    check_every_s: float = 10.0
    command_timeout_s: float = 5.0

    @property
    def unlimited(self) -> bool:
        return self.max_download_bps is None and self.daily_download_bytes is None and \
            self.metered_file is None and self.metered_command is None


@dataclass(frozen=True)
class Hold:
    reason: Reason  # METERED or DATA_BUDGET
    why: str

    def describe(self, outstanding: int) -> str:
        return f"waiting: {self.why}; {outstanding:,} bytes outstanding"


class Metering:
    """The policy's state: the bucket, today's ledger, the last answer of the metered command. Shared by the models'
    updaters (one device, one link): every method takes the lock, and ``pace`` sleeps outside it."""

    def __init__(self, policy: LinkPolicy, ledger: Path, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 run: Callable[[list[str], float], int] | None = None):
        self.policy, self._ledger = policy, ledger
        self._clock, self._mono, self._run = clock, monotonic, run or _run_command
        self._tokens = float(policy.max_download_bps or 0)
        self._refilled = monotonic()
        self._day, self._used = self._load()
        self._saved_at = monotonic()
        self._dirty = False
        self._metered: tuple[float, bool] | None = None  # (checked at, answer) of the command
        self._lock = threading.RLock()

    def set_policy(self, **changes) -> None:
        """Remote configuration: new caps take effect on the next request or block."""
        with self._lock:
            self.policy = replace(self.policy, **changes)

    # ------------------------------------------------------------------ the day's budget

    def _today(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%d")

    def _load(self) -> tuple[str, int]:
        try:
            data = json.loads(self._ledger.read_text())
            return str(data["day"]), max(0, int(data["bytes"]))
        except FileNotFoundError:
            return self._today(), 0
        except (ValueError, KeyError, TypeError) as e:  # a torn or foreign ledger: start the day afresh, loudly
            log.warning("download ledger %s unreadable (%s): counting today from zero", self._ledger, e)
            return self._today(), 0

    def used_today(self) -> int:
        with self._lock:
            return self._used_today()

    def _used_today(self) -> int:
        today = self._today()
        if today > self._day:  # a new day (a clock set back, as on a board without RTC before NTP, is not one)
            self._day, self._used, self._dirty = today, 0, True
        return self._used

    def budget_left(self) -> int | None:
        with self._lock:
            if self.policy.daily_download_bytes is None:
                return None
            return max(0, self.policy.daily_download_bytes - self._used_today())

    def spend(self, n: int) -> None:
        """``n`` bytes arrived (counted while a budget is set: without one nothing is written)."""
        with self._lock:
            if self.policy.daily_download_bytes is None:
                return
            self._used_today()
            self._used += n
            self._dirty = True
            if self._mono() - self._saved_at >= 1.0:
                self._save()

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        if not self._dirty:
            return
        tmp = self._ledger.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"day": self._day, "bytes": self._used}))
            os.replace(tmp, self._ledger)
        except OSError as e:  # a full disk must not stop the download that would free it: counted in memory
            log.warning("download ledger %s not saved: %s", self._ledger, e)
            return
        self._saved_at, self._dirty = self._mono(), False

    # ------------------------------------------------------------------ holds

    def metered(self) -> str | None:
        """Why the integrator says the link is metered now, or None (also when the condition cannot be read:
        logged, so a broken hook never holds updates forever)."""
        try:
            return self._metered_now()
        except (OSError, ValueError) as e:
            log.warning("metered-link condition unreadable (%s): taken as not metered", e)
            return None

    def _metered_now(self) -> str | None:
        """The command runs outside the lock: the models' downloads wait for no one's command."""
        with self._lock:
            p = self.policy
            last = self._metered
        if p.metered_file is not None and p.metered_file.exists():
            return f"metered link ({p.metered_file} exists)"
        if p.metered_command:
            now = self._mono()
            if last is None or now - last[0] >= p.check_every_s:
                last = (now, self._run(shlex.split(p.metered_command), p.command_timeout_s) == 0)
                with self._lock:
                    self._metered = last
            if last[1]:
                return f"metered link ({p.metered_command!r} says so)"
        return None

    def hold(self) -> Hold | None:
        """Why downloads must wait now, or None."""
        why = self.metered()
        if why is not None:
            return Hold(Reason.METERED, why)
        left = self.budget_left()
        if left is not None and left <= 0:
            return Hold(Reason.DATA_BUDGET, f"data budget ({self.policy.daily_download_bytes:,} bytes a day) "
                                            f"spent until 00:00 UTC")
        return None

    # ------------------------------------------------------------------ pacing

    def grant(self, sizes: list[int]) -> int:
        """How many of the next requests (``sizes``, in bytes, in order) may be made now: those the budget still
        holds, and, under a cap, as many as the bucket covers (at least one whenever it is positive)."""
        with self._lock:
            return self._grant(sizes)

    def _grant(self, sizes: list[int]) -> int:
        left = self.budget_left()
        n = len(sizes)
        if left is not None:
            if left <= 0:
                return 0
            total, n = 0, 0
            for size in sizes:
                if n and total + size > left:
                    break
                total += size
                n += 1
        cap = self.policy.max_download_bps
        if cap is None or n == 0:
            return n
        self._refill(cap)
        if self._tokens <= 0:
            return 0
        granted, total = 0, 0
        for size in sizes[:n]:
            if granted and total + size > self._tokens:
                break
            total += size
            granted += 1
        self._tokens -= total
        return granted

    def pace(self, n: int, sleep: Callable[[float], None] = time.sleep) -> None:
        """Under a cap, wait until ``n`` more bytes may be read (the HTTP path reads in blocks)."""
        with self._lock:
            cap = self.policy.max_download_bps
            if cap is None:
                return
            self._refill(cap)
            wait = -self._tokens / cap if self._tokens <= 0 else 0.0  # the debt so far, paid before this block
            self._tokens -= n
        if wait:
            sleep(wait)

    def _refill(self, cap: int) -> None:
        now = self._mono()
        self._tokens = min(float(cap), self._tokens + (now - self._refilled) * cap)
        self._refilled = now


def _run_command(argv: list[str], timeout: float) -> int:
    try:
        return subprocess.run(argv, timeout=timeout, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, check=False).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("metered-link command %s failed (%s): taken as not metered", argv, e)
        return 1
