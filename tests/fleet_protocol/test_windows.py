"""Maintenance windows (issue 17, part 2): cron fields, time zones across a DST change, when a window is open and
when the next opens, two sets that must both be open, and the windows travelling signed in update metadata."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from fleet_protocol.windows import Cron, Window, all_open, is_open, next_all_open, next_open


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="minutes")


NIGHTLY_BERLIN = Window(cron="0 2 * * *", duration_s=2 * 3600, tz="Europe/Berlin")  # 02:00-04:00 local
WEEKDAYS_NOON = Window(cron="0 12 * * 1-5", duration_s=3600)  # UTC


@pytest.mark.parametrize(("expression", "minutes", "hours", "days", "months", "weekdays"), [
    ("* * * * *", range(60), range(24), range(1, 32), range(1, 13), range(7)),
    ("*/15 2-4 1,15 * 7", (0, 15, 30, 45), (2, 3, 4), (1, 15), range(1, 13), (0,)),
    ("5/20 0 * 1-12/6 0-6/3", (5, 25, 45), (0,), range(1, 32), (1, 7), (0, 3, 6)),
])
def test_window_cron_fields(expression, minutes, hours, days, months, weekdays):
    c = Cron(expression)
    assert (c.minutes, c.hours, c.days, c.months, c.weekdays) == tuple(
        frozenset(x) for x in (minutes, hours, days, months, weekdays))


@pytest.mark.parametrize(("window", "why"), [
    ({"cron": "0 2 * * * *", "duration_s": 60}, "needs 5 fields"),
    ({"cron": "60 2 * * *", "duration_s": 60}, "outside 0-59"),
    ({"cron": "0 2 * * mon", "duration_s": 60}, "not a number"),
    ({"cron": "*/0 2 * * *", "duration_s": 60}, "step below 1"),
    ({"cron": "0 0 30 2 *", "duration_s": 60}, "never matches a date"),
    ({"cron": "0 2 * * *", "duration_s": 30}, "greater than or equal to 60"),
    ({"cron": "0 2 * * *", "duration_s": 60, "tz": "Mars/Olympus"}, "unknown time zone"),
    ({"cron": "0 2 * * *", "duration_s": 60, "extra": 1}, "Extra inputs"),
])
def test_window_invalid_ones_are_refused_with_the_reason(window, why):
    with pytest.raises(ValidationError, match=why):
        Window(**window)


@pytest.mark.parametrize(("now", "open_", "next_"), [
    ("2026-12-02T00:30:00+00:00", False, "2026-12-02T01:00+00:00"),  # 01:30 in Berlin (UTC+1)
    ("2026-12-02T01:00:00+00:00", True, "2026-12-02T01:00+00:00"),  # opens
    ("2026-12-02T02:59:00+00:00", True, "2026-12-02T02:59+00:00"),
    ("2026-12-02T03:00:00+00:00", False, "2026-12-03T01:00+00:00"),  # closed at 04:00 local: tomorrow
    ("2026-07-01T00:30:00+00:00", True, "2026-07-01T00:30+00:00"),  # summer: 02:30 CEST
    ("2026-03-29T00:30:00+00:00", False, "2026-03-29T01:00+00:00"),  # DST day: 02:00 does not exist, 03:00 CEST
    ("2026-10-24T23:30:00+00:00", False, "2026-10-25T00:00+00:00"),  # fall back: the first 02:00 (CEST)
])
def test_window_open_and_next_opening_in_its_time_zone(now, open_, next_):
    assert is_open([NIGHTLY_BERLIN], ts(now)) is open_
    assert iso(next_open([NIGHTLY_BERLIN], ts(now))) == next_


def test_window_a_window_open_across_midnight_and_a_weekday_list():
    late = Window(cron="0 23 * * 5", duration_s=4 * 3600)  # Friday 23:00 to Saturday 03:00 UTC
    assert is_open([late], ts("2026-12-05T02:30:00+00:00"))  # Saturday 02:30
    assert not is_open([late], ts("2026-12-05T03:00:00+00:00"))
    assert iso(next_open([late, WEEKDAYS_NOON], ts("2026-12-05T03:00:00+00:00"))) == "2026-12-07T12:00+00:00"
    assert is_open([], ts("2026-12-05T03:00:00+00:00"))  # no windows: no constraint


def test_window_both_sets_must_be_open_and_the_first_time_they_are():
    rollout = [NIGHTLY_BERLIN]  # 01:00-03:00 UTC in winter
    site = [Window(cron="30 2 * * 6", duration_s=3600)]  # Saturdays 02:30-03:30 UTC
    now = ts("2026-12-02T01:30:00+00:00")  # a Wednesday: the rollout's window is open, the site's is not
    assert is_open(rollout, now) and not all_open([rollout, site], now)
    assert iso(next_all_open([rollout, site], now)) == "2026-12-05T02:30+00:00"
    assert next_all_open([rollout, [Window(cron="0 5 * * *", duration_s=3600)]], now) is None  # they never meet


def test_window_travels_signed_and_only_when_used():
    import hashlib

    from securesystemslib.signer import CryptoSigner

    from fleet_protocol.metadata import (
        FIELD,
        ArtifactInfo,
        Probe,
        Provenance,
        Scope,
        UpdateSpec,
        UpdateVerifier,
        build_root,
        build_update,
    )

    root_key, online = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    root = build_root([root_key], [online], expires=datetime(2100, 1, 1, tzinfo=UTC))
    sha = hashlib.sha256(b"model").hexdigest()
    base = dict(scope=Scope(devices=("dev-1",), profile="rpi5"),
                artifact=ArtifactInfo(path=f"blobs/{sha}", sha256=sha, length=5, format="onnx-int8", profile="rpi5",
                                      model="m", model_version="1"),
                probe=Probe(inputs_sha256=sha, atol=0.01, rtol=0.01, min_cosine=0.999),
                provenance=Provenance(source_sha256=sha, calibration_sha256=sha, converter_version="t"))
    import json

    plain = build_update(UpdateSpec(**base), [online], version=1, expires=datetime(2100, 1, 1, tzinfo=UTC))
    assert "windows" not in json.loads(plain)["signed"][FIELD]  # an older agent still reads it
    spec = UpdateSpec(**base, windows=(NIGHTLY_BERLIN,), site_windows=(WEEKDAYS_NOON,))
    signed = build_update(spec, [online], version=2, expires=datetime(2100, 1, 1, tzinfo=UTC))
    got = UpdateVerifier(root, device_id="dev-1", profile="rpi5").verify_update(signed).spec
    assert got.window_sets == ((NIGHTLY_BERLIN,), (WEEKDAYS_NOON,))
    tampered = json.loads(signed)
    tampered["signed"][FIELD]["windows"][0]["cron"] = "* * * * *"
    from fleet_protocol.errors import SignatureError

    with pytest.raises(SignatureError):
        UpdateVerifier(root, device_id="dev-1", profile="rpi5").verify_update(json.dumps(tampered).encode())


@pytest.mark.parametrize(("expression", "day", "matches"), [
    ("0 3 1 * 1", "2026-12-01", True),  # the 1st (a Tuesday): both day fields restricted → either matches
    ("0 3 1 * 1", "2026-12-07", True),  # a Monday
    ("0 3 1 * 1", "2026-12-08", False),
    ("0 3 */2 * 1", "2026-12-07", True),  # "*/2" is not a restriction of the or-rule (Vixie cron): odd days AND Mon
    ("0 3 */2 * 1", "2026-12-01", False),  # odd day, but a Tuesday
    ("0 3 * * 0", "2026-12-06", True), ("0 3 * * 7", "2026-12-06", True),  # Sunday, both ways
    ("0 3 29 2 *", "2028-02-29", True),
])
def test_window_day_fields_follow_cron(expression, day, matches):
    assert Cron(expression).day_matches(datetime.fromisoformat(day).date()) is matches


def test_window_sets_that_keep_missing_each_other_end_the_search_quickly():
    import time

    even, odd = [Window(cron="*/2 * * * *", duration_s=60)], [Window(cron="1-59/2 * * * *", duration_s=60)]
    t0 = time.perf_counter()
    assert next_all_open([even, odd], ts("2026-12-02T00:00:00+00:00")) is None
    assert time.perf_counter() - t0 < 10  # bounded in jumps, not a year of minutes


def test_window_offer_lasts_until_after_its_windows_first_open():
    from fleet_server.rollouts.delivery import OFFER_TTL, DeliveryError, offer_expiry

    class Spec:
        def __init__(self, *sets):
            self.window_sets = sets

    now = datetime.fromisoformat("2026-12-02T00:00:00+00:00")
    assert offer_expiry(Spec(), now) == now + OFFER_TTL
    monthly = Window(cron="0 3 1 * *", duration_s=3600)  # next: 2027-01-01T03:00Z, beyond a 7-day offer
    assert offer_expiry(Spec((monthly,)), now) == datetime.fromisoformat("2027-01-01T03:00:00+00:00") + OFFER_TTL
    with pytest.raises(DeliveryError, match="never open at the same time"):
        offer_expiry(Spec((monthly,), (Window(cron="0 5 * * *", duration_s=60),)), now)
