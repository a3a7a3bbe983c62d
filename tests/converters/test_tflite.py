"""TFLite INT8 through the real toolchain (onnx2tf → TFLiteConverter with our calibration data → LiteRT).

Fidelity is recomputed here from the written .tflite with a fresh LiteRT interpreter."""

import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from converters import tflite_int8, tflite_options, tflite_prepare
from converters.calibration import split
from converters.errors import QuantizationError
from converters.fidelity import cosine_per_sample
from converters.report import Status
from converters.source import load_source
from converters.tflite_int8 import LiteRTModel
from converters.tflite_tail import (
    Graph,
    Op,
    float_tails,
    onnx_output_name,
    outlier_layers,
    tail_ops,
    unbounded_range_ops,
)
from tests import zoo

from .test_convert import convert, run, samples_for, strict_profile


def tflite_reports(reports):
    return [r for r in reports if r.format == "tflite-int8"]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_dynamic_batch_model_converts(tmp_path):
    model = zoo.mobilenet_like(tmp_path / "dyn.onnx", dynamic_batch=True)
    reports, _ = convert(model, samples_for(model, 24), tmp_path, ["rpi5"])
    assert tflite_reports(reports)[0].status is Status.SHIPPABLE


@pytest.mark.slow
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

    strict = strict_profile(tmp_path, "rpi5", max_float_weight_fraction=0.0)
    reports, _ = convert(model, data, tmp_path / "strict", [strict])
    r = tflite_reports(reports)[0]
    assert r.status is Status.FAILED and any("DIV" in x and "no float ops" in x for x in r.reasons), r.reasons
    assert not (tmp_path / "strict" / "out" / "strict" / "model.int8.tflite").exists()
    assert [x.status for x in reports if x.format == "onnx-int8"] == [Status.SHIPPABLE]  # the other format goes on


@pytest.mark.slow
def test_a_recurrent_layer_converts_unrolled_over_the_pinned_length(tmp_path):
    """Left as a loop, this GRU crashes TensorFlow's converter in the worker (TensorList ops have no builtin); the
    worker unrolls it over the data's 20 steps, and the report says the model runs only that length."""
    model = zoo.recurrent(tmp_path / "gru.onnx")
    source = load_source(model, tmp_path / "work")
    cal, ev = split(samples_for(model, 16), 0.3)
    prepared = tflite_prepare.prepare(source, cal.samples + ev.samples, tmp_path / "tflite")
    build = tflite_int8.build(source, prepared.path, cal.samples, tmp_path, allow_float_ops=True)
    assert any("GRU unrolled over the sequence length" in n for n in build.notes), build.notes
    fp32 = run(model, ev.samples)["logits"]
    got = LiteRTModel(build.int8, build.input_perm).run_all(ev.samples, {"logits": fp32})["logits"]
    assert cosine_per_sample(fp32, got).mean() >= 0.95

# ---------------------------------------------------------------- decode tails (pure: a graph in, node names out)


def detector_graph(score_magnitude: float) -> Graph:
    """conv → conv(box) / conv(cls) → sigmoid → concat(box * stride, scores): a YOLO-style head in TFLite ops."""
    names = ["image", "feat", "box", "cls", "stride", "box_px", "scores", "output"]
    ops = [Op("CONV_2D", (0,), (1,)), Op("CONV_2D", (1,), (2,)), Op("CONV_2D", (1,), (3,)),
           Op("MUL", (2, 4), (5,)), Op("LOGISTIC", (3,), (6,)), Op("CONCATENATION", (5, 6), (7,))]
    magnitudes = {0: 1.0, 1: 6.0, 2: 5.0, 3: 8.0, 4: 32.0, 5: 320.0, 6: score_magnitude, 7: 320.0}
    return Graph(ops, names, magnitudes, [7])


def test_a_tail_stops_at_the_last_weighted_ops():
    graph = detector_graph(1.0)
    assert [op.kind for op in tail_ops(graph, 7)] == ["CONCATENATION", "LOGISTIC", "MUL"]


def test_boxes_and_scores_in_one_output_keep_their_decode_float():
    [tail] = float_tails(detector_graph(1.0))
    assert tail.output == "output" and sorted(tail.nodes) == ["box_px", "output", "scores"]
    assert tail.ratio == 320.0 and tail.kinds == ["CONCATENATION", "LOGISTIC", "MUL"]


def test_parts_of_similar_range_share_one_scale():
    assert float_tails(detector_graph(100.0)) == []


def test_an_output_made_by_a_weighted_op_has_no_tail():
    graph = Graph([Op("FULLY_CONNECTED", (0,), (1,))], ["x", "logits"], {0: 1.0, 1: 9.0}, [1])
    assert tail_ops(graph, 1) == [] and float_tails(graph) == []


