"""ONNX → ONNX INT8 (QDQ or QOperator) with ONNX Runtime's static quantization, driven by a profile's scheme.

Each function is one step with typed inputs and a path out: pre-processing (with the fallbacks real models need),
quantization (with the per-channel fallback for old opsets), and the inspection of what was actually quantized.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from converters.calibration import Sample
from converters.errors import QuantizationError
from converters.fidelity import OutputKind
from converters.source import (
    PER_CHANNEL_OPSET,
    SourceModel,
    _all_initializers,
    _first_line,
    default_opset,
    save_model,
)
from firmware_profiles import QuantizationScheme
from firmware_profiles.schema import CalibrationMethod as ProfileCalibration
from firmware_profiles.schema import QuantDtype
from firmware_profiles.schema import QuantFormat as ProfileQuantFormat

log = logging.getLogger(__name__)

# Ops that only move or reshape data: an output's meaning passes through them unchanged.
PASSTHROUGH_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}
# Ops that assemble an output tensor from parts: the "tail" of a head that concatenates quantities.
ASSEMBLY_OPS = PASSTHROUGH_OPS | {"Concat", "Slice", "Split", "Gather", "Expand", "Tile"}
CLASS_NAME_HINT = re.compile(r"logit|prob|class|cls|score|label", re.IGNORECASE)
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}

_CALIBRATION = {
    ProfileCalibration.MINMAX: CalibrationMethod.MinMax,
    ProfileCalibration.ENTROPY: CalibrationMethod.Entropy,
    ProfileCalibration.PERCENTILE: CalibrationMethod.Percentile,
}
_DTYPE = {QuantDtype.INT8: QuantType.QInt8, QuantDtype.UINT8: QuantType.QUInt8}


class SampleReader(CalibrationDataReader):
    """ONNX Runtime's one-method calibration reader over our samples."""

    def __init__(self, samples: list[Sample]):
        self._samples = samples
        self._next = 0

    def get_next(self) -> Sample | None:
        if self._next >= len(self._samples):
            return None
        self._next += 1
        return self._samples[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


@dataclass
class Prepared:
    """The float model the quantizer starts from: pre-processed, every node named."""

    path: Path
    graph: onnx.ModelProto  # its structure (weights not loaded), read once for every graph walk below
    notes: list[str] = field(default_factory=list)

    @property
    def compute_nodes(self) -> int:
        """Nodes that do real work; data-movement ops are free to keep in float."""
        return sum(1 for n in self.graph.graph.node if n.op_type not in PASSTHROUGH_OPS)


def prepare(source: SourceModel, workdir: Path) -> Prepared:
    """ONNX Runtime's quantization pre-processing, falling back step by step where real models break it."""
    out = workdir / "prepared.onnx"
    notes: list[str] = []
    attempts = [
        ({}, None),
        ({"skip_symbolic_shape": True}, "ONNX Runtime's symbolic shape inference failed ({}); used ONNX shape "
                                        "inference only"),
        ({"skip_symbolic_shape": True, "skip_optimization": True},
         "graph optimization failed in pre-processing ({}); quantizing the graph as exported"),
    ]
    error = ""
    for kwargs, note in attempts:
        if note:
            notes.append(note.format(error))
        try:
            # Incomplete symbolic inference dumps sym_shape_infer_temp.onnx (+ a .data file) into the working
            # directory before raising: keep that litter in our work directory.
            with _captured_errors("onnxruntime.quantization") as swallowed, contextlib.chdir(workdir):
                quant_pre_process(str(source.path.resolve()), str(out.resolve()),
                                  save_as_external_data=source.external_data, all_tensors_to_one_file=True, **kwargs)
            # The pre-processor logs some failures (graph optimization) instead of raising them.
            notes += [f"pre-processing: {m}" for m in swallowed]
            break
        except Exception as e:  # the pre-processor raises anything from AssertionError to ORT's Fail
            error = _first_line(e)
            log.info("pre-processing step failed: %s", error)
    else:
        notes.append(f"pre-processing skipped entirely ({error})")
        model = onnx.load(str(source.path))
        save_model(model, out)
    model = onnx.load(str(out))
    named = name_nodes(model)
    if named:
        save_model(model, out)
    return Prepared(out, onnx.load(str(out), load_external_data=False), notes)


@contextlib.contextmanager
def _captured_errors(logger_name: str):
    """Collect the first line of every ERROR record a library logs while the block runs."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage().strip()
            if text and not text.startswith("Traceback"):
                messages.append(text.splitlines()[0][:300])

    handler = _Collect(level=logging.ERROR)
    target = logging.getLogger(logger_name)
    target.addHandler(handler)
    try:
        yield messages
    finally:
        target.removeHandler(handler)


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a unique name (nodes_to_exclude works by name). Returns how many were named."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            count += 1
    return count


@dataclass
class Quantized:
    path: Path
    per_channel: bool
    excluded: list[str]
    notes: list[str] = field(default_factory=list)


def quantize(prepared: Prepared, calibration: list[Sample], scheme: QuantizationScheme, out: Path, *,
             exclude: Iterable[str] = (), external_data: bool = False) -> Quantized:
    model = prepared.graph
    float_op_nodes = [n.name for n in model.graph.node if n.op_type in scheme.float_ops]
    excluded = sorted(set(exclude) | set(float_op_nodes))
    notes = []
    per_channel = scheme.per_channel
    if per_channel and default_opset(model) < PER_CHANNEL_OPSET:
        per_channel = False
        notes.append(f"opset {default_opset(model)} < {PER_CHANNEL_OPSET}: per-channel quantization is impossible "
                     "(ONNX Runtime refuses to load the result); used per-tensor")
    try:
        _quantize_static(prepared.path, out, calibration, scheme, per_channel, excluded, external_data)
        _loads(out)
    except QuantizationError:
        raise
    except Exception as e:
        if not per_channel:
            raise QuantizationError(f"ONNX Runtime quantization failed: {_first_line(e)}") from e
        notes.append(f"per-channel result unusable ({_first_line(e)}); fell back to per-tensor")
        per_channel = False
        try:
            _quantize_static(prepared.path, out, calibration, scheme, False, excluded, external_data)
            _loads(out)
        except Exception as e2:
            raise QuantizationError(f"ONNX Runtime quantization failed: {_first_line(e2)}") from e2
    return Quantized(out, per_channel, excluded, notes)


def _quantize_static(src: Path, out: Path, calibration: list[Sample], scheme: QuantizationScheme,
                     per_channel: bool, excluded: list[str], external_data: bool) -> None:
    extra: dict[str, object] = {
        "ActivationSymmetric": scheme.activation_symmetric,
        "WeightSymmetric": scheme.weight_symmetric,
    }
    if scheme.calibration_method is ProfileCalibration.PERCENTILE:
        extra["CalibPercentile"] = scheme.percentile
    # The histogram calibrators print progress to stdout, which must stay clean for --json.
    with contextlib.redirect_stdout(io.StringIO()):
        _run_quantize_static(src, out, calibration, scheme, per_channel, excluded, external_data, extra)


def _run_quantize_static(src: Path, out: Path, calibration: list[Sample], scheme: QuantizationScheme,
                         per_channel: bool, excluded: list[str], external_data: bool,
                         extra: dict[str, object]) -> None:
    quantize_static(
        str(src), str(out), SampleReader(calibration),
        quant_format=QuantFormat.QDQ if scheme.format is ProfileQuantFormat.QDQ else QuantFormat.QOperator,
        per_channel=per_channel,
        activation_type=_DTYPE[scheme.activation_type],
        weight_type=_DTYPE[scheme.weight_type],
        nodes_to_exclude=excluded,
        calibrate_method=_CALIBRATION[scheme.calibration_method],
        use_external_data_format=external_data,
        extra_options=extra,
    )


def _loads(path: Path) -> None:
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class WeightStats:
    """What quantization did to the weights: counted from the artifact, not assumed."""

    quantized_tensors: int
    quantized_elements: int
    float_tensors: int
    float_elements: int
    subgraph_float_elements: int  # inside If/Loop/Scan bodies, which the quantizer leaves alone
    qdq_nodes: int

    @property
    def quantized_fraction(self) -> float:
        total = self.quantized_elements + self.float_elements + self.subgraph_float_elements
        return self.quantized_elements / total if total else 0.0

    @property
    def nothing_quantized(self) -> bool:
        return self.quantized_tensors == 0


_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_INT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT16,
              TensorProto.UINT16}
MIN_WEIGHT_ELEMENTS = 16  # smaller float constants are scales, shapes, epsilons — not weights


def weight_stats(path: Path) -> WeightStats:
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    dq_weight_inputs = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    dq_params = {i for n in graph.node if n.op_type in QUANT_OPS for i in n.input[1:]}
    q_tensors = q_elems = f_tensors = f_elems = 0
    for init in graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        if init.name in dq_params:
            continue
        if init.data_type in _INT_TYPES and init.name in dq_weight_inputs:
            q_tensors += 1
            q_elems += n
        elif init.data_type in _FLOAT_TYPES and n >= MIN_WEIGHT_ELEMENTS:
            f_tensors += 1
            f_elems += n
    main = {id(i) for i in graph.initializer}
    sub_elems = sum(int(np.prod(i.dims)) if i.dims else 1 for i in _all_initializers(graph)
                    if id(i) not in main and i.data_type in _FLOAT_TYPES)
    qdq = sum(1 for n in graph.node if n.op_type in QUANT_OPS)
    return WeightStats(q_tensors, q_elems, f_tensors, f_elems, sub_elems, qdq)


def output_kinds(path: Path, overrides: dict[str, OutputKind] | None = None) -> dict[str, OutputKind]:
    """What each output is for, read from the graph: a Softmax/LogSoftmax or a named logits layer is a classifier
    ([N, classes]) or a recognizer ([N, steps, vocab]); anything else is judged as a regression."""
    model = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    kinds: dict[str, OutputKind] = {}
    for out in model.graph.output:
        rank = len(out.type.tensor_type.shape.dim)
        node = producers.get(out.name)
        while node is not None and node.op_type in PASSTHROUGH_OPS:
            node = producers.get(node.input[0])
        classifier = node is not None and (
            node.op_type in ("Softmax", "LogSoftmax")
            or (node.op_type in ("Gemm", "MatMul", "Add") and CLASS_NAME_HINT.search(out.name) is not None))
        if classifier and rank == 2:
            kinds[out.name] = OutputKind.CLASSIFICATION
        elif classifier and rank == 3:
            kinds[out.name] = OutputKind.SEQUENCE
        else:
            kinds[out.name] = OutputKind.REGRESSION
    kinds.update(overrides or {})
    return kinds


def output_tail(model: onnx.ModelProto, output: str) -> list[str]:
    """Nodes that assemble ``output`` from parts (Concat and the reshapes after it), nearest first.

    Keeping these in float lets each part keep its own INT8 scale instead of sharing one across the whole range.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    tail, frontier, seen = [], [output], set()
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in seen or node.op_type not in ASSEMBLY_OPS:
            continue
        seen.add(node.name)
        tail.append(node.name)
        if node.op_type == "Concat":
            continue  # stop at the join: its inputs are the parts, each quantized on its own
        frontier.extend(i for i in node.input[:1] if i)
    return tail


def neighbours(model: onnx.ModelProto, tensors: Iterable[str]) -> list[str]:
    """The nodes to keep in float so that each tensor stays float: its producer and its consumers, following
    data-movement ops (a Reshape between an outlier tensor and a Gemm would otherwise carry it into the Gemm's
    quantized input)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    chosen: set[str] = set()
    for tensor in tensors:
        up = producers.get(tensor)
        while up is not None and up.name not in chosen:
            chosen.add(up.name)
            up = producers.get(up.input[0]) if up.op_type in PASSTHROUGH_OPS and up.input else None
        frontier = [tensor]
        while frontier:
            for node in consumers.get(frontier.pop(), []):
                if node.name not in chosen:
                    chosen.add(node.name)
                    if node.op_type in PASSTHROUGH_OPS:
                        frontier.extend(node.output)
    return sorted(chosen)


def compute_nodes(model: onnx.ModelProto, names: Iterable[str]) -> int:
    """How many of the named nodes do real work (data-movement ops cost nothing to keep in float)."""
    wanted = set(names)
    return sum(1 for n in model.graph.node if n.name in wanted and n.op_type not in PASSTHROUGH_OPS)
