"""ONNX → TFLite (FP32 and full-integer INT8), run as a child process: ``python -m converters.tflite_worker JOB``.

TensorFlow and onnx2tf stay out of the converter's own process (their import time, memory and threads), and the
child's peak RSS is the per-target memory figure. onnx2tf turns NCHW inputs into NHWC and, for image-like inputs,
checks its conversion against a sample it would download; the worker pre-seeds that sample in its own working
directory with deterministic data, so nothing ever touches the network.

JOB is a JSON file: {"onnx": path, "calibration": npz path (NHWC-ready arrays per input, stacked), "out": folder,
"io_type": "int8" | "float32", "allow_float_ops": bool}. The result is written to ``out/result.json``.

Where float ops are allowed, the worker also writes further INT8 models from the same calibration, each one more
MLIR quantizer run (seconds), no second onnx2tf conversion: the *float-elementwise variant* (weight-bearing ops
INT8, ``ELEMENTWISE_FLOAT_OPS`` float), then the *float-outlier-layers variants* (also the weight-bearing ops whose
calibrated output range dwarfs the others', ``tflite_tail.outlier_layers``). The pass measures them in that order,
only when full INT8 fails the gate.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from converters import tflite_options, tflite_tail
from converters.workers import worker_main

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _record_stage(out: Path, stage: tflite_options.Stage) -> None:
    """Where the worker is, for the parent to read when the process dies without a result (an abort in LiteRT)."""
    (out / tflite_options.STAGE_FILE).write_text(stage.value)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def _float_ops(tflite: bytes) -> list[str]:
    """Builtin ops of an 'INT8' model that still compute in float (what full-integer conversion could not cover)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=tflite)
    details = {t["index"]: t for t in it.get_tensor_details()}
    names = set()
    for op in it._get_ops_details():  # the only LiteRT API that lists ops with their tensors
        ins = [details[i] for i in op["inputs"] if i >= 0 and i in details]
        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE") and any(str(t["dtype"]).endswith("float32'>")
                                                                     for t in ins):
            names.add(op["op_name"])
    return sorted(names)


# Ops with no TFLite builtin that onnx2tf can rewrite into builtin approximations (its "pseudo operators").
# Keys: TF op names, lowercased; values: onnx2tf's names for them, which it compares in lowercase.
PSEUDO_OPS = {"erf": "erf", "gelu": "gelu", "asin": "asin", "acos": "acos", "atan": "atan", "abs": "abs",
              "prelu": "prelu", "leakyrelu": "leakyrelu", "pow": "power", "gathernd": "gathernd", "neg": "neg",
              "hardswish": "hardswish"}


def unsupported_ops(message: str) -> list[str]:
    """TF op names the TFLite converter could not lower, from its error text."""
    found = re.findall(r"'tf\.(\w+)' op is neither", message) + re.findall(r'fused\["(\w+):', message)
    return sorted({f for f in found if "PartitionedCall" not in f})  # call wrappers, not ops


# ONNX ops that always become a TF op with no TFLite builtin: asked for their pseudo operator from the start, which
# saves a second onnx2tf run (all-MiniLM-L6-v2's GELU Erf: about 2 minutes, 2026-12-01).
KNOWN_PSEUDO_ONNX_OPS = {"Erf": "erf"}


def _known_pseudo_ops(path: str) -> list[str]:
    import onnx

    ops = {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}
    return sorted(pseudo for op, pseudo in KNOWN_PSEUDO_ONNX_OPS.items() if op in ops)


# Elementwise ops the float-elementwise variant keeps in float. Requantizing after every Add/Mul/HardSwish of an
# attention neck is what hurts: PP-OCRv4 rec reads 0.74 of lines under full INT8 TFLite, 0.9875 with these in float
# (FP32 0.99), at 0.73x FP32 latency and the same size (measured 2026-12-01, LiteRT XNNPACK, 2 threads).
ELEMENTWISE_FLOAT_OPS = ("ADD", "SUB", "MUL", "DIV", "HARD_SWISH", "LOGISTIC", "MEAN", "SQUARED_DIFFERENCE", "RSQRT",
                         "SQRT", "POW", "SOFTMAX")


