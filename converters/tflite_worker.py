"""ONNX → TFLite (FP32 and full-integer INT8), run as a child process: ``python -m converters.tflite_worker JOB``.

TensorFlow and onnx2tf stay out of the converter's own process (their import time, memory and threads), and the
child's peak RSS is the per-target memory figure. onnx2tf turns NCHW inputs into NHWC and, for image-like inputs,
checks its conversion against a sample it would download; the worker pre-seeds that sample in its own working
directory with deterministic data, so nothing ever touches the network.

JOB is a JSON file: {"onnx": path, "calibration": npz path (NHWC-ready arrays per input, stacked), "out": folder,
"io_type": "int8" | "float32", "allow_float_ops": bool}. The result is written to ``out/result.json``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from converters.workers import worker_main

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


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


def _convert(job: dict, out: Path, pseudo: list[str], calib: dict) -> tuple[bytes, bytes, list[str]]:
    import onnx2tf
    import tensorflow as tf

    saved = out / ("saved_model" + ("-pseudo" if pseudo else ""))
    onnx2tf.convert(input_onnx_file_path=job["onnx"], output_folder_path=str(saved), non_verbose=True,
                    copy_onnx_input_output_names_to_tflite=True, output_signaturedefs=True,
                    keep_ncw_or_nchw_or_ncdhw_input_names=job.get("keep_layout_inputs") or None,
                    replace_to_pseudo_operators=pseudo or None)

    def representative():
        n = len(next(iter(calib.values())))
        for i in range(n):
            yield {k: v[i] for k, v in calib.items()}

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

    notes = []
    try:
        int8 = int8_converter([tf.lite.OpsSet.TFLITE_BUILTINS_INT8]).convert()
    except Exception as e:  # TF raises ConverterError naming the op it could not quantize
        first = str(e).strip().splitlines()[0][:300]
        if not job["allow_float_ops"]:
            raise RuntimeError(f"full-integer TFLite conversion failed and the profile allows no float ops: {first}")\
                from e
        notes.append(f"full-integer conversion failed ({first}); kept the ops it cannot quantize in float")
        int8 = int8_converter([tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]).convert()
    denied: list[str] = []
    while (refused := _refused_kernel(int8, calib)) is not None:
        op, message = refused
        if not job["allow_float_ops"]:
            raise RuntimeError(f"LiteRT's INT8 {op} kernel fails on this model ({message}) and the profile allows "
                               "no float ops")
        if op in denied or len(denied) >= MAX_DENIED_OPS:
            raise RuntimeError(f"LiteRT's INT8 kernels fail on this model even with {', '.join(denied)} in float: "
                               f"{message}")
        denied.append(op)
        int8 = _quantize_denying(int8_converter([tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]),
                                 denied, job["io_type"])
        notes.append(f"LiteRT's INT8 {op} kernel refused this model at inference ({message}); {op} kept in float")
    return fp32, int8, notes


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


def _refused_kernel(tflite: bytes, calib: dict) -> tuple[str, str] | None:
    """Run the model once with LiteRT: (op, message) when a kernel refuses to invoke, else None."""
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
        found = re.search(r"Node number \d+ \((\w+)\) failed to invoke", str(e))
        if found is None:
            raise
        return found.group(1), str(e).split(".Node number")[0].strip()[:160]
    return None


def _quantize_denying(converter, ops: list[str], io_type: str) -> bytes:
    """Calibrate, then quantize every op except ``ops`` (TF's MLIR quantizer, as its QuantizationDebugger does)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tf_convert

    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True  # the documented route of tf.lite.experimental.QuantizationDebugger
    calibrated = converter.convert()
    io = tf.int8 if io_type == "int8" else tf.float32
    return tf_convert.mlir_quantize(calibrated, fully_quantize=io_type == "int8", input_data_type=io,
                                    output_data_type=io, denylisted_ops=ops)


def run(job: dict) -> dict:
    _quiet_tensorflow()
    import numpy as np

    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # onnx2tf reads its layout-check sample from the working directory
    np.save(out / ONNX2TF_SAMPLE, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    with np.load(job["calibration"]) as z:
        calib = {k: z[k] for k in z.files}
    try:
        fp32, int8, notes = _convert(job, out, [], calib)
    except Exception as e:
        ops = unsupported_ops(str(e))
        pseudo = sorted({PSEUDO_OPS[o.lower()] for o in ops if o.lower() in PSEUDO_OPS})
        if not ops:
            raise
        if not pseudo or len(pseudo) < len(ops):
            raise RuntimeError(f"TFLite has no builtin kernel for: {', '.join(ops)}") from e
        fp32, int8, notes = _convert(job, out, pseudo, calib)
        notes.insert(0, f"TFLite has no builtin kernel for {', '.join(ops)}: replaced with onnx2tf's builtin "
                        f"approximations ({', '.join(pseudo)}); the fidelity figures include the approximation")
    names = _onnx_output_names(job["onnx"])
    (out / "model.fp32.tflite").write_bytes(name_outputs(fp32, names))
    (out / "model.int8.tflite").write_bytes(name_outputs(int8, names))
    return {"fp32": str(out / "model.fp32.tflite"), "int8": str(out / "model.int8.tflite"),
            "float_ops": _float_ops(int8), "notes": notes}


if __name__ == "__main__":
    sys.exit(worker_main(run))
