"""The quantizer's graph steps on hand-built graphs: weights hoisted out of Constant nodes, embedding tables told from
activation gathers, calibration chunks sized by activation bytes, each quantization choice cached on its own."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters import onnx_int8
from converters.targets.onnx import choices
from firmware_profiles import load_profile
from firmware_profiles.schema import CalibrationMethod


def _graph(nodes, inits=(), value_info=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    g = helper.make_graph(nodes, "g", [x], [y], initializer=list(inits), value_info=list(value_info))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_in_constant_nodes_become_initializers_and_small_constants_stay():
    w = numpy_helper.from_array(np.ones((8, 8), np.float32))
    eps = numpy_helper.from_array(np.array([1e-5], np.float32))
    model = _graph([helper.make_node("Constant", [], ["w"], value=w, name="cw"),
                    helper.make_node("Constant", [], ["eps"], value=eps, name="ce"),
                    helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                    helper.make_node("Add", ["m", "eps"], ["y"], name="add")])
    assert onnx_int8.hoist_constants(model) == 1
    assert [i.name for i in model.graph.initializer] == ["w"]
    assert [n.name for n in model.graph.node] == ["ce", "mm", "add"]
    onnx.checker.check_model(model)


def test_an_embedding_table_is_a_weight_and_a_gather_over_activations_is_not():
    table = numpy_helper.from_array(np.ones((100, 8), np.float32), "table")
    idx = numpy_helper.from_array(np.array([0], np.int64), "idx")
    model = _graph([helper.make_node("Gather", ["table", "idx"], ["e"], name="embed"),
                    helper.make_node("Gather", ["x", "idx"], ["y"], name="pick", axis=1)], [table, idx])
    assert onnx_int8.activation_gathers(model) == ["pick"]
    assert onnx_int8.node_weight_elements(model) == {"embed": 800, "pick": 0}


def test_big_feature_maps_calibrate_in_small_chunks():
    small = _graph([], value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 16, 32, 32])])
    big = _graph([], value_info=[helper.make_tensor_value_info(f"a{i}", TensorProto.FLOAT, [1, 64, 256, 256])
                                 for i in range(30)])
    assert onnx_int8.calibration_chunk(small) == onnx_int8.CALIBRATION_CHUNK
    assert onnx_int8.calibration_chunk(big) == 1  # 30 maps of 16 MB: one sample at a time


def test_choices_start_with_the_profiles_own_calibration_on_weight_bearing_ops(tmp_path):
    rpi4 = load_profile("rpi4").artifacts[0].quantization
    jetson = load_profile("jetson-orin-nano").artifacts[0].quantization
    assert [c.key() for c in choices(rpi4)] == ["weighted-minmax-99.999", "weighted-percentile-99.999",
                                                 "weighted-percentile-99.99", "all-minmax-99.999"]
    assert choices(jetson)[0] == onnx_int8.Choice("weighted", CalibrationMethod.PERCENTILE, 99.999)
    caches = {onnx_int8.calibration_cache(tmp_path, s, c) for s in (rpi4, jetson) for c in choices(s)}
    assert len(caches) == len(choices(rpi4)) + len(choices(jetson))  # symmetry and ops are part of the key
