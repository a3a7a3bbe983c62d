"""Remote configuration's shared parts (issue 17, part 7): the settings table both sides check, and the signed
document a device verifies (signature, version, expiry, device)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from securesystemslib.signer import CryptoSigner

from fleet_protocol import config
from fleet_protocol.errors import ExpiredError, MixAndMatchError, RollbackError, SignatureError, UntrustedKeyError
from fleet_protocol.metadata import ConfigSpec, UpdateVerifier, build_config, build_root

ROOT_KEY, ONLINE = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
ROOT = build_root([ROOT_KEY], [ONLINE], expires=datetime(2100, 1, 1, tzinfo=UTC))
LATER = datetime.now(UTC) + timedelta(days=1)


def doc(settings: dict, *, version: int = 5, device: str = "dev-1", signer=ONLINE, expires=LATER) -> bytes:
    return build_config(ConfigSpec(device=device, settings_json=json.dumps(settings)), [signer], version=version,
                        expires=expires)


def verifier() -> UpdateVerifier:
    return UpdateVerifier(ROOT, device_id="dev-1", profile="rpi5")


@pytest.mark.parametrize(("name", "value", "why"), [
    ("telemetry_interval_s", 0.5, "between 1 and 86400"),
    ("telemetry_interval_s", "60", "must be a number"),
    ("threads", 2.5, "must be an integer"),
    ("threads", True, "must be an integer"),
    ("log_level", "LOUD", "one of DEBUG, INFO"),
    ("max_download_bps", 10, "between 1024"),
    ("shell", "rm -rf /", "unknown setting"),
])
def test_config_settings_are_checked_with_a_reason(name, value, why):
    ok, refused = config.split({name: value})
    assert ok == {} and why in refused[name]


def test_config_good_settings_pass_and_are_normalised():
    ok, refused = config.split({"telemetry_interval_s": 2.5, "threads": 4, "log_level": "debug",
                                "max_download_bps": None, "daily_download_bytes": 5_000_000})
    assert refused == {} and ok["log_level"] == "DEBUG" and ok["max_download_bps"] is None


def test_config_document_verifies_and_carries_floats_as_text():
    got = verifier().verify_config(doc({"telemetry_interval_s": 2.5}), after_version=4)
    assert got.version == 5 and got.spec.settings() == {"telemetry_interval_s": 2.5}


@pytest.mark.parametrize(("data", "error"), [
    (lambda: doc({}, version=4), RollbackError),  # not newer than the applied version 4
    (lambda: doc({}, device="dev-2"), MixAndMatchError),  # another device's settings
    (lambda: doc({}, expires=datetime.now(UTC) - timedelta(seconds=1)), ExpiredError),
    (lambda: doc({}, signer=CryptoSigner.generate_ed25519()), UntrustedKeyError),
    (lambda: doc({"log_level": "DEBUG"}).replace(b"DEBUG", b"ERROR"), SignatureError),
])
def test_config_document_refusals(data, error):
    with pytest.raises(error):
        verifier().verify_config(data(), after_version=4)
