"""Maintenance windows (issue 17, part 2): when a device may *activate* an update. Downloads, staging and the probe
happen whenever the offer arrives ("download now, install in the window"); the switch waits for a window.

A window is a cron expression (the five standard fields, in the window's time zone) for when it opens, and how long
it stays open. Both sides evaluate them, pure and with the clock passed in: the server's planner (when does a
stage's timeout start counting) and the agent (may it switch now, when does the next window open). An agent that is
off or offline for a whole window acts in the next one: it only ever switches inside a window, by its own clock.

Cron fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12), day of week (0-7, 0 and 7 are Sunday);
each ``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a comma list of those. As in cron, when both
day fields are restricted a day matches either. Standard library only (``zoneinfo``), so the agent needs nothing more.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_DURATION_S = 7 * 86_400
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


def _parse_field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        rng, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if rng == "*":
                a, b = lo, hi
            elif "-" in rng:
                a, b = (int(x) for x in rng.split("-", 1))
            else:
                a = b = int(rng)
                if step_text:  # "5/15" means 5-hi/15, as in Vixie cron
                    b = hi
        except ValueError as e:
            raise ValueError(f"cron {name} field {text!r}: {part!r} is not a number, range or step") from e
        if step < 1 or not lo <= a <= b <= hi:
            raise ValueError(f"cron {name} field {text!r}: {part!r} is outside {lo}-{hi} (or a step below 1)")
        values.update(range(a, b + 1, step))
    return frozenset(values)


class Cron:
    """A parsed five-field cron expression."""

    def __init__(self, expression: str):
        parts = expression.split()
        if len(parts) != 5:
            raise ValueError(f"cron expression {expression!r} needs 5 fields (minute hour day month weekday), "
                             f"has {len(parts)}")
        self.minutes, self.hours, self.days, self.months, dow = (
            _parse_field(p, name, lo, hi) for p, (name, lo, hi) in zip(parts, _FIELDS, strict=True))
        self.weekdays = frozenset(d % 7 for d in dow)  # 0 and 7: Sunday
        # as Vixie cron and cronie: a day field that starts with "*" (also "*/2") does not widen the other to "or"
        self._any_day, self._any_weekday = parts[2].startswith("*"), parts[4].startswith("*")
        self._times = [time(h, m) for h in sorted(self.hours) for m in sorted(self.minutes)]

    def day_matches(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        dom, dow = d.day in self.days, (d.isoweekday() % 7) in self.weekdays
        if self._any_day or self._any_weekday:
            return dom and dow
        return dom or dow

    def times(self) -> list[time]:
        """The opening times of a matching day, in order."""
        return self._times


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str = Field(min_length=9, max_length=200)  # when it opens
    duration_s: int = Field(ge=60, le=MAX_DURATION_S)  # how long it stays open
    tz: str = Field(default="UTC", max_length=64)  # the zone the cron fields are read in

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        Cron(v)
        return v

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r}") from e
        return v

    @model_validator(mode="after")
    def _opens_sometime(self) -> Window:
        if next(self.starts_after(datetime(2000, 1, 1, tzinfo=UTC).timestamp()), None) is None:
            raise ValueError(f"cron expression {self.cron!r} never matches a date")
        return self

    def _starts(self, day: date, zone: ZoneInfo) -> Iterator[float]:
        cron = _cron(self.cron)
        if cron.day_matches(day):
            for t in cron.times():
                yield datetime.combine(day, t, zone).timestamp()

    def starts_after(self, now: float, *, days: int = 5 * 366) -> Iterator[float]:
        """Opening times at or after ``now``, in order (within ``days``; leap days need four years)."""
        zone = ZoneInfo(self.tz)
        first = datetime.fromtimestamp(now, zone).date()
        for i in range(days):
            for start in self._starts(first + timedelta(days=i), zone):
                if start >= now:
                    yield start

    def open_since(self, now: float) -> float | None:
        """When the window that is open at ``now`` opened (the earliest such opening), or None when it is closed.
        Walks back from ``now``: every opening has the same duration, so the first that ended ends the search."""
        zone = ZoneInfo(self.tz)
        cron = _cron(self.cron)
        today = datetime.fromtimestamp(now, zone).date()
        earliest = None
        for i in range(self.duration_s // 86_400 + 2):
            day = today - timedelta(days=i)
            if not cron.day_matches(day):
                continue
            for t in reversed(cron.times()):
                start = datetime.combine(day, t, zone).timestamp()
                if start > now:
                    continue
                if start + self.duration_s <= now:
                    return earliest
                earliest = start
        return earliest


_CACHE: dict[str, Cron] = {}


def _cron(expression: str) -> Cron:
    c = _CACHE.get(expression)
    if c is None:
        if len(_CACHE) > 256:
            _CACHE.clear()
        c = _CACHE[expression] = Cron(expression)
    return c


def is_open(windows: Sequence[Window], now: float) -> bool:
    """No windows: always open; else open when any of them is."""
    return not windows or any(w.open_since(now) is not None for w in windows)


def next_open(windows: Sequence[Window], now: float) -> float | None:
    """When activation is next allowed: ``now`` if a window is open, else the earliest opening after it (None: no
    window ever opens again, which validation makes impossible)."""
    if is_open(windows, now):
        return now
    starts = [s for w in windows if (s := next(w.starts_after(now), None)) is not None]
    return min(starts, default=None)


def all_open(window_sets: Sequence[Sequence[Window]], now: float) -> bool:
    """Every set of windows open (a rollout's and the device's site windows must both allow it)."""
    return all(is_open(ws, now) for ws in window_sets)


def next_all_open(window_sets: Sequence[Sequence[Window]], now: float, *, horizon_s: float = 366 * 86_400,
                  max_steps: int = 400) -> float | None:
    """The first time at or after ``now`` when every set is open: jump to the earliest opening of a set that is
    closed, until none is (no time in between can have them all open: a closed set opens no sooner). None when
    there is none within ``horizon_s`` or ``max_steps`` jumps (sets that keep missing each other, e.g. two
    alternating minutes, would otherwise take hundreds of thousands)."""
    t = now
    for _ in range(max_steps):
        if t > now + horizon_s:
            return None
        if all_open(window_sets, t):
            return t
        nxt = [next_open(ws, t) for ws in window_sets if not is_open(ws, t)]
        if any(n is None for n in nxt):
            return None  # a set that never opens again
        t = min(n for n in nxt if n is not None)  # later than t: each of these sets is closed at t
    return None