@dataclass
class Converted:
    fp32: bytes
    int8: bytes
    notes: list[str]
    variants: list[Variant] = field(default_factory=list)  # only where float ops are allowed
    variant_notes: list[str] = field(default_factory=list)  # variants that could not be built


def _convert(job: dict, out: Path, pseudo: list[str], calib: dict) -> Converted:
    import onnx2tf
    import tensorflow as tf

    saved = out / ("saved_model" + ("-pseudo" if pseudo else ""))
    _record_stage(out, tflite_options.Stage.ONNX2TF)
    onnx2tf.convert(input_onnx_file_path=job["onnx"], output_folder_path=str(saved), non_verbose=True,
                    copy_onnx_input_output_names_to_tflite=True, output_signaturedefs=True,
                    keep_ncw_or_nchw_or_ncdhw_input_names=job.get("keep_layout_inputs") or None,
                    replace_to_pseudo_operators=pseudo or None, **job.get("onnx2tf_options", {}))

    def representative():
        n = len(next(iter(calib.values())))
        for i in range(n):
            yield {k: v[i] for k, v in calib.items()}

    _record_stage(out, tflite_options.Stage.TFLITE)
    fp32 = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()

    def int8_converter(ops):
        c = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = representative
        c.target_spec.supported_ops = ops
        if job["io_type"] == "int8":
            c.inference_input_type = tf.int8
            c.inference_output_type = tf.int8
        return c

    notes: list[str] = []
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        int8 = int8_converter(ops).convert()
    except Exception as e:  # TF raises ConverterError naming the op it could not quantize
        first = str(e).strip().splitlines()[0][:300]
        if not job["allow_float_ops"]:
            raise RuntimeError(f"full-integer TFLite conversion failed and the profile allows no float ops: {first}")\
                from e
        notes.append(f"full-integer conversion failed ({first}); kept the ops it cannot quantize in float")
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        int8 = int8_converter(ops).convert()
    calibrated = _calibrate(int8_converter(ops))
    plan = _float_plan(calibrated, job, notes, _onnx_output_names(job["onnx"]))
    if plan.nodes:
        int8 = _quantize_denying(calibrated, plan, job["io_type"])
    _record_stage(out, tflite_options.Stage.LITERT)
    while (refused := _refused_kernel(int8, calib)) is not None:
        op, message = refused
        if op == XNNPACK and job["allow_float_ops"]:
            int8 = _avoid_xnnpack_failure(calibrated, plan, job["io_type"], calib, message, notes)
            continue
        if not job["allow_float_ops"]:
            raise RuntimeError(f"LiteRT's INT8 {op} kernel fails on this model ({message}) and the profile allows "
                               "no float ops")
        if op in plan.ops or len(plan.ops) >= MAX_DENIED_OPS:
            raise RuntimeError(f"LiteRT's INT8 kernels fail on this model even with {', '.join(plan.ops)} in "
                               f"float: {message}")
        plan.ops.append(op)
        int8 = _quantize_denying(calibrated, plan, job["io_type"])
        notes.append(f"LiteRT's INT8 {op} kernel refused this model at inference ({message}); {op} kept in float")
    converted = Converted(fp32, int8, notes)
    if job["allow_float_ops"]:
        converted.variants, converted.variant_notes = _variants(calibrated, plan, job, calib)
    return converted


@dataclass
class Variant:
    """A further INT8 model from the same calibration, more ops in float; the pass judges them in order."""

    name: str
    model: bytes
    notes: list[str]
    float_layers: int = 0  # weight-bearing ops kept in float


