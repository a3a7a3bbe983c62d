"""Core ML 8-bit packages through the real toolchain (onnx2torch → coremltools), checked structurally.

coremltools cannot predict on Linux, so the checks here are what the report promises instead: the package loads,
its interface is the source's, its weights are INT8, and its figures are labelled as a host simulation."""

import json

import numpy as np
import pytest
import torch
from coremltools.models.utils import load_spec
from coremltools.proto import MIL_pb2

from converters.coreml_int8 import structural_problems, tree_sha256
from converters.report import Status
from converters.source import load_source
from tests import zoo

from .test_convert import convert, samples_for, strict_profile

pytestmark = pytest.mark.slow

MODELS = {  # size bound: INT8 weights plus FP16 biases, scales and blob alignment
    "mobilenet": (lambda d: zoo.mobilenet_like(d / "mobilenet.onnx"), 0.32),
    "transformer": (lambda d: zoo.transformer_block(d / "transformer.onnx"), 0.36),
    "two_in_two_out": (lambda d: zoo.two_in_two_out(d / "two.onnx"), 0.40),
    "dynamic_batch": (lambda d: zoo.mobilenet_like(d / "dyn.onnx", dynamic_batch=True), 0.32),
    # 1,024-channel layers: their 1-D biases exceed the threshold, yet coremltools never compresses 1-D tensors
    "wide": (lambda d: zoo.mobilenet_like(d / "wide.onnx", size=32, width=64), 0.30),
}


def coreml_report(reports):
    return next(r for r in reports if r.format == "coreml-int8")


def weight_dtypes(package):
    """dtype name → element count over the ML program's blob-stored constants, read from the spec itself."""
    spec = load_spec(str(package))
    fn = spec.mlProgram.functions["main"]
    counts = {}
    for op in fn.block_specializations[fn.opset].operations:
        for attr in ("quantized_data", "val"):
            v = op.attributes.get(attr)
            if v is not None and v.WhichOneof("value") == "blobFileValue":
                t = v.type.tensorType
                n = int(np.prod([d.constant.size for d in t.dimensions]))
                name = MIL_pb2.DataType.Name(t.dataType)
                counts[name] = counts.get(name, 0) + n
    return spec, counts


@pytest.mark.parametrize("name", list(MODELS))
def test_models_become_8bit_packages_with_the_source_interface(name, tmp_path):
    build, max_ratio = MODELS[name]
    model = build(tmp_path)
    reports, ev = convert(model, samples_for(model, 24), tmp_path, ["ios-a15"], model_name=name,
                          model_version="1.2.3", labels=("cat", "dog"))
    r = coreml_report(reports)
    assert r.status is Status.SHIPPABLE, r.reasons
    package = tmp_path / "out" / "ios-a15" / "model.int8.mlpackage"
    assert r.artifact == package.name and r.artifact_sha256 == tree_sha256(package)
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert size == r.size.int8_bytes and size / model.stat().st_size <= max_ratio
    spec, counts = weight_dtypes(package)
    # most weight bytes are INT8; what is left in FP16 is biases and scales (small tensors)
    assert counts["INT8"] / sum(counts.values()) >= 0.9, counts
    source = load_source(model, tmp_path / "inspect")
    assert [i.name for i in spec.description.input] == [i.name for i in source.inputs]
    assert [list(i.type.multiArrayType.shape) for i in spec.description.input] == \
        [list(ev.samples[0][i.name].shape) for i in source.inputs]
    assert sorted(o.name for o in spec.description.output) == sorted(o.name for o in source.outputs)
    meta = spec.description.metadata
    assert meta.author == "edgefleet fleet-convert" and meta.versionString == "1.2.3"
    assert json.loads(meta.userDefined["edgefleet.labels"]) == ["cat", "dog"]
    assert meta.userDefined["edgefleet.source_sha256"] == r.source.sha256
    assert "com.github.apple.coremltools.conversion_date" not in meta.userDefined  # reproducible bytes
    assert all(i.shortDescription for i in spec.description.input)
    # honest about what Linux cannot measure
    assert r.coreml.numeric_fidelity_measured is False and r.coreml.fidelity_measured_by.startswith("simulated")
    assert any("not measured on this host" in n for n in r.notes)
    assert r.coreml.pytorch_route_cosine >= 0.9999 and r.latency is None
    assert min(o.cosine for o in r.fidelity) >= 0.99
    assert r.coreml.float_weight_tensors == [] and r.coreml.minimum_ios == 16


def test_an_op_without_a_route_fails_by_name_and_ships_nothing(tmp_path):
    model = zoo.recurrent(tmp_path / "gru.onnx")
    reports, _ = convert(model, samples_for(model, 16), tmp_path, ["ios-a15"])
    r = coreml_report(reports)
    assert r.status is Status.FAILED and "GRU" in r.reasons[0], r.reasons
    assert not (tmp_path / "out" / "ios-a15" / "model.int8.mlpackage").exists()