@pytest.mark.parametrize(("signature", "onnx_outputs", "named"), [
    ({7: "output_1"}, ["boxes", "output0"], "output0"),  # onnx2tf's numbered keys, in ONNX order
    ({7: "output0"}, ["boxes", "output0"], "output0"),  # names kept by onnx2tf
    ({}, ["output0"], "output0"),  # no signature, the only output
    ({}, ["boxes", "output0"], "output"),  # nothing to go by: TFLite's tensor name
])
def test_a_float_tail_is_named_by_its_onnx_output_not_by_the_tflite_tensor(signature, onnx_outputs, named):
    graph = detector_graph(1.0)
    graph = Graph(graph.ops, graph.tensor_names, graph.magnitudes, graph.outputs, signature)
    [tail] = float_tails(graph)
    assert onnx_output_name(graph, tail.tensor, onnx_outputs) == named


# ---------------------------------------------------------------- shapes pinned from the data


def test_samples_of_different_shapes_cannot_make_one_tflite_model(tmp_path):
    source = load_source(zoo.mobilenet_like(tmp_path / "dyn.onnx", dynamic_batch=True, blocks=2), tmp_path / "work")
    samples = [{"input": np.zeros((n, 3, 64, 64), np.float32)} for n in (1, 1, 2)]
    with pytest.raises(QuantizationError, match=r"one static shape per input.*2 shapes \(1x3x64x64, 2x3x64x64\)"):
        tflite_prepare.data_shapes(source, samples)


def test_dynamic_dims_are_pinned_before_folding_and_named_in_the_notes(tmp_path):
    model = zoo.mobilenet_like(tmp_path / "dyn.onnx", dynamic_batch=True, blocks=2)
    source = load_source(model, tmp_path / "work")
    samples = samples_for(model, 4).samples
    prepared = tflite_prepare.prepare(source, samples, tmp_path / "tflite")
    import onnx

    graph = onnx.load(str(prepared.path)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, 64, 64]
    assert prepared.pinned == {"input": (1, 3, 64, 64)}
    assert "input[1,3,64,64] (batch=1)" in prepared.notes[0] and "accepts only these shapes" in prepared.notes[0]
    static = load_source(zoo.mobilenet_like(tmp_path / "static.onnx", blocks=2), tmp_path / "work2")
    assert tflite_prepare.prepare(static, samples, tmp_path / "tflite2").pinned == {}


# ---------------------------------------------------------------- a detection head through the real toolchain


@pytest.mark.slow
def test_a_mixed_range_detector_keeps_its_decode_float_and_its_scores(tmp_path):
    """Boxes (0..64 px) and scores (0..1) in one output: one int8 scale would zero every score. The worker finds the
    concatenation in the calibrated model, keeps the tail float (MLIR deny-list of nodes) and leaves the output
    float32 while the input stays int8."""
    model = zoo.mixed_range_detector(tmp_path / "det.onnx")
    source = load_source(model, tmp_path / "work")
    cal, ev = split(samples_for(model), 0.3)
    prepared = tflite_prepare.prepare(source, cal.samples + ev.samples, tmp_path / "tflite")
    build = tflite_int8.build(source, prepared.path, cal.samples, tmp_path, allow_float_ops=True)
    assert any("stays float" in n and "output 'output0' concatenates" in n for n in build.notes), build.notes
    assert "CONCATENATION" in build.float_ops
    it = Interpreter(model_path=str(build.int8))
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.float32
    fp32 = run(model, ev.samples)["output0"]
    got = LiteRTModel(build.int8, build.input_perm).run_all(ev.samples, {"output0": fp32})["output0"]
    assert cosine_per_sample(fp32[:, 4:], got[:, 4:]).mean() >= 0.98  # the scores
    assert (fp32[:, 4:].argmax(1) == got[:, 4:].argmax(1)).mean() >= 0.9  # the class per anchor point
    assert cosine_per_sample(fp32[:, :4], got[:, :4]).mean() >= 0.99  # the boxes


# ---------------------------------------------------------------- attention masks, scope names, worker deaths


def attention_mask_graph() -> Graph:
    """BERT's ``(1 - mask) * finfo.min`` added to the attention scores; recorded ranges ±FLT_MAX as TF's calibrator
    left them on all-MiniLM-L6-v2. A ceil-mode max pool's PADV2 (clamped by the worker) is there too."""
    names = ["mask", "one_minus", "bias", "qk", "scores", "masked", "probs", "pool_in", "padded"]
    ops = [Op("SUB", (0,), (1,)), Op("MUL", (1,), (2,)), Op("BATCH_MATMUL", (), (3,)), Op("MUL", (3,), (4,)),
           Op("ADD", (4, 2), (5,)), Op("SOFTMAX", (5,), (6,)), Op("PADV2", (7,), (8,))]
    big = 3.4e38
    magnitudes = {0: 1.0, 1: big, 2: big, 3: 540.0, 4: big, 5: big, 6: 1.0, 7: 6.0, 8: big}
    return Graph(ops, names, magnitudes, [6])