FLOAT_ELEMENTWISE = "float-elementwise"
FLOAT_OUTLIER_LAYERS = "float-outlier-layers"


def _variants(calibrated: bytes, plan: FloatPlan, job: dict, calib: dict) -> tuple[list[Variant], list[str]]:
    """The float-elementwise variant, then the float-outlier-layers ones (fewest float layers first); notes say
    which could not be built."""
    elementwise = [*plan.ops, *(op for op in ELEMENTWISE_FLOAT_OPS if op not in plan.ops)]
    built, notes = [], []
    first = _variant(calibrated, FloatPlan(elementwise, plan.nodes, plan.float_outputs), job, calib)
    if isinstance(first, str):
        notes.append(f"{FLOAT_ELEMENTWISE} variant not built: {first}")
    else:
        built.append(Variant(FLOAT_ELEMENTWISE, first, [
            f"{FLOAT_ELEMENTWISE} variant: weight-bearing ops INT8, {', '.join(ELEMENTWISE_FLOAT_OPS)} in float "
            "(same calibration, same weights)"]))
    graph = tflite_tail.ops_from_flatbuffer(calibrated)
    seen: set[tuple[str, ...]] = set()
    for ratio in tflite_tail.OUTLIER_RATIOS:
        layers = tflite_tail.outlier_layers(graph, ratio)
        nodes = tuple(graph.tensor_names[op.outputs[0]] for op in layers)
        if not nodes or nodes in seen:
            continue
        seen.add(nodes)
        model = _variant(calibrated, FloatPlan(elementwise, [*plan.nodes, *nodes], plan.float_outputs), job, calib)
        if isinstance(model, str):
            notes.append(f"{FLOAT_OUTLIER_LAYERS} variant ({len(nodes)} layers) not built: {model}")
            continue
        kinds = ", ".join(f"{n} {k}" for k, n in Counter(op.kind for op in layers).items())
        built.append(Variant(FLOAT_OUTLIER_LAYERS, model, [
            f"{FLOAT_OUTLIER_LAYERS} variant: as {FLOAT_ELEMENTWISE}, plus the {len(nodes)} weight-bearing ops "
            f"({kinds}) whose calibrated output range is at least {ratio:g}x the median one in float; the other "
            "weights INT8"], len(nodes)))
    return built, notes


def _variant(calibrated: bytes, plan: FloatPlan, job: dict, calib: dict) -> bytes | str:
    """``plan`` quantized and run once under LiteRT; a string says why there is no such model."""
    try:
        model = _quantize_denying(calibrated, plan, job["io_type"])
        refused = _refused_kernel(model, calib)
    except Exception as e:  # the quantizer or LiteRT refusing a variant leaves the others as candidates
        return str(e).strip().splitlines()[0][:200]
    if refused is not None:
        return f"LiteRT's INT8 {refused[0]} kernel refused it ({refused[1]})"
    return model


@dataclass
class FloatPlan:
    """What the MLIR quantizer leaves in float: op kinds (kernels LiteRT refuses) and nodes (decode tails)."""

    ops: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    float_outputs: bool = False  # a decode tail ends at an output: outputs stay float32 (one int8 scale collapses)
    notes: list[str] = field(default_factory=list)  # why nodes outside decode tails stay float


def _float_plan(calibrated: bytes, job: dict, notes: list[str], onnx_outputs: list[str]) -> FloatPlan:
    """Decode tails (outputs concatenating very different ranges) kept in float where the profile allows it."""
    plan = FloatPlan()
    graph = tflite_tail.ops_from_flatbuffer(calibrated)
    for tail in tflite_tail.float_tails(graph):
        output = tflite_tail.onnx_output_name(graph, tail.tensor, onnx_outputs)
        what = (f"output {output!r} concatenates values whose calibrated ranges differ {tail.ratio:.0f}x "
                "(e.g. box coordinates and class scores)")
        if not job["allow_float_ops"]:
            notes.append(f"{what}; the profile allows no float ops, so it shares one int8 scale")
            continue
        plan.nodes += tail.nodes
        plan.float_outputs = True
        notes.append(f"{what}: its decode ({len(tail.nodes)} ops: {', '.join(tail.kinds)}) stays float and the "
                     "outputs are float32, so each part keeps its own scale")
    _keep_unbounded_in_float(graph, plan, job)
    notes.extend(plan.notes)
    return plan


