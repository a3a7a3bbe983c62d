import pytest

from fleet_protocol.crypto import decrypt, encrypt_for, generate_device_key, key_id
from fleet_protocol.errors import DecryptError

PRIVATE, PUBLIC = generate_device_key()
PLAIN = bytes(range(256)) * 64
ENVELOPE = encrypt_for(PUBLIC, PLAIN, aad=b"target-sha")


def test_round_trip_and_fresh_randomness_each_time():
    assert decrypt(PRIVATE, ENVELOPE, aad=b"target-sha") == PLAIN
    assert encrypt_for(PUBLIC, PLAIN) != encrypt_for(PUBLIC, PLAIN)
    assert len(key_id(PUBLIC)) == 32


@pytest.mark.parametrize(("region", "offset"), [("ephemeral key", 10), ("wrap nonce", 40), ("wrapped key", 60),
                                                ("nonce", 100), ("ciphertext", 500), ("tag", -1)])
def test_tampering_with_any_region_is_detected(region, offset):
    bad = bytearray(ENVELOPE)
    bad[offset] ^= 0x01
    with pytest.raises(DecryptError):
        decrypt(PRIVATE, bytes(bad), aad=b"target-sha")


def test_another_devices_key_wrong_aad_and_truncation_are_refused():
    other, _ = generate_device_key()
    with pytest.raises(DecryptError):
        decrypt(other, ENVELOPE, aad=b"target-sha")
    with pytest.raises(DecryptError):
        decrypt(PRIVATE, ENVELOPE, aad=b"another-target")
    for cut in (0, 50, 120, len(ENVELOPE) - 1):
        with pytest.raises(DecryptError):
            decrypt(PRIVATE, ENVELOPE[:cut], aad=b"target-sha")
    with pytest.raises(DecryptError):
        encrypt_for(b"short", PLAIN)
