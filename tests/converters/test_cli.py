import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from converters.cli import EXIT_INPUT, EXIT_OK, EXIT_REFUSED, EXIT_USAGE, app
from tests import zoo

from .conftest import random_npz

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_profiles_lists_every_builtin_profile_as_table_and_json():
    table = invoke("profiles")
    assert table.exit_code == 0 and "jetson-orin-nano" in table.stdout
    data = json.loads(invoke("profiles", "--json").stdout)
    assert {p["id"] for p in data} >= {"rpi4", "rpi5", "ios-a15", "android-arm64", "jetson-nano"}


def test_convert_all_profiles_json_reports_every_format(mobilenet, tmp_path):
    calib = random_npz(tmp_path / "calib.npz", input=(24, 3, 64, 64))
    result = invoke("convert", mobilenet, "--all-profiles", "--calib", calib, "-o", tmp_path / "out", "--json",
                    "--latency-runs", "3")
    reports = json.loads(result.stdout)  # stdout holds nothing but the JSON
    by = {(r["profile"], r["format"]): r for r in reports}
    assert by[("rpi5", "onnx-int8")]["status"] == "shippable"
    assert by[("rpi5", "tflite-int8")]["status"] == "shippable"
    assert (tmp_path / "out" / "android-arm64" / "model.int8.tflite").exists()
    ios = by[("ios-a15", "coreml-int8")]  # every format every profile declares is built now
    assert ios["status"] == "shippable" and ios["coreml"]["numeric_fidelity_measured"] is False
    assert (tmp_path / "out" / "ios-a15" / "model.int8.mlpackage" / "Manifest.json").exists()
    assert by[("rpi5", "onnx-int8")]["calibration"]["samples"] + by[("rpi5", "onnx-int8")]["evaluation"][
        "samples"] == 24
    expected = EXIT_REFUSED if any(r["status"] == "refused" for r in reports) else EXIT_OK
    assert result.exit_code == expected
    saved = json.loads((tmp_path / "out" / "rpi5" / "onnx-int8.report.json").read_text())
    assert saved["artifact_sha256"] == by[("rpi5", "onnx-int8")]["artifact_sha256"]


def test_summary_table_and_separate_eval_set(mobilenet, tmp_path):
    calib = random_npz(tmp_path / "calib.npz", input=(16, 3, 64, 64))
    ev = random_npz(tmp_path / "eval.npz", input=(6, 3, 64, 64))
    result = invoke("convert", mobilenet, "-p", "rpi5", "--calib", calib, "--eval", ev, "-o", tmp_path / "out",
                    "--latency-runs", "3")
    assert result.exit_code == EXIT_OK, result.output
    assert "shippable" in result.stdout and "rpi5" in result.stdout
    report = json.loads((tmp_path / "out" / "rpi5" / "onnx-int8.report.json").read_text())
    assert (report["calibration"]["samples"], report["evaluation"]["samples"]) == (16, 6)


def test_refusal_exits_4_and_leaves_no_artifact(tmp_path):
    model = zoo.weights_in_subgraph(tmp_path / "if.onnx")
    result = invoke("convert", model, "-p", "rpi5", "--synthetic-calibration", "8", "-o", tmp_path / "out")
    assert result.exit_code == EXIT_REFUSED
    assert "nothing quantized" in result.stdout
    assert not (tmp_path / "out" / "rpi5" / "model.int8.onnx").exists()


def test_bad_inputs_exit_with_one_clear_line(mobilenet, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    cases = [
        ((junk, "-p", "rpi5", "--synthetic-calibration", "4"), EXIT_INPUT, "not an ONNX model"),
        ((mobilenet, "-p", "pi9", "--synthetic-calibration", "4"), EXIT_USAGE, "unknown profile 'pi9'"),
        ((mobilenet, "-p", "rpi5"), EXIT_USAGE, "--calib"),
        ((mobilenet, "--synthetic-calibration", "4"), EXIT_USAGE, "--all-profiles"),
        ((mobilenet, "-p", "rpi5", "--calib", random_npz(tmp_path / "c.npz", input=(4, 3, 32, 32))), EXIT_INPUT,
         "expects shape"),
        ((mobilenet, "-p", "rpi5", "--synthetic-calibration", "4", "--input-shape", "input=1,3,x"), EXIT_USAGE,
         "NAME=D1,D2"),
    ]
    for args, code, message in cases:
        result = invoke("convert", *args, "-o", tmp_path / "out")
        assert result.exit_code == code, (args, result.output)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
        assert "Traceback" not in result.output


def test_console_script_runs_as_a_real_process(mobilenet, tmp_path):
    exe = shutil.which("fleet-convert", path=str(Path(sys.executable).parent))
    assert exe, "the fleet-convert console script is installed with the package"
    np.savez(tmp_path / "c.npz", input=np.random.default_rng(0).standard_normal((12, 3, 64, 64)).astype(np.float32))
    proc = subprocess.run([exe, "convert", str(mobilenet), "-p", "jetson-nano", "--calib", str(tmp_path / "c.npz"),
                           "-o", str(tmp_path / "out"), "--json", "--latency-runs", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (EXIT_OK, EXIT_REFUSED), proc.stderr
    assert json.loads(proc.stdout)[0]["profile"] == "jetson-nano"
