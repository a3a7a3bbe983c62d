"""ONNX → TFLite full-integer INT8 for LiteRT (XNNPACK on Raspberry Pi and Android), calibrated on our data.

The conversion itself runs in ``converters.tflite_worker`` (a child process); this module prepares its inputs,
reads its result, and runs both TFLite models with LiteRT for fidelity and latency. Image inputs (4-D) become NHWC,
as TFLite expects; other inputs keep their layout. The report states the layout so the app feeds the right one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters import tflite_options
from converters.calibration import Sample
from converters.errors import QuantizationError
from converters.runtime import Latency, time_pairs
from converters.source import SourceModel
from converters.workers import run_worker

NCHW_TO_NHWC = (0, 2, 3, 1)
WORKER_TIMEOUT_S = 1200


@dataclass
class FloatVariant:
    """A further INT8 model the worker writes from the same calibration, more ops in float (``tflite_worker``):
    "float-elementwise", or "float-outlier-layers" (also the weight-bearing ops with outlier output ranges)."""

    name: str
    path: Path
    float_ops: list[str]
    notes: list[str] = field(default_factory=list)
    float_layers: int = 0  # weight-bearing ops kept in float

    @property
    def label(self) -> str:
        return f"{self.name} ({self.float_layers} layers in float)" if self.float_layers else self.name


@dataclass
class TfliteBuild:
    fp32: Path
    int8: Path
    input_perm: dict[str, tuple[int, ...] | None]  # ONNX layout → TFLite layout, per input
    float_ops: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    variants: list[FloatVariant] = field(default_factory=list)  # only where float ops are allowed, in judging order
    variant_notes: list[str] = field(default_factory=list)  # variants that could not be built


def input_permutations(source: SourceModel) -> dict[str, tuple[int, ...] | None]:
    return {i.name: NCHW_TO_NHWC if len(i.shape) == 4 else None for i in source.inputs}


def _to_tflite_layout(sample: Sample, perms: dict[str, tuple[int, ...] | None]) -> Sample:
    return {k: (np.ascontiguousarray(v.transpose(perms[k])) if perms.get(k) else v) for k, v in sample.items()}


def build(source: SourceModel, model: Path, calibration: list[Sample], workdir: Path, *, io_type: str = "int8",
          allow_float_ops: bool = False) -> TfliteBuild:
    """Convert ``model`` (the float ONNX with inputs pinned and shapes folded, ``tflite_prepare``) whose inputs and
    outputs are ``source``'s. onnx2tf is retried with the options it has for known failures (``tflite_options``);
    every failed attempt is named in the notes, or in the error when none succeeds."""
    out = workdir / f"tflite-{io_type}-{'mixed' if allow_float_ops else 'int8only'}"
    out.mkdir(parents=True, exist_ok=True)
    perms = input_permutations(source)
    np.savez(out / "calibration.npz", **{
        name: np.stack([_to_tflite_layout(s, perms)[name] for s in calibration]) for name in perms})
    keep = [i.name for i in source.inputs if perms[i.name] is None and len(i.shape) in (3, 5)]
    job = {"onnx": str(model), "calibration": str(out / "calibration.npz"), "out": str(out),
           "io_type": io_type, "allow_float_ops": allow_float_ops, "keep_layout_inputs": keep}
    failures: list[str] = []
    seconds = 0.0
    pending = list(tflite_options.attempts(model))
    reran = False
    while pending:
        attempt = pending.pop(0)
        (out / "result.json").unlink(missing_ok=True)
        (out / tflite_options.STAGE_FILE).unlink(missing_ok=True)
        try:
            result, took = run_worker("converters.tflite_worker", {**job, "onnx2tf_options": attempt.options}, out,
                                      what="TFLite conversion", timeout_s=WORKER_TIMEOUT_S)
        except QuantizationError as e:
            stage = tflite_options.crash_stage(str(e), _recorded_stage(out))
            if stage is tflite_options.Stage.LITERT and not reran:
                # An INT8 kernel fed a zero scale is undefined behaviour in LiteRT: usually it refuses (and the
                # worker keeps that op float), sometimes it crashes the process. Once more, the same attempt.
                reran = True
                pending.insert(0, attempt)
                failures.append(f"{attempt.label}: {e} (run again: LiteRT crashed while probing INT8 kernels)")
                continue
            if stage is not None:
                raise QuantizationError(_crash_message(str(e), stage, failures)) from e
            failures.append(f"{attempt.label}: {e}")
            if not tflite_options.worth_retrying(str(e)):
                break
            continue
        seconds += took
        notes = [*(f"onnx2tf attempt failed — {f}" for f in failures), *attempt.notes, *result["notes"]]
        variants = [FloatVariant(v["name"], Path(v["path"]), v["float_ops"], v["notes"], v.get("float_layers", 0))
                    for v in result.get("variants", [])]
        return TfliteBuild(Path(result["fp32"]), Path(result["int8"]), perms, result["float_ops"], notes,
                           seconds, result["peak_rss_mb"], variants, result.get("variant_notes", []))
    if len(failures) == 1:
        raise QuantizationError(failures[0].split(": ", 1)[1])
    raise QuantizationError("; ".join(failures))


def _recorded_stage(out: Path) -> str | None:
    stage = out / tflite_options.STAGE_FILE
    return stage.read_text() if stage.exists() else None


def _crash_message(error: str, stage: tflite_options.Stage, failures: list[str]) -> str:
    """A worker death after onnx2tf: final, with what to try instead."""
    earlier = f" (earlier onnx2tf attempts: {'; '.join(failures)})" if failures else ""
    return (f"{error} while {stage.value}, after onnx2tf had converted the model; not retried with other onnx2tf "
            f"options, which rebuild the same graph{earlier}. Try float I/O (io_type float32), a profile that "
            "allows float ops, or the ONNX INT8 artifact for this model")


class LiteRTModel:
    """A .tflite model under LiteRT (ai-edge-litert), fed and read in the ONNX model's layouts and dtypes."""

    def __init__(self, path: Path, input_perm: dict[str, tuple[int, ...] | None], threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.runner = self.interpreter.get_signature_runner()
        details = self.interpreter.get_signature_list()
        key = next(iter(details))
        self.inputs = self.runner.get_input_details()
        self.outputs = self.runner.get_output_details()
        self.output_names = list(details[key]["outputs"])
        self.input_perm = input_perm

    def has_int8_weights(self) -> bool:
        return any(t["dtype"] == np.int8 for t in self.interpreter.get_tensor_details())

    def feed(self, sample: Sample) -> dict[str, np.ndarray]:
        feed = {}
        for name, value in _to_tflite_layout(sample, self.input_perm).items():
            d = self.inputs[name]
            if d["dtype"] == np.int8:
                scale, zero = d["quantization"]
                value = np.clip(np.round(value / scale + zero), -128, 127).astype(np.int8)
            feed[name] = value
        return feed

    def run(self, sample: Sample) -> dict[str, np.ndarray]:
        raw = self.runner(**self.feed(sample))
        out = {}
        for name, value in raw.items():
            d = self.outputs[name]
            if d["dtype"] == np.int8:
                scale, zero = d["quantization"]
                value = (value.astype(np.float32) - zero) * scale
            out[name] = value
        return out

    def run_all(self, samples: list[Sample], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of every sample, stacked, named and laid out like the ONNX outputs in ``reference``.

        onnx2tf keys signature outputs ``output_0``, ``output_1``, ... in the ONNX model's output order when it
        cannot keep the names; they are matched by position then.
        """
        runs = [self.run(s) for s in samples]
        stacked = {n: np.concatenate([r[n] for r in runs]) for n in runs[0]}
        if set(stacked) != set(reference):
            if len(stacked) != len(reference):
                raise QuantizationError(f"TFLite model has outputs {sorted(stacked)}; ONNX has {sorted(reference)}")
            ordered = sorted(stacked, key=lambda n: int(n.rsplit("_", 1)[-1]) if n.rsplit("_", 1)[-1].isdigit()
                             else 0)
            stacked = {onnx_name: stacked[t] for onnx_name, t in zip(reference, ordered, strict=True)}
        return {name: _match_layout(stacked[name], ref.shape, name) for name, ref in reference.items()}


def _match_layout(value: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    if value.shape == shape:
        return value
    for perm in ((0, 3, 1, 2), (0, 2, 1)):
        if len(perm) == value.ndim and value.transpose(perm).shape == shape:
            return np.ascontiguousarray(value.transpose(perm))
    if value.size == int(np.prod(shape)):
        return value.reshape(shape)
    raise QuantizationError(f"TFLite output {name!r} has shape {value.shape}; ONNX gives {shape}")


def compare_latency(fp32: LiteRTModel, int8: LiteRTModel, sample: Sample, *, runs: int = 30,
                    warmup: int = 5, budget_s: float = 20.0) -> Latency:
    """Batch-1 latency under LiteRT, timed in pairs as the ONNX Runtime figures are (``runtime.time_pairs``)."""
    feeds = (fp32.feed(sample), int8.feed(sample))  # quantize inputs outside the timed call
    return time_pairs(lambda: fp32.runner(**feeds[0]), lambda: int8.runner(**feeds[1]), runs=runs, warmup=warmup,
                      budget_s=budget_s)
