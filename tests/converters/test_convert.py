"""End to end over real ONNX Runtime: quantize, run the artifact, and check honest thresholds.

Fidelity asserted here is recomputed from the written artifact with a fresh ONNX Runtime session, not read back from
the converter's own report.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import quantize_static

from converters import onnx_int8, runtime
from converters.calibration import DataSet, split, synthetic_dataset
from converters.fidelity import OutputKind, cosine_per_sample
from converters.onnx_int8 import SampleReader
from converters.pipeline import Converter, ConvertOptions
from converters.report import Status
from converters.source import load_source
from firmware_profiles import load_profile, load_profile_file
from fleet_runtime import runtimes
from tests import zoo

ONNX_PROFILES = ["jetson-orin-nano", "jetson-nano", "rpi5"]


def run(path: Path, samples) -> dict[str, np.ndarray]:
    """What the model computes: a quantized one in its own QDQ arithmetic, as its targets do (not through the
    host's fused x86 kernels, which saturate on CPUs without VNNI: converters/runtime.py ``session``)."""
    sess = runtime.session(path, exact=True)
    names = [o.name for o in sess.get_outputs()]
    outs = [sess.run(names, s) for s in samples]
    return {n: np.concatenate([o[i] for o in outs]) for i, n in enumerate(names)}


def convert(model: Path, data: DataSet, tmp: Path, profiles, **options):
    source = load_source(model, tmp / "work")
    cal, ev = split(data, 0.3)
    conv = Converter(source, cal, ev, tmp / "work", ConvertOptions(latency_runs=5, **options))
    reports = [r for p in profiles for r in conv.convert(p if not isinstance(p, str) else load_profile(p),
                                                           tmp / "out")]
    return reports, ev


def samples_for(model: Path, n: int = 48) -> DataSet:
    source_inputs = load_source(model, model.parent / f"{model.stem}-inspect").inputs
    return synthetic_dataset(source_inputs, n)


MODELS = {
    "mobilenet": (lambda d: zoo.mobilenet_like(d / "mobilenet.onnx"), 0.36),
    "transformer": (lambda d: zoo.transformer_block(d / "transformer.onnx"), 0.46),  # 53k params: scales weigh in
    "two_in_two_out": (lambda d: zoo.two_in_two_out(d / "two.onnx"), 0.50),
    "dynamic_batch": (lambda d: zoo.mobilenet_like(d / "dyn.onnx", dynamic_batch=True), 0.36),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_onnx_profile_quantizes_and_the_artifact_keeps_fidelity(name, tmp_path):
    build, max_ratio = MODELS[name]
    model = build(tmp_path)
    reports, ev = convert(model, samples_for(model), tmp_path, ONNX_PROFILES)
    onnx_reports = [r for r in reports if r.format == "onnx-int8"]
    assert [r.profile for r in onnx_reports] == ONNX_PROFILES
    fp32 = run(model, ev.samples)
    for r in onnx_reports:
        assert r.status is Status.SHIPPABLE, (r.profile, r.reasons)
        artifact = tmp_path / "out" / r.profile / "model.int8.onnx"
        assert r.artifact_sha256 and artifact.stat().st_size / model.stat().st_size <= max_ratio
        assert r.quantization.quantized_weight_tensors > 0 and r.latency.int8_ms > 0
        int8 = run(artifact, ev.samples)
        for out_name, ref in fp32.items():
            assert cosine_per_sample(ref, int8[out_name]).mean() >= 0.99, (r.profile, out_name)
            if ref.shape[-1] >= 5:  # classifier-like heads: argmax agreement on real inference
                assert (ref.argmax(-1) == int8[out_name].argmax(-1)).mean() >= 0.9, (r.profile, out_name)
    assert len([r for r in reports if r.format == "tflite-int8"]) == 1  # rpi5 declares TFLite too: built or reported


def test_dynamic_batch_survives_quantization(tmp_path):
    model = zoo.mobilenet_like(tmp_path / "dyn.onnx", dynamic_batch=True, blocks=2)
    reports, _ = convert(model, samples_for(model, 20), tmp_path, ["rpi5"])
    sess = ort.InferenceSession(str(tmp_path / "out" / "rpi5" / "model.int8.onnx"))
    for batch in (1, 4):
        assert sess.run(None, {"input": np.zeros((batch, 3, 64, 64), np.float32)})[0].shape == (batch, 10)


@pytest.mark.slow
def test_trained_digits_classifier_keeps_99_percent_top1_agreement_on_real_data(tmp_path):
    model, fp32_accuracy = zoo.trained_digits_classifier(tmp_path / "digits.onnx")
    assert fp32_accuracy > 0.95
    _, _, x_test, y_test = zoo.digits_data()
    data = DataSet([{"image": x_test[i : i + 1]} for i in range(len(x_test))], "sklearn digits (held out)")
    reports, ev = convert(model, data, tmp_path, ["rpi5", "jetson-orin-nano"])
    for r in (r for r in reports if r.format == "onnx-int8"):
        assert r.status is Status.SHIPPABLE
        fp32 = run(model, ev.samples)["logits"]
        int8 = run(tmp_path / "out" / r.profile / "model.int8.onnx", ev.samples)["logits"]
        agreement = (fp32.argmax(1) == int8.argmax(1)).mean()
        assert agreement >= 0.99, (r.profile, agreement)
        assert r.fidelity[0].top1_agreement == pytest.approx(agreement)


def plain_defaults(model: Path, cal: DataSet, out: Path) -> Path:
    quantize_static(str(model), str(out), SampleReader(cal.samples))
    return out


@pytest.mark.slow
def test_detector_head_ships_on_weight_bearing_ops_where_plain_int8_collapses_scores(detector, tmp_path):
    """Quantizing every op gives boxes (pixels) and scores (0..1) one shared INT8 scale at the final Concat and the
    scores collapse; quantizing only Conv/MatMul/Gemm leaves the decode tail in float with no node list at all."""
    data = samples_for(detector, 60)
    cal, ev = split(data, 0.3)
    fp32 = run(detector, ev.samples)["output0"]
    plain = run(plain_defaults(detector, cal, tmp_path / "plain.onnx"), ev.samples)["output0"]
    assert cosine_per_sample(fp32, plain).mean() > 0.999  # whole-tensor cosine hides it...
    assert cosine_per_sample(fp32[:, 4:], plain[:, 4:]).mean() < 0.5  # ...the scores are gone
    reports, ev = convert(detector, data, tmp_path, ["rpi5"])
    r = reports[0]
    assert r.status is Status.SHIPPABLE, r.reasons
    assert r.mixed_precision is None and r.quantization.op_types.startswith("Conv")
    out = r.fidelity[0]
    assert out.kind is OutputKind.DETECTION and out.recall.total > 20  # judged on the detections at 0.25
    assert out.recall.rate >= 0.9 and out.precision.rate >= 0.9
    ours = run(tmp_path / "out" / "rpi5" / "model.int8.onnx", ev.samples)["output0"]
    assert cosine_per_sample(fp32[:, 4:], ours[:, 4:]).mean() > 0.98
    assert (fp32[:, 4:].argmax(1) == ours[:, 4:].argmax(1)).mean() > 0.9


@pytest.mark.slow
def test_recognizer_collapses_under_plain_int8_and_mixed_precision_rescues_it(recognizer, digit_lines, tmp_path):
    images, labels = digit_lines
    data = DataSet([{"image": images[i : i + 1]} for i in range(len(images))], "digit lines")
    cal, ev = split(data, 0.3)
    label_of = {id(s): tuple(labels[i]) for i, s in enumerate(data.samples)}
    ev_truth = [label_of[id(s)] for s in ev.samples]
    fp32_text = zoo.read_text(run(recognizer, ev.samples)["logprobs"])
    assert np.mean([a == b for a, b in zip(fp32_text, ev_truth, strict=True)]) >= 0.9
    plain_text = zoo.read_text(run(plain_defaults(recognizer, cal, tmp_path / "plain.onnx"), ev.samples)["logprobs"])
    assert np.mean([a == b for a, b in zip(plain_text, fp32_text, strict=True)]) < 0.2  # 95% → 0% class of failure
    # A four-layer toy: its one outlier layer is half of its weights. An ONNX Runtime older than 1.18 (no 16-bit
    # activations): the search keeps nodes in float.
    reports, _ = convert(recognizer, data, tmp_path, [strict_profile(tmp_path, "rpi5", max_float_weight_fraction=0.6,
                                                                     runtime_versions=OLD_ORT)])
    r = reports[0]
    assert r.status is Status.SHIPPABLE, r.reasons
    assert r.mixed_precision and r.mixed_precision.full_int8_failed and r.mixed_precision.float_nodes
    assert r.fidelity[0].kind is OutputKind.SEQUENCE and r.fidelity[0].exact.rate >= 0.95
    assert [t for t in r.search.tried if t.split == "calibration"]  # the blocks were scored on calibration data
    assert r.mixed_precision.size_cost_bytes is not None and r.mixed_precision.latency_cost_ms is not None
    ours = zoo.read_text(run(tmp_path / "out" / "strict" / "model.int8.onnx", ev.samples)["logprobs"])
    assert np.mean([a == b for a, b in zip(ours, fp32_text, strict=True)]) >= 0.95


OLD_ORT = '">=1.16,<2"'  # a device runtime without 16-bit Q/DQ


def massive_activation_mlp(path: Path, *, width: int = 32, outlier: float = 1000.0) -> Path:
    """x → MatMul → + a constant 'massive activation' channel (1000× the others, ignored downstream: its row of the
    second weight is zero) → MatMul → 16 values. One uint8 step of the middle tensor is 4, one uint16 step 0.015."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(width), (width, 16)).astype(np.float32)
    w2[0] = 0.0
    shift = np.zeros(width, np.float32)
    shift[0] = outlier
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
         onnx.helper.make_node("Add", ["h", "shift"], ["h2"], name="shift"),
         onnx.helper.make_node("MatMul", ["h2", "w2"], ["y"], name="second")],
        "massive", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, width])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2"),
         onnx.numpy_helper.from_array(shift, "shift")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.slow
def test_sixteen_bit_activations_replace_float_nodes_where_onnx_runtime_runs_them(tmp_path):
    """rpi5 runs ONNX Runtime ≥ 1.18: a model that plain INT8 breaks (a massive activation) ships with no weight in
    float (the budget is zero), the node reading that tensor on 16-bit activations, at the size of plain INT8. A
    runtime older than 1.18 refuses it under the same budget."""
    model = massive_activation_mlp(tmp_path / "massive.onnx")
    rng = np.random.default_rng(0)
    data = DataSet([{"x": rng.normal(0, 1, (1, 32)).astype(np.float32)} for _ in range(120)], "normal")
    reports, ev = convert(model, data, tmp_path, [strict_profile(tmp_path, "rpi5", max_float_weight_fraction=0.0)])
    r = reports[0]
    assert r.status is Status.SHIPPABLE, r.reasons
    mp = r.mixed_precision
    assert mp and mp.full_int8_failed and mp.sixteen_bit_nodes and not mp.float_nodes
    assert mp.float_weight_fraction == 0.0 and mp.size_cost_bytes <= 0
    assert any("16-bit" in t.what for t in r.search.tried)
    artifact = tmp_path / "out" / "strict" / "model.int8.onnx"
    graph = onnx.load(str(artifact))
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21
    wide = {init.name for init in graph.graph.initializer if init.data_type == onnx.TensorProto.UINT16}
    assert wide and any(n.op_type == "QuantizeLinear" and n.input[2] in wide for n in graph.graph.node)
    fp32, ours = run(model, ev.samples)["y"], run(artifact, ev.samples)["y"]
    assert cosine_per_sample(fp32, ours).mean() > 0.999 and cosine_per_sample(fp32, ours).min() > 0.99
    # what a device serves (ONNX Runtime's fused kernels) is what was judged (the QDQ arithmetic): on ORT 1.32 the
    # Gemm's block on 16-bit activations answered all zeros fused, so the search took the MatMul's instead
    served, judged = runtimes.load(artifact), runtimes.load(artifact, exact=True)
    pairs = [(served.run(s)["y"], judged.run(s)["y"]) for s in ev.samples[:8]]
    assert cosine_per_sample(np.concatenate([a for a, _ in pairs]),
                             np.concatenate([b for _, b in pairs])).min() > 0.999  # the probe's signed floor

    old, _ = convert(model, data, tmp_path / "old", [strict_profile(tmp_path, "rpi5", max_float_weight_fraction=0.0,
                                                                    runtime_versions=OLD_ORT)])
    assert old[0].status is Status.REFUSED and not any("16-bit" in t.what for t in old[0].search.tried)


def test_sixteen_bit_activations_only_where_the_runtime_runs_them():
    assert onnx_int8.sixteen_bit_supported("onnxruntime", ">=1.18,<2", ["CPUExecutionProvider"])
    assert not onnx_int8.sixteen_bit_supported("onnxruntime", ">=1.16,<2", ["CPUExecutionProvider"])
    assert not onnx_int8.sixteen_bit_supported("onnxruntime", ">=1.17,<2",
                                               ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    assert not onnx_int8.sixteen_bit_supported("litert", ">=1.18", [])
    assert onnx_int8.sixteen_bit_supported("onnxruntime", "~=1.20.0", [])


def strict_profile(tmp_path: Path, base: str, **fidelity):
    text = (Path(__file__).parents[2] / "firmware_profiles" / "profiles" / f"{base}.toml").read_text()
    for key, value in fidelity.items():
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
        if f"{key} =" not in text:
            text = text.replace("[fidelity]", f"[fidelity]\n{key} = {value}")
    text = text.replace(f'id = "{base}"', 'id = "strict"')
    (tmp_path / "strict.toml").write_text(text)
    return load_profile_file(tmp_path / "strict.toml")


@pytest.mark.slow
def test_gate_refuses_when_mixed_precision_budget_cannot_meet_the_floor(recognizer, digit_lines, tmp_path):
    images, _ = digit_lines
    data = DataSet([{"image": images[i : i + 1]} for i in range(len(images))], "digit lines")
    out = tmp_path / "out" / "strict" / "model.int8.onnx"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"stale artifact from an earlier run")
    reports, _ = convert(recognizer, data, tmp_path, [strict_profile(tmp_path, "rpi5", max_float_weight_fraction=0.0,
                                                                     runtime_versions=OLD_ORT)])
    r = reports[0]
    assert r.status is Status.REFUSED and not r.shippable and r.artifact is None
    assert any("decoded-string agreement" in x for x in r.reasons) and any("mixed precision" in x for x in r.reasons)
    assert not out.exists()  # nothing left behind that could be mistaken for a shippable artifact
    assert (tmp_path / "out" / "strict" / "onnx-int8.report.json").exists()


def test_weights_inside_control_flow_are_reported_as_nothing_quantized(tmp_path):
    model = zoo.weights_in_subgraph(tmp_path / "if.onnx")
    reports, _ = convert(model, samples_for(model, 12), tmp_path, ["rpi5"])
    r = reports[0]
    assert r.status is Status.REFUSED and r.quantization.quantized_weight_tensors == 0
    assert any("nothing quantized" in x for x in r.reasons)
    assert r.quantization.subgraph_float_weights == 2 * 64 * 256
    assert not (tmp_path / "out" / "rpi5" / "model.int8.onnx").exists()


def test_old_opset_model_is_upgraded_and_quantized_per_channel(tmp_path):
    model = zoo.mlp_opset(tmp_path / "old.onnx", opset=11)
    reports, _ = convert(model, samples_for(model, 12), tmp_path, ["rpi5"])
    r = reports[0]
    assert r.status is Status.SHIPPABLE and r.quantization.per_channel_used
    assert any("upgraded opset 11" in n for n in r.notes)
    ort.InferenceSession(str(tmp_path / "out" / "rpi5" / "model.int8.onnx"))


def test_without_an_opset_upgrade_per_channel_falls_back_to_per_tensor(tmp_path):
    model = zoo.mlp_opset(tmp_path / "old.onnx", opset=11)
    prepared = onnx_int8.Prepared(model, onnx.load(str(model)))
    samples = synthetic_dataset(load_source(model, tmp_path / "w").inputs, 8).samples
    scheme = load_profile("rpi5").artifacts[0].quantization
    q = onnx_int8.quantize(prepared, samples, scheme, tmp_path / "q.onnx")
    assert not q.per_channel and "per-tensor" in q.notes[0]
    ort.InferenceSession(str(tmp_path / "q.onnx"))  # the plain per-channel result would not even load


def test_symbolic_shape_inference_failure_falls_back_and_says_so(tmp_path):
    model = zoo.scaler_mlp(tmp_path / "pipeline.onnx")
    reports, _ = convert(model, samples_for(model, 20), tmp_path, ["rpi5"])
    r = reports[0]
    assert r.status is Status.SHIPPABLE
    assert any("symbolic shape inference failed" in n for n in r.notes)


# The grouped net has random weights: on 5 evaluation samples one near-tied argmax would fail a 99% top-1 floor.
# These tests are about latency, so its output is judged by cosine and SQNR only.
NOT_A_CLASSIFIER = {"logits": OutputKind.REGRESSION}


@pytest.mark.slow
def test_int8_slower_than_fp32_is_flagged_and_the_profile_decides(tmp_path):
    """Grouped convolutions have no fast INT8 kernel on this CPU: INT8 runs several times slower than FP32."""
    model = zoo.grouped_conv_net(tmp_path / "grouped.onnx", size=32)
    data = samples_for(model, 16)
    reports, _ = convert(model, data, tmp_path, ["rpi5"], output_kinds=NOT_A_CLASSIFIER)
    rpi5 = reports[0]
    assert rpi5.latency.ratio > 1.5 and rpi5.latency.regression  # measured, FP32 and INT8 in the same run
    assert rpi5.status is Status.SHIPPABLE  # rpi5's policy: warn
    assert any(c.warning for c in rpi5.checks if c.name.startswith("latency"))
    assert any("latency regression" in n for n in rpi5.notes)

    # A profile that refuses slow INT8 but allows no float nodes: refused, nothing written.
    # Enforced on this host whatever its CPU: grouped convolutions are slow in INT8 with or without VNNI.
    no_budget = strict_profile(tmp_path, "rpi4", max_latency_ratio=1.0, max_float_weight_fraction=0.0)
    reports, _ = convert(model, data, tmp_path / "a", [no_budget], output_kinds=NOT_A_CLASSIFIER,
                         enforce_host_latency=True)
    refused = reports[0]
    assert refused.status is Status.REFUSED and any("latency ratio" in x and "'refuse'" in x for x in refused.reasons)
    assert not (tmp_path / "a" / "out" / "strict" / "model.int8.onnx").exists()


@pytest.mark.slow
def test_slowest_int8_kernels_measured_and_kept_in_float_until_int8_is_faster(tmp_path):
    """All-INT8 runs ~9x slower than FP32 here; a 3x bound leaves a wide margin for a noisy shared host (this is a
    test of the mechanism, not a timing: the figures themselves belong to the benchmark)."""
    model = zoo.grouped_conv_net(tmp_path / "grouped.onnx", size=32)
    # The widest grouped conv holds most of the weights: the budget must allow floating it.
    profile = strict_profile(tmp_path, "rpi4", max_float_weight_fraction=0.9, max_latency_ratio=3.0)
    reports, ev = convert(model, samples_for(model, 16), tmp_path, [profile], output_kinds=NOT_A_CLASSIFIER,
                          enforce_host_latency=True)
    r = reports[0]
    assert r.status is Status.SHIPPABLE, r.reasons
    mp = r.mixed_precision
    assert any("latency ratio" in f for f in mp.full_int8_failed)
    # the grouped convolutions first (no fast INT8 path on x86), or the slowest kernels measured
    assert "grouped convolution" in mp.why or "slowest INT8 kernel" in mp.why, mp.why
    assert "/features/features.6/Conv" in mp.float_nodes  # the widest grouped conv: by far the slowest kernel
    assert r.latency.ratio <= 3.0 and mp.latency_cost_ms < 0  # faster than the all-INT8 attempt
    assert r.quantization.quantized_weight_tensors >= 1  # never every kernel: that would be a float model
    fp32 = run(model, ev.samples)["logits"]
    int8 = run(tmp_path / "out" / "strict" / "model.int8.onnx", ev.samples)["logits"]
    assert cosine_per_sample(fp32, int8).mean() >= 0.99


def test_external_data_model_converts(mobilenet, tmp_path):
    m = onnx.load(str(mobilenet))
    onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.weights",
                    size_threshold=0)
    reports, _ = convert(tmp_path / "ext.onnx", samples_for(mobilenet, 16), tmp_path, ["rpi5"])
    assert reports[0].status is Status.SHIPPABLE and reports[0].source.size_bytes > 500_000


def test_recurrent_weights_stay_float_and_the_gate_refuses_an_int8_file_that_is_not_smaller(tmp_path):
    """ONNX Runtime's static QDQ quantizer has no INT8 GRU: only the head is quantized, and pre-processing makes
    the file larger than its source. Shipping that as 'INT8' would be a lie, so the gate refuses it."""
    model = zoo.recurrent(tmp_path / "gru.onnx")
    reports, ev = convert(model, samples_for(model, 30), tmp_path, ["rpi5"])
    r = reports[0]
    assert r.quantization.quantized_weight_tensors >= 1 and r.quantization.quantized_weight_fraction < 0.2
    if r.size.ratio >= 1.0:
        assert r.status is Status.REFUSED and any("not smaller" in x for x in r.reasons)
    else:  # should a future quantizer shrink it, fidelity must still hold on real inference
        assert r.status is Status.SHIPPABLE
        fp32 = run(model, ev.samples)["logits"]
        int8 = run(tmp_path / "out" / "rpi5" / "model.int8.onnx", ev.samples)["logits"]
        assert cosine_per_sample(fp32, int8).mean() >= 0.99
