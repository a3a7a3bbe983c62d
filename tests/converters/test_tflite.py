"""TFLite INT8 through the real toolchain (onnx2tf → TFLiteConverter with our calibration data → LiteRT).

Fidelity is recomputed here from the written .tflite with a fresh LiteRT interpreter."""

import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from converters.fidelity import cosine_per_sample
from converters.report import Status
from converters.tflite_int8 import LiteRTModel
from tests import zoo

from .test_convert import convert, run, samples_for, strict_profile

pytestmark = pytest.mark.slow


def tflite_reports(reports):
    return [r for r in reports if r.format == "tflite-int8"]


def test_mobilenet_full_integer_tflite_for_pi_and_android(tmp_path):
    model = zoo.mobilenet_like(tmp_path / "m.onnx")
    reports, ev = convert(model, samples_for(model), tmp_path, ["rpi5", "android-arm64"])
    rpi5, android = tflite_reports(reports)
    assert rpi5.status is Status.SHIPPABLE and android.status is Status.SHIPPABLE, (rpi5.reasons, android.reasons)
    assert rpi5.tflite.input_layouts == {"input": "NHWC (transposed from the ONNX NCHW)"}
    assert rpi5.tflite.float_ops == [] and rpi5.latency.int8_ms > 0 and rpi5.tflite.conversion_peak_rss_mb > 0
    path = tmp_path / "out" / "rpi5" / "model.int8.tflite"
    assert path.stat().st_size / model.stat().st_size <= 0.36
    it = Interpreter(model_path=str(path))
    assert it.get_input_details()[0]["dtype"] == np.int8 and list(it.get_input_details()[0]["shape"]) == [1, 64, 64, 3]
    fp32 = run(model, ev.samples)["logits"]
    int8 = LiteRTModel(path, {"input": (0, 2, 3, 1)}).run_all(ev.samples, {"logits": fp32})["logits"]
    assert cosine_per_sample(fp32, int8).mean() >= 0.99
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.9
    saved = json.loads((tmp_path / "out" / "rpi5" / "tflite-int8.report.json").read_text())
    assert saved["artifact_sha256"] == rpi5.artifact_sha256 and saved["tflite"]["io_type"] == "int8"


def test_two_inputs_two_outputs_and_a_float_io_variant(tmp_path):
    model = zoo.two_in_two_out(tmp_path / "two.onnx")
    strict_profile(tmp_path, "android-arm64")
    text = (tmp_path / "strict.toml").read_text().replace('delegate = "xnnpack"', 'delegate = "xnnpack"\nio_type = "float32"')
    (tmp_path / "strict.toml").write_text(text)
    from firmware_profiles import load_profile_file

    float_io = load_profile_file(tmp_path / "strict.toml")
    reports, ev = convert(model, samples_for(model), tmp_path, ["android-arm64", float_io])
    int8_io, f32_io = tflite_reports(reports)
    for r in (int8_io, f32_io):
        assert r.status is Status.SHIPPABLE, r.reasons
        assert {o.name for o in r.fidelity} == {"class_logits", "regression"}
        assert min(o.cosine for o in r.fidelity) >= 0.99
    assert r.tflite.input_layouts["meta"] == "as in the ONNX model"
    it = Interpreter(model_path=str(tmp_path / "out" / "strict" / "model.int8.tflite"))
    assert {d["dtype"] for d in it.get_input_details()} == {np.float32}


def test_dynamic_batch_model_converts(tmp_path):
    model = zoo.mobilenet_like(tmp_path / "dyn.onnx", dynamic_batch=True)
    reports, _ = convert(model, samples_for(model, 24), tmp_path, ["rpi5"])
    assert tflite_reports(reports)[0].status is Status.SHIPPABLE


def test_an_int8_kernel_that_refuses_at_inference_stays_float_where_the_profile_allows(tmp_path):
    """GELU's Erf has no TFLite builtin; onnx2tf's builtin approximation divides by a value that quantizes to
    zero, which LiteRT's INT8 DIV kernel refuses at inference. The worker finds that by running the model, keeps DIV
    in float (TF's MLIR quantizer deny-list), and the report names it; a profile without a float budget refuses."""
    model = zoo.transformer_block(tmp_path / "t.onnx")
    data = samples_for(model)
    reports, ev = convert(model, data, tmp_path, ["rpi5"])
    r = tflite_reports(reports)[0]
    assert r.status is Status.SHIPPABLE, r.reasons
    assert "DIV" in r.tflite.float_ops and any("DIV kept in float" in n for n in r.notes)
    assert min(o.cosine for o in r.fidelity) >= 0.99
    path = tmp_path / "out" / "rpi5" / "model.int8.tflite"
    assert Interpreter(model_path=str(path)).get_input_details()[0]["dtype"] == np.int8  # I/O stays INT8
    fp32 = run(model, ev.samples)["logits"]
    got = LiteRTModel(path, {"tokens": None}).run_all(ev.samples, {"logits": fp32})["logits"]
    assert cosine_per_sample(fp32, got).mean() >= 0.99

    strict = strict_profile(tmp_path, "rpi5", max_float_node_fraction=0.0)
    reports, _ = convert(model, data, tmp_path / "strict", [strict])
    r = tflite_reports(reports)[0]
    assert r.status is Status.FAILED and any("DIV" in x and "no float ops" in x for x in r.reasons), r.reasons
    assert not (tmp_path / "strict" / "out" / "strict" / "model.int8.tflite").exists()
    assert [x.status for x in reports if x.format == "onnx-int8"] == [Status.SHIPPABLE]  # the other format goes on


def test_a_crashing_conversion_is_a_clear_failure(tmp_path):
    """onnx2tf/TensorFlow crash on this GRU in the worker process; the converter survives and says so."""
    model = zoo.recurrent(tmp_path / "gru.onnx")
    reports, _ = convert(model, samples_for(model, 16), tmp_path, ["rpi5"])
    r = tflite_reports(reports)[0]
    assert r.status is Status.FAILED and r.artifact is None
    assert "TFLite conversion crashed" in r.reasons[0] and "Traceback" not in r.reasons[0]
    assert [x.status for x in reports if x.format == "onnx-int8"] != [Status.FAILED]  # ONNX is judged on its own
