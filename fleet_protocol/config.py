"""Remote configuration (issue 17, part 7): the settings an operator may change on a device without a release, with
the bounds both sides check. The server refuses what is out of bounds when it is set; the agent checks again (a
newer server may know settings an older agent does not) and reports, per setting, what it applied and why it
refused the rest.

The desired document travels signed (``fleet_protocol.metadata.build_config``) as a retained message per device,
so a device that was offline gets the last one when it returns; versions only move forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Scalar = bool | int | float | str | None
MAX_SETTINGS = 32
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class SettingError(ValueError):
    """Why one setting's value is refused."""


def _number(lo: float, hi: float, *, integer: bool, optional: bool = False) -> Callable[[Scalar], Scalar]:
    def check(value: Scalar) -> Scalar:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            raise SettingError(f"must be {'an integer' if integer else 'a number'}"
                               f"{' or null' if optional else ''}, got {value!r}")
        if not lo <= value <= hi:
            raise SettingError(f"must be between {lo:g} and {hi:g}, got {value!r}")
        return value
    return check


def _level(value: Scalar) -> Scalar:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise SettingError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


@dataclass(frozen=True)
class Setting:
    check: Callable[[Scalar], Scalar]
    doc: str


SETTINGS: dict[str, Setting] = {
    "telemetry_interval_s": Setting(_number(1, 86_400, integer=False), "seconds per telemetry window"),
    "threads": Setting(_number(1, 64, integer=True), "inference threads (applies at the next model load)"),
    "log_level": Setting(_level, "the agent's log level"),
    "max_download_bps": Setting(_number(1024, 10**10, integer=True, optional=True),
                                "download bandwidth cap in bytes/s (null: none)"),
    "daily_download_bytes": Setting(_number(10**5, 10**13, integer=True, optional=True),
                                    "download budget per UTC day (null: none)"),
    "chunk_window": Setting(_number(1, 4096, integer=True), "MQTT chunks asked for at once"),
}


def check(name: str, value: Scalar) -> Scalar:
    """The value to apply, or SettingError with the reason."""
    setting = SETTINGS.get(name)
    if setting is None:
        raise SettingError(f"unknown setting (known: {', '.join(sorted(SETTINGS))})")
    return setting.check(value)


def split(settings: dict[str, Scalar]) -> tuple[dict[str, Scalar], dict[str, str]]:
    """(what can be applied, why the rest cannot)."""
    ok, refused = {}, {}
    for name, value in settings.items():
        try:
            ok[name] = check(name, value)
        except SettingError as e:
            refused[name] = str(e)[:200]
    return ok, refused