def _keep_unbounded_in_float(graph: tflite_tail.Graph, plan: FloatPlan, job: dict) -> None:
    """Ops around a ±FLT_MAX range (an attention mask's finfo.min) into ``plan``: quantized, LiteRT aborts."""
    ops = [op for op in tflite_tail.unbounded_range_ops(graph) if graph.tensor_names[op.outputs[0]] not in plan.nodes]
    if not ops:
        return
    kinds = ", ".join(sorted({op.kind for op in ops}))
    if not job["allow_float_ops"]:
        raise RuntimeError(
            f"{len(ops)} ops ({kinds}) compute with values near ±FLT_MAX (e.g. an attention mask built with "
            "finfo(float32).min), which int8 cannot represent and LiteRT's INT8 kernels abort on; the profile "
            "allows no float ops. Export the model with a finite mask value (e.g. -1e4) or use a profile that "
            "allows float ops")
    plan.nodes += [graph.tensor_names[op.outputs[0]] for op in ops]
    plan.notes.append(f"{len(ops)} ops ({kinds}) read or write values near ±FLT_MAX (an attention mask built with "
                      "finfo(float32).min): kept in float, as int8 cannot represent that range")


MAX_DENIED_OPS = 4


def _onnx_output_names(path: str) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(path, load_external_data=False).graph.output]


