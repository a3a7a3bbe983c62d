"""MQTT topic names (ARCHITECTURE.md, "MQTT") and the parser that keeps a device inside its own namespace.

Per device ``{d}`` under ``ef/v1/d/{d}/``: ``cmd`` (server→device), ``dl/{job}`` and ``dl/{job}/req`` (chunks), ``evt``,
``tm``, ``state`` (retained), ``online`` (retained, last will), ``cfg`` (server→device, retained: desired settings).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from fleet_protocol.errors import TopicError

ROOT = "ef/v1"
SHARE_GROUP = "fleet"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
JOB_ID = DEVICE_ID
KINDS = {"cmd", "evt", "tm", "state", "online", "cfg"}


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not DEVICE_ID.match(value):
        raise TopicError(f"invalid {what} {value!r}: letters, digits, '.', '_', '-' (no '/', '+', '#'), ≤ 64")
    return value


@dataclass(frozen=True)
class Topic:
    device: str
    kind: str  # cmd | evt | tm | state | online | dl | dl-req
    job: str | None = None

    def __post_init__(self) -> None:
        _check_id(self.device, "device id")
        if self.kind in ("dl", "dl-req"):
            _check_id(self.job or "", "job id")
        elif self.kind not in KINDS or self.job is not None:
            raise TopicError(f"unknown topic kind {self.kind!r}")

    def __str__(self) -> str:
        base = f"{ROOT}/d/{self.device}"
        if self.kind == "dl":
            return f"{base}/dl/{self.job}"
        if self.kind == "dl-req":
            return f"{base}/dl/{self.job}/req"
        return f"{base}/{self.kind}"


def topic(device: str, kind: str, job: str | None = None) -> str:
    return str(Topic(device, kind, job))


def parse(text: str) -> Topic:
    """A device topic's name → its parts, or TopicError. Remembered per name (a fleet's servers parse the same few
    names per device over and over); what does not parse is never remembered."""
    if not isinstance(text, str):
        raise TopicError(f"{text!r} is not an {ROOT} device topic")
    return _parse(text)


@functools.lru_cache(maxsize=65_536)
def _parse(text: str) -> Topic:
    parts = text.split("/")
    if len(parts) < 5 or "/".join(parts[:3]) != f"{ROOT}/d":
        raise TopicError(f"{text!r} is not an {ROOT} device topic")
    device, rest = parts[3], parts[4:]
    if rest[0] == "dl" and len(rest) == 2:
        return Topic(device, "dl", rest[1])
    if rest[0] == "dl" and len(rest) == 3 and rest[2] == "req":
        return Topic(device, "dl-req", rest[1])
    if len(rest) == 1:
        return Topic(device, rest[0])
    raise TopicError(f"{text!r} is not an {ROOT} device topic")


def parse_own(text: str, device: str) -> Topic:
    """Parse a topic and refuse it unless it belongs to ``device`` (what a device may ever touch)."""
    t = parse(text)
    if t.device != device:
        raise TopicError(f"{text!r} belongs to device {t.device!r}, not {device!r}")
    return t


def device_subscriptions(device: str) -> list[str]:
    """What a device subscribes to: its commands, its desired settings and its own download jobs, nothing else."""
    _check_id(device, "device id")
    return [f"{ROOT}/d/{device}/cmd", f"{ROOT}/d/{device}/cfg", f"{ROOT}/d/{device}/dl/+"]


def server_subscriptions(group: str = SHARE_GROUP) -> list[str]:
    """Shared subscriptions, so several server replicas split the device traffic."""
    return [f"$share/{group}/{ROOT}/d/+/{k}" for k in ("evt", "tm", "state", "online")] + \
        [f"$share/{group}/{ROOT}/d/+/dl/+/req"]


def acl_pattern() -> str:
    """Mosquitto ACL line that confines each device (username = device id) to its own topics."""
    return f"pattern readwrite {ROOT}/d/%u/#"