def test_ops_around_a_flt_max_attention_mask_stay_float_but_a_clamped_padding_does_not():
    kept = unbounded_range_ops(attention_mask_graph())
    assert [(op.kind, op.outputs[0]) for op in kept] == [("SUB", 1), ("MUL", 2), ("MUL", 4), ("ADD", 5),
                                                          ("SOFTMAX", 6)]


def encoder_graph(ffn_out: float = 220.0) -> Graph:
    """A BERT-style block in TFLite ops: q, k, v, out, ffn_up FCs (range ±8, 64 weights each), ffn_down (256
    weights) and the attention-score BATCH_MATMUL (no weights, ±540)."""
    names = ["x", "wq", "wk", "wv", "wo", "wu", "wd", "q", "k", "v", "qk", "o", "u", "d"]
    fc = "FULLY_CONNECTED"
    ops = [Op(fc, (0, 1), (7,)), Op(fc, (0, 2), (8,)), Op(fc, (0, 3), (9,)), Op("BATCH_MATMUL", (7, 8), (10,)),
           Op(fc, (9, 4), (11,)), Op(fc, (11, 5), (12,)), Op(fc, (12, 6), (13,))]
    magnitudes = {7: 8.0, 8: 8.0, 9: 8.0, 10: 540.0, 11: 8.0, 12: 8.0, 13: ffn_out}
    constants = {1: 64, 2: 64, 3: 64, 4: 64, 5: 64, 6: 256}
    return Graph(ops, names, magnitudes, [13], constants=constants)


def test_weighted_ops_with_outlier_output_ranges_are_found_widest_first():
    assert [op.outputs[0] for op in outlier_layers(encoder_graph(), 4.0, max_weight_fraction=0.5)] == [10, 13]


def test_outlier_layers_stay_within_the_float_weight_budget_and_ordinary_ranges_are_not_outliers():
    # ffn_down holds 256 of 576 weights: over a 30% budget it stays INT8; the weightless BATCH_MATMUL still goes float
    assert [op.outputs[0] for op in outlier_layers(encoder_graph(), 4.0, max_weight_fraction=0.3)] == [10]
    assert [op.outputs[0] for op in outlier_layers(encoder_graph(ffn_out=9.0), 4.0)] == [10]
    assert outlier_layers(Graph([Op("FULLY_CONNECTED", (0,), (1,))], ["x", "y"], {1: 9.0}, [1]), 4.0) == []


@pytest.mark.parametrize(("names", "safe"), [
    (["Softmax@0", "Conv@1"], ["Softmax_0", "Conv_1"]),  # ORT's optimizer names nodes Op@N
    (["Softmax@0", "Softmax_0"], ["Softmax_0_1", "Softmax_0"]),  # no clash with a name already taken
    (["a/b.c>d-e_f", ""], ["a/b.c>d-e_f", ""]),  # what TensorFlow accepts stays
])
def test_node_names_tensorflow_rejects_as_scope_names_are_replaced(names, safe):
    assert tflite_prepare.scope_safe_names(names) == safe


def test_prepared_graph_has_only_scope_safe_node_names(tmp_path):
    """PP-OCR's classifier failed in onnx2tf on every option set: '"Softmax@0" is not a valid scope name'."""
    import onnx

    model = zoo.mobilenet_like(tmp_path / "m.onnx", blocks=2)
    graph = onnx.load(str(model))
    for i, node in enumerate(graph.graph.node):
        node.name = f"{node.op_type}@{i}"
    onnx.save(graph, str(model))
    source = load_source(model, tmp_path / "work")
    prepared = tflite_prepare.prepare(source, samples_for(model, 2).samples, tmp_path / "tflite")
    nodes = onnx.load(str(prepared.path)).graph.node
    assert nodes and all(tflite_prepare.INVALID_SCOPE_CHARS.search(n.name) is None for n in nodes)


@pytest.mark.parametrize(("error", "recorded", "stage"), [
    ("TFLite conversion crashed (signal 6)", tflite_options.Stage.LITERT.value, tflite_options.Stage.LITERT),
    ("TFLite conversion crashed (signal 11)", tflite_options.Stage.TFLITE.value, tflite_options.Stage.TFLITE),
    ("TFLite conversion crashed (signal 11)", tflite_options.Stage.ONNX2TF.value, None),  # options may help
    ("TFLite conversion crashed (signal 6)", None, None),  # died before it recorded anything
    ("TFLite conversion failed: ValueError: ...", tflite_options.Stage.LITERT.value, None),  # not a death
])
def test_a_worker_that_died_after_onnx2tf_is_not_retried_with_other_options(error, recorded, stage):
    assert tflite_options.crash_stage(error, recorded) is stage
