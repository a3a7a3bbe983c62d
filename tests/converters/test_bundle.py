"""Signed app bundles end to end: the real converters build both artifacts; verification is tamper-tested."""

import hashlib
import json
import zipfile

import pytest

from converters.bundle import MANIFEST, SIGNATURE, BundleError, verify_bundle
from converters.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from fleet_protocol.keys import generate_signer, key_from_public_pem
from tests import zoo

from .conftest import random_npz
from .test_cli import invoke

pytestmark = pytest.mark.slow
EXIT_UNVERIFIED = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    model = zoo.mobilenet_like(d / "classifier.onnx")
    calib = random_npz(d / "calib.npz", input=(32, 3, 64, 64))
    assert invoke("keygen", "-o", d / "keys").exit_code == 0
    (d / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    args = [model, "--calib", calib, "--signing-key", d / "keys" / "fleet-signing.pem", "--labels",
            d / "labels.txt", "--model-version", "2.1.0", "--latency-runs", "3"]
    first = invoke("bundle", *args, "-o", d / "a.zip")
    assert first.exit_code == EXIT_OK, first.output
    second = invoke("bundle", *args, "-o", d / "b.zip")
    assert second.exit_code == EXIT_OK, second.output
    return d, model


def trusted(d):
    return [key_from_public_pem((d / "keys" / "fleet-signing.pub.pem").read_bytes())]


def test_same_inputs_give_the_same_bytes(built):
    d, _ = built
    assert (d / "a.zip").read_bytes() == (d / "b.zip").read_bytes()
    with zipfile.ZipFile(d / "a.zip") as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        names = z.namelist()
    assert names[:2] == [MANIFEST, SIGNATURE] and names[2:] == sorted(names[2:])


def test_bundle_contents_and_manifest(built):
    d, model = built
    result = invoke("verify-bundle", d / "a.zip", "--public-key", d / "keys" / "fleet-signing.pub.pem", "--json")
    assert result.exit_code == EXIT_OK, result.output
    manifest = json.loads(result.stdout)
    assert manifest["model"] == {"name": "classifier", "version": "2.1.0"}
    ios, android = manifest["platforms"]["ios"], manifest["platforms"]["android"]
    assert (ios["format"], ios["profile"], ios["artifact"]) == ("coreml-int8", "ios-a15", "ios/classifier.mlpackage")
    assert (android["format"], android["artifact"]) == ("tflite-int8", "android/classifier.tflite")
    assert ios["numeric_fidelity_measured"] is False and android["numeric_fidelity_measured"] is True
    assert ios["inputs"][0]["layout"] == "as in the ONNX model" and ios["inputs"][0]["shape"] == [1, 3, 64, 64]
    a_in = android["inputs"][0]
    assert a_in["layout"].startswith("NHWC") and a_in["tflite_shape"] == [1, 64, 64, 3]
    assert a_in["tflite_dtype"] == "int8" and a_in["quantization"]["scale"] > 0
    assert android["outputs"][0]["name"] == "logits" and "quantization" in android["outputs"][0]
    prov = manifest["provenance"]
    assert prov["source_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert prov["calibration_samples"] == 24 and len(prov["calibration_sha256"]) == 64
    assert {"coremltools", "tensorflow-cpu", "onnxruntime", "onnx2tf"} <= set(prov["converter"])
    with zipfile.ZipFile(d / "a.zip") as z:
        assert z.read("labels.txt").decode().splitlines()[3] == "class 3"
        assert hashlib.sha256(z.read(android["artifact"])).hexdigest() == android["sha256"]
        report = json.loads(z.read(ios["report"]))
        assert report["status"] == "shippable" and "latency" not in report  # host timings stay out
        assert any(n.startswith(ios["artifact"] + "/Data/") for n in z.namelist())


def rewrite(src, dst, *, change=None, drop=None, add=None):
    """Copy a bundle, flipping one byte of member ``change`` (a valid zip: an attacker's edit, not corruption)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename == drop:
                continue
            data = zin.read(info.filename)
            if info.filename == change:
                data = bytearray(data)
                data[len(data) // 2] ^= 0x01
                data = bytes(data)
            zout.writestr(info, data)
        if add:  # headers exactly as write_bundle makes them, so only the name gives it away
            info = zipfile.ZipInfo(add, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.create_system, info.external_attr = zipfile.ZIP_DEFLATED, 3, 0o644 << 16
            zout.writestr(info, b"extra")


def test_any_changed_member_fails_verification(built, tmp_path):
    d, _ = built
    keys = trusted(d)
    assert verify_bundle(d / "a.zip", keys)["format"] == "edgefleet-app-bundle/1"
    with zipfile.ZipFile(d / "a.zip") as z:
        names = z.namelist()
    for name in names:
        bad = tmp_path / "bad.zip"
        rewrite(d / "a.zip", bad, change=name)
        with pytest.raises(BundleError):
            verify_bundle(bad, keys)
    result = invoke("verify-bundle", bad, "--public-key", d / "keys" / "fleet-signing.pub.pem")
    assert result.exit_code == EXIT_UNVERIFIED and "error" in result.output


def test_corrupted_truncated_extended_or_missing_members_fail(built, tmp_path):
    d, _ = built
    keys = trusted(d)
    blob = (d / "a.zip").read_bytes()
    with zipfile.ZipFile(d / "a.zip") as z:  # every header and directory byte, and some content bytes
        offsets = [o for i in z.infolist() for o in range(i.header_offset, i.header_offset + 30 + len(i.filename))]
        offsets += list(range(z.start_dir, len(blob)))
    offsets += [100, len(blob) // 3, len(blob) // 2]
    for offset in offsets:
        bad = bytearray(blob)
        bad[offset] ^= 0x01
        (tmp_path / "flip.zip").write_bytes(bytes(bad))
        with pytest.raises(BundleError):
            verify_bundle(tmp_path / "flip.zip", keys)
    (tmp_path / "short.zip").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BundleError, match="not a readable zip"):
        verify_bundle(tmp_path / "short.zip", keys)
    rewrite(d / "a.zip", tmp_path / "extra.zip", add="ios/classifier.mlpackage/evil.bin")
    with pytest.raises(BundleError, match="not in the signed manifest"):
        verify_bundle(tmp_path / "extra.zip", keys)
    rewrite(d / "a.zip", tmp_path / "missing.zip", drop="labels.txt")
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(tmp_path / "missing.zip", keys)
    rewrite(d / "a.zip", tmp_path / "escape.zip", add="../../etc/passwd")
    with pytest.raises(BundleError, match="unsafe"):
        verify_bundle(tmp_path / "escape.zip", keys)


def test_an_untrusted_key_is_refused(built):
    d, _ = built
    other = generate_signer().public_key
    with pytest.raises(BundleError, match="not a trusted key"):
        verify_bundle(d / "a.zip", [other])


def test_a_platform_that_cannot_ship_writes_no_bundle(built, tmp_path):
    d, _ = built
    model = zoo.recurrent(tmp_path / "gru.onnx")  # no Core ML route for GRU
    calib = random_npz(tmp_path / "calib.npz", series=(16, 1, 20, 16))
    result = invoke("bundle", model, "--calib", calib, "--signing-key", d / "keys" / "fleet-signing.pem",
                    "-o", tmp_path / "gru.zip", "--latency-runs", "3")
    assert result.exit_code == EXIT_REFUSED, result.output
    assert "GRU" in result.output and not (tmp_path / "gru.zip").exists()


def test_bad_signing_key_and_bad_name_are_usage_errors(built, tmp_path):
    d, model = built
    (tmp_path / "not-a-key.pem").write_text("hello")
    calib = random_npz(tmp_path / "calib.npz", input=(8, 3, 64, 64))
    result = invoke("bundle", model, "--calib", calib, "--signing-key", tmp_path / "not-a-key.pem",
                    "-o", tmp_path / "x.zip")
    assert result.exit_code == EXIT_USAGE and "signing-key" in result.output
    result = invoke("bundle", model, "--calib", calib, "--signing-key", d / "keys" / "fleet-signing.pem",
                    "--name", "../evil", "-o", tmp_path / "x.zip")
    assert result.exit_code == EXIT_USAGE and not (tmp_path / "x.zip").exists()
    assert invoke("keygen", "-o", d / "keys").exit_code == EXIT_USAGE  # never overwrites a key