def test_floor_refuses_the_package_and_removes_a_stale_one(tmp_path):
    model = zoo.two_in_two_out(tmp_path / "two.onnx")
    data = samples_for(model, 16)
    reports, _ = convert(model, data, tmp_path, ["ios-a15"])
    assert coreml_report(reports).status is Status.SHIPPABLE
    assert (tmp_path / "out" / "ios-a15" / "model.int8.mlpackage").is_dir()
    strict = strict_profile(tmp_path, "ios-a15", min_sqnr_db=90.0)
    reports, _ = convert(model, data, tmp_path, [strict])
    r = coreml_report(reports)
    assert r.status is Status.REFUSED and any("SQNR" in x for x in r.reasons), r.reasons
    assert not (tmp_path / "out" / "strict" / "model.int8.mlpackage").exists()


def test_structural_problems_are_named(tmp_path):
    model = zoo.two_in_two_out(tmp_path / "two.onnx")
    source = load_source(model, tmp_path / "w")
    example = {"image": np.zeros((1, 3, 32, 32), np.float32), "meta": np.zeros((1, 8), np.float32)}
    good = {"model_type": "mlProgram", "inputs": {"image": {"shape": [1, 3, 32, 32]}, "meta": {"shape": [1, 8]}},
            "outputs": {"class_logits": {}, "regression": {}}, "float_weight_tensors": []}
    assert structural_problems(source, good, example) == []
    bad = {**good, "model_type": "neuralNetwork", "inputs": {"image": {"shape": [1, 32, 32, 3]}},
           "outputs": {"class_logits": {}}, "float_weight_tensors": ["w FLOAT16 4096"]}
    problems = structural_problems(source, bad, example)
    assert len(problems) == 4 and "neuralNetwork" in problems[0] and "w FLOAT16 4096" in problems[3]


def test_onnx_lstm_translates_to_torch_exactly(tmp_path):
    """onnx2torch has no LSTM: the worker's converter (ONNX gate order iofc → torch's ifgo, bidirectional, initial
    state) reproduces onnxruntime."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from onnx import save as save_onnx

    from converters.coreml_onnx2torch import to_torch
    from converters.coreml_worker import _isolate_imports

    _isolate_imports()
    rng = np.random.default_rng(0)
    hidden, features, steps = 8, 5, 7
    weights = {"W": (2, 4 * hidden, features), "R": (2, 4 * hidden, hidden), "B": (2, 8 * hidden)}
    node = helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y", "y_h", "y_c"],
                            direction="bidirectional", hidden_size=hidden)
    shapes = {"x": [steps, 1, features], "h0": [2, 1, hidden], "c0": [2, 1, hidden]}
    graph = helper.make_graph(
        [node], "lstm", [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in shapes.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in node.output],
        [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k) for k, s in weights.items()])
    save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), tmp_path / "lstm.onnx")
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    want = ort.InferenceSession(str(tmp_path / "lstm.onnx")).run(None, feeds)
    notes: list[str] = []
    with torch.no_grad():
        got = to_torch(str(tmp_path / "lstm.onnx"), notes)(*(torch.from_numpy(v) for v in feeds.values()))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g.numpy(), w, atol=1e-5)


class BeyondFp16(torch.nn.Module):
    """An intermediate of ~1e5 (FP16 tops out at 65,504) scaled back down: exact in FP32, inf in FP16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 8)
        with torch.no_grad():
            self.up.weight.mul_(1e6)

    def forward(self, x):
        return self.down(self.up(x) * 1e-4)


def test_a_model_beyond_fp16_ships_with_fp32_compute_and_says_so(tmp_path):
    model = zoo.export(BeyondFp16(), (torch.zeros(1, 32),), tmp_path / "loud.onnx", input_names=["x"],
                       output_names=["y"])
    reports, ev = convert(model, samples_for(model, 24), tmp_path, ["ios-a15"])
    r = coreml_report(reports)
    assert r.status is Status.SHIPPABLE, r.reasons
    assert r.coreml.compute_precision == "fp32" and "FP32 compute" in r.coreml.fidelity_measured_by
    assert any("FP16 compute failed the floor" in n for n in r.notes), r.notes
    assert min(o.cosine for o in r.fidelity) >= 0.99
    spec, counts = weight_dtypes(tmp_path / "out" / "ios-a15" / "model.int8.mlpackage")
    # the big weight is still 8-bit; what stays float (a weight under the threshold, biases) is FP32, not FP16
    assert counts["INT8"] == 32 * 64 and "FLOAT16" not in counts and r.coreml.float_weight_tensors == [], counts


def test_the_simulation_quantizes_matmul_weights_per_column_as_core_ml_stores_them(tmp_path):
    """coremltools folds ``MatMul(x, W) + b`` into ``linear`` and quantizes per output channel — per column of W.
    One loud column must not flatten the others (per tensor, the simulation refused MiniLM at cosine 0.973)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx import save as save_onnx

    from converters.coreml_onnx2torch import to_torch
    from converters.coreml_worker import _isolate_imports, _matmul_weight_axes, _quantize_like_coreml

    _isolate_imports()
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (64, 16)).astype(np.float32)
    w[:, 0] *= 1000.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(16, np.float32), "b")])
    save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    module = to_torch(str(tmp_path / "mm.onnx"), [])
    axes = _matmul_weight_axes(module)
    assert list(axes.values()) == [-1]
    x = torch.from_numpy(rng.normal(0, 1, (32, 64)).astype(np.float32))
    with torch.no_grad():
        ref, sim = module(x)[:, 1:], _quantize_like_coreml(module)(x)[:, 1:]
    assert torch.nn.functional.cosine_similarity(ref.flatten(), sim.flatten(), dim=0) > 0.999
