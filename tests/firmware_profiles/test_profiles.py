from pathlib import Path

import pytest

from firmware_profiles import (
    ArtifactFormat,
    CalibrationMethod,
    ProfileError,
    QuantDtype,
    builtin_profile_ids,
    load_profile,
)

REQUIRED = {"jetson-orin-nano", "jetson-nano", "rpi4", "rpi5", "android-arm64", "ios-a15"}
GOOD = (Path(__file__).parents[2] / "firmware_profiles" / "profiles" / "rpi5.toml").read_text()


def test_every_required_profile_is_built_in_and_valid():
    assert REQUIRED <= set(builtin_profile_ids())
    for pid in builtin_profile_ids():
        p = load_profile(pid)
        assert p.id == pid and p.artifacts and p.memory.max_artifact_mb <= p.memory.flash_mb


@pytest.mark.parametrize("pid", ["jetson-orin-nano", "jetson-nano"])
def test_jetson_profiles_are_tensorrt_qdq_symmetric_per_channel_with_fp16_fallback(pid):
    p = load_profile(pid)
    q = p.target(ArtifactFormat.ONNX_INT8).quantization
    assert q.format.value == "QDQ" and q.per_channel and q.activation_symmetric and q.weight_symmetric
    assert q.activation_type is QuantDtype.INT8 and q.fallback_precision.value == "fp16"
    assert "TensorrtExecutionProvider" in p.artifacts[0].execution_providers


@pytest.mark.parametrize("pid", ["rpi4", "rpi5"])
def test_raspberry_pi_profiles_declare_onnx_runtime_then_tflite_with_xnnpack(pid):
    p = load_profile(pid)
    assert p.formats == (ArtifactFormat.ONNX_INT8, ArtifactFormat.TFLITE_INT8)
    assert p.target(ArtifactFormat.TFLITE_INT8).delegate == "xnnpack"


def test_mobile_profiles_declare_their_formats():
    assert load_profile("android-arm64").formats == (ArtifactFormat.TFLITE_INT8,)
    assert load_profile("ios-a15").formats == (ArtifactFormat.COREML_INT8,)


def test_calibration_method_comes_from_the_profile():
    assert load_profile("jetson-orin-nano").artifacts[0].quantization.calibration_method is CalibrationMethod.PERCENTILE
    assert load_profile("jetson-nano").artifacts[0].quantization.calibration_method is CalibrationMethod.MINMAX


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ProfileError, match="unknown profile 'pi9'.*rpi5"):
        load_profile("pi9")


def _write(tmp_path: Path, text: str, name: str = "rpi5.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("old", "new", "message"), [
    ('calibration_method = "minmax"', 'calibration_method = "magic"', r"artifacts\.0\.quantization\.calibration_method"),
    ("ram_mb = 8192", 'ram_mb = "lots"', r"memory\.ram_mb"),
    ('runtime_versions = ">=1.18,<2"', 'runtime_versions = "newest please"', r"runtime_versions.*not a version range"),
    ("min_top1_agreement = 0.99", "min_top1_agreement = 1.5", r"fidelity\.min_top1_agreement"),
    ('activation_type = "uint8"\nweight_type = "int8"\nactivation_symmetric = false',
     'activation_type = "uint8"\nweight_type = "int8"\nactivation_symmetric = true', "uint8 cannot be symmetric"),
    ("schema_version = 1", "schema_version = 7", "unsupported schema_version 7"),
    ('[ops]', 'colour = "red"\n[ops]', r"fidelity\.colour.*Extra inputs"),
])
def test_invalid_profile_error_names_file_and_field(tmp_path, old, new, message):
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ProfileError, match=message) as e:
        load_profile(path)
    assert str(path) in str(e.value)


def test_profile_id_must_match_file_name(tmp_path):
    with pytest.raises(ProfileError, match="does not match the file name"):
        load_profile(_write(tmp_path, GOOD, "my-board.toml"))


def test_broken_toml_is_a_clear_error(tmp_path):
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(_write(tmp_path, GOOD + "\n[[[broken"))


def test_custom_profile_file_loads(tmp_path):
    custom = GOOD.replace('id = "rpi5"', 'id = "my-board"')
    assert load_profile(_write(tmp_path, custom, "my-board.toml")).id == "my-board"
