"""SmoothQuant (converters/smoothing.py): the float function is unchanged, outlier channels stop costing INT8 its
resolution, and the ONNX search ships a transformer-like model with it that plain INT8 breaks."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import onnx_int8, smoothing
from converters.calibration import DataSet
from converters.errors import QuantizationError
from converters.fidelity import cosine_per_sample
from converters.report import Status
from firmware_profiles import load_profile
from tests import zoo
from tests.converters.test_convert import convert, run


def _samples(n: int, seed: int, shape=(1, 16, 64)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def _outputs(path: Path, samples) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, s)[0].reshape(1, -1) for s in samples])


def test_smoothquant_keeps_the_float_function_and_the_residual_path(tmp_path):
    model = zoo.outlier_encoder(tmp_path / "enc.onnx")
    calibration = _samples(24, 1)
    found = smoothing.smooth(model, calibration, tmp_path / "smoothed.onnx")
    assert found is not None and found.groups == 5 and found.largest_ratio > 20
    evaluation = _samples(8, 2)
    before, after = _outputs(model, evaluation), _outputs(found.path, evaluation)
    assert np.abs(before - after).max() < 1e-4 * np.abs(before).max()
    graph = onnx.load(str(found.path)).graph
    muls = [n for n in graph.node if n.name.startswith("SmoothQuant")]
    assert len(muls) == 5
    by_name = {n.name: n for n in graph.node}
    assert by_name["residual0"].input[1] == "ln0"  # the residual still reads the LayerNorm itself
    assert by_name["fc1_0"].input[0] == next(m.output[0] for m in muls if m.input[0] == "ln0")


def test_smoothquant_flattens_outlier_channels_for_symmetric_int8(tmp_path):
    model = zoo.outlier_encoder(tmp_path / "enc.onnx")
    calibration, evaluation = _samples(32, 1), _samples(16, 2)
    found = smoothing.smooth(model, calibration, tmp_path / "smoothed.onnx")
    assert found is not None
    scheme = load_profile("jetson-orin-nano").artifacts[0].quantization  # TensorRT: symmetric INT8 activations
    fp32 = _outputs(model, evaluation)
    scores = {}
    for name, source in (("plain", model), ("smoothed", found.path)):
        prepared = onnx_int8.Prepared(source, onnx.load(str(source)))
        out = tmp_path / f"{name}.int8.onnx"
        onnx_int8.quantize(prepared, calibration, scheme, out, cache=tmp_path / f"{name}.calibration.json")
        scores[name] = cosine_per_sample(fp32, run(out, evaluation)["y"].reshape(len(evaluation), -1)).min()
    assert scores["plain"] < 0.9  # the ordinary channels keep a handful of levels
    assert scores["smoothed"] > 0.999


def test_smoothquant_leaves_a_model_without_outliers_alone(tmp_path):
    model = zoo.outlier_encoder(tmp_path / "enc.onnx", outlier=1.0)
    assert smoothing.smooth(model, _samples(8, 1), tmp_path / "smoothed.onnx") is None
    assert not (tmp_path / "smoothed.onnx").exists()


def test_smoothquant_scales_a_transposed_gemm_weight_and_copies_a_shared_one(tmp_path):
    rng = np.random.default_rng(0)
    w_t = rng.normal(0, 1, (6, 8)).astype(np.float32)  # Gemm transB: [outputs, input channels]
    shared = rng.normal(0, 1, (8, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w_t"], ["y1"], name="gemm", transB=1),
         helper.make_node("Relu", ["x"], ["x2"], name="relu"),
         helper.make_node("MatMul", ["x2", "shared"], ["y2"], name="first"),
         helper.make_node("Neg", ["x"], ["x3"], name="neg"),
         helper.make_node("MatMul", ["x3", "shared"], ["y3"], name="second")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, k]) for n, k in (("y1", 6), ("y2", 5), ("y3", 5))],
        [numpy_helper.from_array(w_t, "w_t"), numpy_helper.from_array(shared, "shared")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    original = onnx.ModelProto()
    original.CopyFrom(model)
    found = smoothing.groups(model)
    assert {g.tensor: g.nodes for g in found} == {"x": ("gemm",), "x2": ("first",), "x3": ("second",)}
    maxima = {g.tensor: np.linspace(0.5, 40, 8).astype(np.float32) for g in found}
    smoothing.apply(model, found, maxima, smoothing.ALPHA)
    onnx.checker.check_model(model)
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["first"].input[1] != nodes["second"].input[1]  # each MatMul got its own scaled copy
    x = {"x": rng.normal(0, 5, (2, 8)).astype(np.float32)}
    before = ort.InferenceSession(original.SerializeToString()).run(None, x)
    after = ort.InferenceSession(model.SerializeToString()).run(None, x)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_smoothquant_that_cannot_run_the_model_says_why(tmp_path):
    model = zoo.outlier_encoder(tmp_path / "enc.onnx")
    with pytest.raises(QuantizationError, match="SmoothQuant could not measure channel ranges"):
        smoothing.smooth(model, [{"wrong_input": np.zeros((1, 16, 64), np.float32)}], tmp_path / "smoothed.onnx")
    assert not (tmp_path / "smoothed.onnx").exists()


def test_smoothing_scales_balance_activation_and_weight_ranges():
    scales = smoothing.smoothing_scales(np.array([16.0, 1.0, 0.0, 4.0]), np.array([1.0, 1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(scales, [4.0, 1.0, 1.0, 1.0])  # a dead channel or an all-zero weight row: 1
    huge = smoothing.smoothing_scales(np.array([1e9]), np.array([1e-9]), 0.5)
    assert huge[0] == smoothing.SCALE_LIMITS[1]


@pytest.mark.slow
def test_smoothquant_ships_a_transformer_that_plain_int8_breaks_for_tensorrt(tmp_path):
    """jetson-orin-nano (symmetric INT8 activations, no 16-bit): every calibration fails, the best of them after
    SmoothQuant ships with nothing in float; the report says so."""
    model = zoo.outlier_encoder(tmp_path / "enc.onnx")
    data = DataSet(_samples(120, 5), "normal tokens")
    reports, ev = convert(model, data, tmp_path, ["jetson-orin-nano"])
    r = reports[0]
    assert r.status is Status.SHIPPABLE, r.reasons
    assert "SmoothQuant" in r.search.choice and r.mixed_precision is None
    assert r.quantization.smoothing and "5 MatMul/Gemm input(s)" in r.quantization.smoothing
    first = r.search.tried[0]
    assert "SmoothQuant" not in first.what and not first.passed
    fp32 = run(model, ev.samples)["y"].reshape(len(ev.samples), -1)
    ours = run(tmp_path / "out" / "jetson-orin-nano" / "model.int8.onnx", ev.samples)["y"]
    cosines = cosine_per_sample(fp32, ours.reshape(len(ev.samples), -1))
    assert cosines.mean() > 0.999 and cosines.min() > 0.995
    smoothing_scored = [t for t in r.search.tried if "SmoothQuant" in t.what and t.split == "calibration"]
    assert len(smoothing_scored) >= len(smoothing.ALPHAS)  # each α scored on the calibration split first