def name_outputs(tflite: bytes, names: list[str]) -> bytes:
    """The signature's outputs named as the ONNX model names them. onnx2tf keys them ``output_0``, ``output_1``...
    in ONNX order; an agent serving this model next to ONNX devices must answer with the same names."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    for sig in model.signatureDefs or []:
        keyed = {m.name.decode(): m for m in sig.outputs}
        if set(keyed) == set(names) or len(keyed) != len(names):
            continue
        if not all(k.rsplit("_", 1)[-1].isdigit() for k in keyed):
            continue
        for k, name in zip(sorted(keyed, key=lambda k: int(k.rsplit("_", 1)[-1])), names, strict=True):
            keyed[k].name = name.encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


PROBE_TRIES = 3


def _refused_kernel(tflite: bytes, calib: dict) -> tuple[str, str] | None:
    """Run the model once with LiteRT in a forked child: (op, message) when a kernel refuses to invoke, else None.

    An INT8 kernel fed a zero scale is undefined behaviour in LiteRT: usually it refuses, sometimes it kills the
    process. The child takes the crash; a crashed probe is tried again, and only a model that crashes every time
    fails the conversion."""
    import pickle

    for _ in range(PROBE_TRIES):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: probe, send the answer, leave without running the parent's cleanup
            os.close(read)
            try:
                answer: object = ("ok", _probe_kernels(tflite, calib))
            except Exception as e:  # carried to the parent, raised there
                answer = ("error", f"{type(e).__name__}: {e}")
            with os.fdopen(write, "wb") as f:
                pickle.dump(answer, f)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if data and os.WIFEXITED(status):
            kind, value = pickle.loads(data)
            if kind == "error":
                raise RuntimeError(value)
            return value
    raise RuntimeError(f"LiteRT crashes running the INT8 model ({PROBE_TRIES} tries)")


def _probe_kernels(tflite: bytes, calib: dict) -> tuple[str, str] | None:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=tflite).get_signature_runner()
    feed = {}
    for name, d in runner.get_input_details().items():
        x = calib[name][0]
        if d["dtype"] == np.int8:
            scale, zero = d["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        feed[name] = x
    try:
        runner(**feed)
    except RuntimeError as e:  # "tflite/kernels/div.cc:262 data[i] != zero_point ... Node number 66 (DIV) failed"
        if "(TfLiteXNNPackDelegate) failed to prepare" in str(e):
            return XNNPACK, str(e).split("Node number")[0].strip()[:160]
        found = re.search(r"Node number \d+ \((\w+)\) failed to invoke", str(e))
        if found is None:
            raise
        return found.group(1), str(e).split(".Node number")[0].strip()[:160]
    return None


XNNPACK = "XNNPACK delegate"
MAX_NODES_TRIED = 24


def _avoid_xnnpack_failure(calibrated: bytes, plan: FloatPlan, io_type: str, calib: dict, message: str,
                           notes: list[str]) -> bytes:
    """XNNPACK refuses to build its runtime for the INT8 graph and names no op (MTCNN's ONet: one INT8 CONV_2D,
    measured 2026-12-01). Find the fewest float ops that let it prepare: one op kind at a time, then one node of
    that kind at a time, and keep that node (or the kind) in float."""
    graph = tflite_tail.ops_from_flatbuffer(calibrated)
    kinds = list(dict.fromkeys(op.kind for op in graph.ops if op.kind not in plan.ops))

    def prepares(extra_ops: list[str], extra_nodes: list[str]) -> bytes | None:
        trial = FloatPlan([*plan.ops, *extra_ops], [*plan.nodes, *extra_nodes], plan.float_outputs)
        model = _quantize_denying(calibrated, trial, io_type)
        refused = _refused_kernel(model, calib)
        return model if refused is None or refused[0] != XNNPACK else None

    for kind in kinds:
        if prepares([kind], []) is None:
            continue
        nodes = [graph.tensor_names[op.outputs[0]] for op in graph.ops if op.kind == kind]
        for node in nodes[:MAX_NODES_TRIED]:
            if (model := prepares([], [node])) is not None:
                plan.nodes.append(node)
                notes.append(f"LiteRT's XNNPACK delegate cannot prepare this INT8 graph ({message}); one {kind} "
                             f"({node}) kept in float, which it can")
                return model
        plan.ops.append(kind)
        notes.append(f"LiteRT's XNNPACK delegate cannot prepare this INT8 graph ({message}); every {kind} kept in "
                     "float, which it can")
        return _quantize_denying(calibrated, plan, io_type)
    raise RuntimeError(f"LiteRT's XNNPACK delegate cannot prepare this INT8 graph ({message}), whichever op kind "
                       "stays float; run it without the delegate or convert with float I/O")


def _calibrate(converter) -> bytes:
    """The float model with every tensor's calibrated range recorded (TF's route for its QuantizationDebugger)."""
    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True
    return _clamp_padding_ranges(converter.convert())


# A recorded magnitude beyond this is no activation: it is a padding constant (±FLT_MAX) showing through.
PADDING_SENTINEL = 1e30


def _clamp_padding_ranges(calibrated: bytes) -> bytes:
    """Give a PADV2 padded with ±FLT_MAX (onnx2tf's MaxPool with ceil_mode) its input's calibrated range.

    The recorded range ±3.4e38 makes one int8 step worth 1e36, so every activation after it becomes zero (MTCNN's
    ONet: softmax top-1 0.47 against FP32, and XNNPACK refuses the graph; measured 2026-12-01). With the input's
    range, the padding constant quantizes to the range's minimum, which the max pool after it never picks over a
    real value."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    pad = {i for i, c in enumerate(model.operatorCodes)
           if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.PADV2}
    changed = False
    for sub in model.subgraphs:
        for op in sub.operators:
            if op.opcodeIndex not in pad:
                continue
            src, dst = sub.tensors[op.inputs[0]].quantization, sub.tensors[op.outputs[0]].quantization
            if src is None or dst is None or src.min is None or dst.min is None or dst.max is None:
                continue
            if max(abs(float(dst.min[0])), abs(float(dst.max[0]))) > PADDING_SENTINEL:
                dst.min, dst.max = list(src.min), list(src.max)
                changed = True
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)) if changed else calibrated


