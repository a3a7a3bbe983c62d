"""One test per attack on update metadata; every one must end in its own typed error."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol import errors
from fleet_protocol.keys import generate_signer, signer_from_pem, signer_to_pem
from fleet_protocol.metadata import (
    ArtifactInfo,
    DeltaInfo,
    Limits,
    Probe,
    Provenance,
    Scope,
    UpdateSpec,
    UpdateVerifier,
    build_root,
    build_update,
    rotate_root,
    verify_bytes,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=30)
H = "ab" * 32
ROOT_KEYS = [generate_signer() for _ in range(3)]
ONLINE = generate_signer()
ROOT = build_root(ROOT_KEYS[:2], [ONLINE], root_threshold=2, expires=NOW + timedelta(days=365))


def spec(**scope) -> UpdateSpec:
    return UpdateSpec(
        scope=Scope(**({"devices": ("dev-1",), "profile": "rpi5"} | scope)),
        artifact=ArtifactInfo(path="models/cls/2.0/model.int8.onnx", sha256=H, length=10, format="onnx-int8",
                              profile="rpi5", model="cls", model_version="2.0"),
        deltas=(DeltaInfo(path="deltas/x.bsdiff4", algorithm="bsdiff4", base_sha256="cd" * 32, sha256="ef" * 32,
                          length=3),),
        probe=Probe(inputs_sha256=H, atol=1e-3, rtol=1e-2, min_cosine=0.999),
        provenance=Provenance(source_sha256=H, calibration_sha256=H, converter_version="0.1.0",
                              fidelity={"top1_agreement": 0.995}))


def update(version=1, signers=(ONLINE,), expires=LATER, **scope) -> bytes:
    return build_update(spec(**scope), list(signers), version=version, expires=expires)


def verifier(**kw) -> UpdateVerifier:
    return UpdateVerifier(ROOT, **({"device_id": "dev-1", "profile": "rpi5", "clock": lambda: NOW} | kw))


def test_valid_update_verifies_and_advances_the_trusted_version():
    v = verifier()
    got = v.verify_update(update(version=3))
    assert got.version == 3 and v.update_version == 3 and got.spec.artifact.model_version == "2.0"
    assert got.delta_from("cd" * 32).algorithm == "bsdiff4" and got.delta_from(H) is None


def test_cohort_scope_matches_devices_of_that_cohort():
    assert verifier(cohort="canary").verify_update(update(devices=(), cohort="canary")).version == 1


def test_bad_signature():
    md = json.loads(update())
    md["signatures"][0]["sig"] = "00" * 64
    with pytest.raises(errors.SignatureError):
        verifier().verify_update(json.dumps(md).encode())


def test_tampered_signed_content_breaks_the_signature():
    md = json.loads(update())
    md["signed"]["x-edgefleet"]["artifact"]["sha256"] = "00" * 32
    md["signed"]["targets"]["models/cls/2.0/model.int8.onnx"]["hashes"]["sha256"] = "00" * 32
    with pytest.raises(errors.SignatureError):
        verifier().verify_update(json.dumps(md).encode())


def test_too_few_signatures_for_the_threshold():
    second = generate_signer()
    root = build_root(ROOT_KEYS[:1], [ONLINE, second], online_threshold=2, expires=LATER)
    v = UpdateVerifier(root, device_id="dev-1", profile="rpi5", clock=lambda: NOW)
    with pytest.raises(errors.ThresholdError, match="1 valid signature.*threshold is 2"):
        v.verify_update(update(signers=(ONLINE,)))
    assert v.verify_update(update(signers=(ONLINE, second))).version == 1


def test_signature_by_a_key_the_root_does_not_list():
    with pytest.raises(errors.UntrustedKeyError):
        verifier().verify_update(update(signers=(generate_signer(),)))


def test_unsigned_metadata():
    md = json.loads(update())
    md["signatures"] = []
    with pytest.raises(errors.ThresholdError):
        verifier().verify_update(json.dumps(md).encode())


@pytest.mark.parametrize("version", [5, 4])
def test_older_or_equal_version_is_a_rollback(version):
    v = verifier(update_version=5)
    with pytest.raises(errors.RollbackError):
        v.verify_update(update(version=version))


def test_expired_metadata_is_a_freeze_attack():
    with pytest.raises(errors.ExpiredError):
        verifier().verify_update(update(expires=NOW - timedelta(seconds=1)))


@pytest.mark.parametrize("scope", [{"devices": ("dev-2",)}, {"profile": "jetson-nano"},
                                   {"devices": (), "cohort": "beta"}])
def test_metadata_for_another_device_cohort_or_profile_is_mix_and_match(scope):
    with pytest.raises(errors.MixAndMatchError):
        verifier(cohort="canary").verify_update(update(**scope))


def test_oversized_metadata_is_refused_before_parsing():
    with pytest.raises(errors.OversizedError):
        verifier(limits=Limits(max_update_bytes=512)).verify_update(update())
    with pytest.raises(errors.OversizedError):
        verifier().verify_update(b"{" + b" " * (300 * 1024))


def test_inconsistent_target_entries_are_malformed():
    other = build_update(spec(), [ONLINE], version=1, expires=LATER)
    md = json.loads(other)
    del md["signed"]["targets"]["deltas/x.bsdiff4"]
    # re-sign honestly: a server bug, not an attacker, produced this
    from tuf.api.metadata import Metadata
    fixed = Metadata.from_bytes(json.dumps(md).encode())
    fixed.signatures.clear()
    fixed.sign(ONLINE)
    with pytest.raises(errors.MalformedError, match="inconsistently"):
        verifier().verify_update(fixed.to_bytes())


def test_target_bytes_must_match_length_and_hash():
    verify_bytes(b"0123456789", sha256=__import__("hashlib").sha256(b"0123456789").hexdigest(), length=10)
    with pytest.raises(errors.TargetMismatchError, match="bytes"):
        verify_bytes(b"012345678", sha256=H, length=10)
    with pytest.raises(errors.TargetMismatchError, match="sha256"):
        verify_bytes(b"0123456789", sha256=H, length=10)


def test_root_rotation_followed_when_signed_by_old_and_new_thresholds():
    new_keys = [generate_signer(), generate_signer()]
    new_root = rotate_root(ROOT, new_keys, [ONLINE], old_root_signers=ROOT_KEYS[:2], root_threshold=2,
                           expires=LATER)
    v = verifier()
    assert v.update_root(new_root) == 2
    assert v.verify_update(update()).version == 1  # the online key is still listed
    with pytest.raises(errors.RollbackError):
        v.update_root(new_root)  # replaying the same step


def test_root_rotation_without_the_old_threshold_is_refused():
    new_keys = [generate_signer()]
    only_one_old = rotate_root(ROOT, new_keys, [ONLINE], old_root_signers=ROOT_KEYS[:1], expires=LATER)
    with pytest.raises(errors.ThresholdError):
        verifier().update_root(only_one_old)
    attacker = rotate_root(ROOT, new_keys, [ONLINE], old_root_signers=[generate_signer()], expires=LATER)
    with pytest.raises(errors.UntrustedKeyError):
        verifier().update_root(attacker)


def test_rotated_out_online_key_is_no_longer_trusted():
    new_online = generate_signer()
    v = verifier()
    v.update_root(rotate_root(ROOT, ROOT_KEYS[:2], [new_online], old_root_signers=ROOT_KEYS[:2], root_threshold=2,
                              expires=LATER))
    with pytest.raises(errors.UntrustedKeyError):
        v.verify_update(update(signers=(ONLINE,)))
    assert v.verify_update(update(signers=(new_online,))).version == 1


@pytest.mark.parametrize("data", [b"", b"null", b"[]", b"{}", b"not json", b'{"signed": {}, "signatures": []}',
                                  b'{"signed": {"_type": "root"}, "signatures": []}', "text".encode("utf-16"),
                                  b"\xa2ax\x01ay\x02"])  # the last is CBOR: refused as not JSON
def test_malformed_metadata_of_every_kind(data):
    with pytest.raises(errors.MalformedError):
        verifier().verify_update(data)


def test_wrong_role_type_is_malformed():
    with pytest.raises(errors.MalformedError, match="expected targets"):
        verifier().verify_update(ROOT)


def test_private_keys_round_trip_through_pem():
    again = signer_from_pem(signer_to_pem(ONLINE))
    assert again.public_key.keyid == ONLINE.public_key.keyid
    assert verifier().verify_update(update(signers=(again,))).version == 1
    with pytest.raises(errors.MalformedError):
        signer_from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


GOOD = update(version=7)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzzed_metadata_always_ends_in_a_typed_error(data):
    """Random byte mutations, truncations and insertions: a verification error, never another exception."""
    blob = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if op == "flip" and blob:
            blob[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del blob[i:]
        else:
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        verifier().verify_update(bytes(blob))
    except errors.VerificationError:
        return
    # a mutation inside insignificant JSON whitespace can leave the metadata valid; then it must be unchanged
    assert json.loads(bytes(blob))["signed"] == json.loads(GOOD)["signed"]


def test_signed_chunk_list_travels_with_the_artifact():
    from fleet_protocol.chunks import ChunkAssembler, chunks, manifest_for

    payload = bytes(range(256)) * 100
    m = manifest_for(payload, 4096)
    s = spec()
    artifact = s.artifact.model_copy(update={"sha256": m.sha256, "length": m.length, "chunks": m})
    data = build_update(s.model_copy(update={"artifact": artifact}), [ONLINE], version=1, expires=LATER)
    got = verifier().verify_update(data).spec.artifact.chunks
    assert got == m
    bad = s.model_copy(update={"artifact": artifact.model_copy(update={"chunks": manifest_for(b"other", 4096)})})
    with pytest.raises(errors.MalformedError, match="chunk list"):
        verifier().verify_update(build_update(bad, [ONLINE], version=1, expires=LATER))
    assert all(len(c) <= 4096 for _, c in chunks(payload, got)) and ChunkAssembler


def test_delta_bytes_must_match_the_signed_delta_entry():
    from fleet_protocol import delta

    old, new = b"old model" * 500, b"new model" * 500
    patch = delta.encode(old, new).data
    s = spec()
    d = DeltaInfo(path="deltas/a-b.patch", algorithm="zstd-patch", base_sha256=delta.sha256(old),
                  sha256=delta.sha256(patch), length=len(patch))
    got = verifier().verify_update(build_update(s.model_copy(update={"deltas": (d,)}), [ONLINE], version=1,
                                                expires=LATER))
    signed_delta = got.delta_from(delta.sha256(old))
    verify_bytes(patch, sha256=signed_delta.sha256, length=signed_delta.length, what="delta")
    tampered = patch[:-1] + bytes([patch[-1] ^ 1])
    with pytest.raises(errors.TargetMismatchError, match="delta: sha256"):
        verify_bytes(tampered, sha256=signed_delta.sha256, length=signed_delta.length, what="delta")
    with pytest.raises(errors.TargetMismatchError, match="delta: .* bytes"):
        verify_bytes(patch + b"more", sha256=signed_delta.sha256, length=signed_delta.length, what="delta")