def _quantize_denying(calibrated: bytes, plan: FloatPlan, io_type: str) -> bytes:
    """Quantize every op except ``plan``'s (TF's MLIR quantizer, as its QuantizationDebugger does), then give the
    model INT8 inputs (and INT8 outputs unless a decode tail ends there) the way TFLiteConverter does. An input
    read (or an output written) by a float op stays float32: there is no INT8 tensor there to expose."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tf_convert
    from tensorflow.lite.python import util as tf_util

    # Quantizing with float I/O first: asked for INT8 outputs directly (fully_quantize), the quantizer re-quantizes a
    # float decode tail's output with one scale again, which is the collapse the tail is there to avoid.
    model = tf_convert.mlir_quantize(calibrated, denylisted_ops=plan.ops or None,
                                     denylisted_nodes=plan.nodes or None)
    if io_type != "int8":
        return model
    for inputs, outputs in ((tf.int8, tf.float32 if plan.float_outputs else tf.int8), (tf.int8, tf.float32),
                            (tf.float32, tf.int8), (tf.float32, tf.float32)):
        try:
            return tf_util.modify_model_io_type(model, inputs, outputs)
        except ValueError:  # "Model input is not quantized." / "Model output is not dequantized."
            continue
    return model


def run(job: dict) -> dict:
    _quiet_tensorflow()
    import numpy as np

    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # onnx2tf reads its layout-check sample from the working directory
    np.save(out / ONNX2TF_SAMPLE, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    with np.load(job["calibration"]) as z:
        calib = {k: z[k] for k in z.files}
    known = _known_pseudo_ops(job["onnx"])
    try:
        converted = _convert(job, out, known, calib)
        if known:
            converted.notes.insert(0, f"TFLite has no builtin kernel for {', '.join(known)}: replaced with onnx2tf's "
                                      "builtin approximations; the fidelity figures include the approximation")
    except Exception as e:
        ops = unsupported_ops(str(e))
        if known and {PSEUDO_OPS.get(o.lower(), o) for o in ops} <= set(known):
            raise  # already replaced: retrying changes nothing
        if not ops:
            raise
        if any(o.lower() not in PSEUDO_OPS for o in ops):
            raise RuntimeError(f"TFLite has no builtin kernel for: {', '.join(ops)}") from e
        pseudo = sorted({PSEUDO_OPS[o.lower()] for o in ops} | set(known))
        converted = _convert(job, out, pseudo, calib)
        converted.notes.insert(0, f"TFLite has no builtin kernel for {', '.join(ops)}: replaced with onnx2tf's builtin "
                        f"approximations ({', '.join(pseudo)}); the fidelity figures include the approximation")
    names = _onnx_output_names(job["onnx"])
    (out / "model.fp32.tflite").write_bytes(name_outputs(converted.fp32, names))
    (out / "model.int8.tflite").write_bytes(name_outputs(converted.int8, names))
    result = {"fp32": str(out / "model.fp32.tflite"), "int8": str(out / "model.int8.tflite"),
              "float_ops": _float_ops(converted.int8), "notes": converted.notes, "variants": [],
              "variant_notes": converted.variant_notes}
    for i, variant in enumerate(converted.variants):
        path = out / f"model.int8-variant{i}.tflite"
        path.write_bytes(name_outputs(variant.model, names))
        result["variants"].append({"name": variant.name, "path": str(path), "float_ops": _float_ops(variant.model),
                                   "notes": variant.notes, "float_layers": variant.float_layers})
    return result


if __name__ == "__main__":
    sys.exit(worker_main(run))
