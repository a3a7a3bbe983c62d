"""ONNX → ONNX INT8 (QDQ or QOperator) with ONNX Runtime's static quantization, driven by a profile's scheme.

Each function is one step with typed inputs and a path out: pre-processing (with the fallbacks real models need),
quantization (with the per-channel fallback for old opsets), and the inspection of what was actually quantized.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
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
from converters.source import (
    PER_CHANNEL_OPSET,
    SourceModel,
    _all_initializers,
    _first_line,
    default_opset,
    model_files,
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
    start = source.path
    model = onnx.load(str(source.path))
    hoisted = hoist_constants(model)
    if hoisted:
        start = workdir / "hoisted.onnx"
        save_model(model, start)
        notes.append(f"{hoisted} weight tensor(s) stored as Constant nodes became initializers (the quantizer only "
                     "quantizes initializers; paddle2onnx exports keep every weight in Constants)")
    del model
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
                quant_pre_process(str(start.resolve()), str(out.resolve()),
                                  save_as_external_data=source.external_data, all_tensors_to_one_file=True, **kwargs)
            # The pre-processor logs some failures (graph optimization) instead of raising them.
            notes += [f"pre-processing: {m}" for m in swallowed]
            break
        except Exception as e:  # the pre-processor raises anything from AssertionError to ORT's Fail
            error = _first_line(e)
            log.info("pre-processing step failed: %s", error)
    else:
        notes.append(f"pre-processing skipped entirely ({error})")
        model = onnx.load(str(start))
        save_model(model, out)
    model = onnx.load(str(out))
    named = name_nodes(model)
    if named:
        save_model(model, out)
    return Prepared(out, onnx.load(str(out), load_external_data=False), notes)


def hoist_constants(model: onnx.ModelProto) -> int:
    """Turn the main graph's Constant nodes holding weight-sized tensors into initializers; returns how many."""
    graph = model.graph
    kept, count = [], 0
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1 and \
                int(np.prod(value.t.dims)) >= MIN_WEIGHT_ELEMENTS and value.t.data_type in _FLOAT_TYPES:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            count += 1
        else:
            kept.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(kept)
    return count


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
    choice: Choice | None = None
    wide: list[str] = field(default_factory=list)  # nodes whose activations are 16-bit


# The ops that carry weights: quantizing only these keeps every elementwise op (Mul, Add, Sigmoid, Concat...) in
# float, so a detector's decode tail and a recognizer's gates keep their own ranges, and ONNX Runtime's CPU kernels
# stay fused (re-quantizing ~200 elementwise ops made a recognizer 1.8× slower than FP32, and broke it).
# Gather counts when it reads a weight (an embedding table: half of a small BERT's bytes); a Gather over activations
# only moves data and is left alone.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather")
CALIBRATION_CHUNK = 8  # at most this many samples' activations are held at once while calibrating...
CALIBRATION_CHUNK_BYTES = 256 << 20  # ...and at most this many bytes of them (a 512×512 text map: one sample)


@dataclass(frozen=True)
class Choice:
    """One way to quantize a scheme: which ops, and how activation ranges are calibrated."""

    ops: str = "weighted"  # "weighted" (Conv, MatMul, Gemm) or "all" (every op ONNX Runtime can quantize)
    method: ProfileCalibration = ProfileCalibration.MINMAX
    percentile: float = 99.999
    smooth: float = 0.0  # SmoothQuant's α on the model first (``converters.smoothing``); 0: the model as prepared

    def label(self) -> str:
        ops = "weight-bearing ops (Conv, MatMul, Gemm, Gather of a table)" if self.ops == "weighted" else \
            "every quantizable op"
        calib = f"percentile {self.percentile:g}" if self.method is ProfileCalibration.PERCENTILE else \
            self.method.value
        smooth = f", SmoothQuant α={self.smooth:g}" if self.smooth else ""
        return f"{ops}, {calib} calibration{smooth}"

    def key(self) -> str:
        smooth = f"-smooth{self.smooth:g}" if self.smooth else ""
        return f"{self.ops}-{self.method.value}-{self.percentile:g}{smooth}"


def profile_choice(scheme: QuantizationScheme) -> Choice:
    """What the profile asks for, on the weight-bearing ops."""
    return Choice("weighted", scheme.calibration_method, scheme.percentile)


# Percentiles computed from one histogram pass: a search that tries one of them finds the others already cached.
SHARED_PERCENTILES = (99.99, 99.999)


def calibration_cache(folder: Path, scheme: QuantizationScheme, choice: Choice) -> Path:
    """Where a choice's activation ranges are cached (they depend on the ops, method, percentile and symmetry)."""
    symmetric = "sym" if scheme.activation_symmetric else "asym"
    method = f"percentile-{choice.percentile:g}" if choice.method is ProfileCalibration.PERCENTILE else \
        choice.method.value
    smooth = f"-smooth{choice.smooth:g}" if choice.smooth else ""  # another model: other tensors, other ranges
    return folder / f"calibration-{choice.ops}-{method}-{symmetric}{smooth}.json"


def calibrate(prepared: Prepared, samples: list[Sample], scheme: QuantizationScheme, choice: Choice,
              cache: Path) -> Path:
    """Activation ranges of every quantizable tensor, computed once per (method, percentile, symmetry) and kept in
    ONNX Runtime's calibration cache, which every attempt then reuses (different ops, nodes in float).

    Memory stays bounded: the samples go through in chunks of ``CALIBRATION_CHUNK``; min/max merges ranges and the
    histogram methods merge histograms after each chunk, so at most one chunk's activations are held. A percentile
    pass also writes the caches of ``SHARED_PERCENTILES`` (same histograms, another threshold).
    """
    if cache.is_file():
        return cache
    options: dict[str, object] = {"symmetric": scheme.activation_symmetric}
    if choice.method is ProfileCalibration.PERCENTILE:
        options["percentile"] = choice.percentile
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        _calibrate(prepared, samples, scheme, choice, cache, options)
    except Exception as e:  # ORT's calibrators raise anything from ValueError (histogram bins) to RuntimeError
        raise QuantizationError(f"calibration ({choice.label()}) failed: {_first_line(e)}") from e
    return cache


def _calibrate(prepared: Prepared, samples: list[Sample], scheme: QuantizationScheme, choice: Choice, cache: Path,
               options: dict[str, object]) -> None:
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp, contextlib.redirect_stdout(io.StringIO()):
        # Only the tensors the choice quantizes: fewer histograms, and none over an attention mask's -3.4e38.
        ops = list(WEIGHTED_OPS) if choice.ops == "weighted" else sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
        calibrator = create_calibrator(
            prepared.path, ops,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"), calibrate_method=_CALIBRATION[choice.method],
            use_external_data_format=len(model_files(prepared.path)) > 1, extra_options=options)
        chunk = calibration_chunk(prepared.graph)
        for start in range(0, len(samples), chunk):
            calibrator.collect_data(SampleReader(samples[start:start + chunk]))
        save_tensors_data(calibrator.compute_data(), cache)
        if choice.method is ProfileCalibration.PERCENTILE:
            for p in SHARED_PERCENTILES:
                sibling = calibration_cache(cache.parent, scheme, Choice(choice.ops, choice.method, p, choice.smooth))
                if p != choice.percentile and not sibling.is_file():
                    calibrator.collector.percentile = p
                    save_tensors_data(calibrator.compute_data(), sibling)
        del calibrator


def int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    """An integer attribute of a node (``group`` of a Conv, ``transB`` of a Gemm), or its ONNX default."""
    return next((a.i for a in node.attribute if a.name == name), default)


def activation_gathers(model: onnx.ModelProto) -> list[str]:
    """Gather nodes whose data is an activation, not a weight table: they only move values."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] not in weights]


def node_weight_elements(model: onnx.ModelProto) -> dict[str, int]:
    """The weight elements each node reads (its initializer inputs of weight size)."""
    sizes = {i.name: int(np.prod(i.dims)) if i.dims else 1 for i in model.graph.initializer
             if i.data_type in _FLOAT_TYPES}
    return {n.name: sum(sizes.get(i, 0) for i in n.input if sizes.get(i, 0) >= MIN_WEIGHT_ELEMENTS)
            for n in model.graph.node}


def calibration_chunk(model: onnx.ModelProto) -> int:
    """How many samples to calibrate at once: the histogram methods hold every activation of a chunk, so big
    feature maps get small chunks. Sized from the shapes shape inference recorded (batch 1)."""
    per_sample = 0
    for info in model.graph.value_info:
        t = info.type.tensor_type
        if t.elem_type in _FLOAT_TYPES:
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim]
            per_sample += int(np.prod(dims)) * 4
    return max(1, min(CALIBRATION_CHUNK, CALIBRATION_CHUNK_BYTES // max(per_sample, 1)))


def quantize(prepared: Prepared, calibration: list[Sample], scheme: QuantizationScheme, out: Path, *,
             choice: Choice | None = None, exclude: Iterable[str] = (), external_data: bool = False,
             cache: Path | None = None, wide: Iterable[str] = ()) -> Quantized:
    """Quantize ``prepared`` with ``scheme``'s types and ``choice``'s ops and calibration, nodes in ``exclude`` (and
    the scheme's float ops) kept in float, nodes in ``wide`` with 16-bit activations (``sixteen_bit_overrides``).
    ``cache``: the calibration cache to use or fill."""
    choice = choice or profile_choice(scheme)
    cache = calibrate(prepared, calibration, scheme, choice, cache or calibration_cache(out.parent, scheme, choice))
    model = prepared.graph
    float_op_nodes = [n.name for n in model.graph.node if n.op_type in scheme.float_ops]
    excluded = sorted(set(exclude) | set(float_op_nodes))
    skipped = activation_gathers(model)  # not the search's to float: never quantized at all
    wide = sorted(set(wide) - set(excluded))
    overrides = sixteen_bit_overrides(model, wide, scheme)
    notes = []
    per_channel = scheme.per_channel
    if per_channel and default_opset(model) < PER_CHANNEL_OPSET:
        per_channel = False
        notes.append(f"opset {default_opset(model)} < {PER_CHANNEL_OPSET}: per-channel quantization is impossible "
                     "(ONNX Runtime refuses to load the result); used per-tensor")
    try:
        _quantize_static(prepared.path, out, scheme, choice, cache, per_channel, excluded + skipped, external_data,
                         overrides)
        _loads(out)
    except QuantizationError:
        raise
    except Exception as e:
        if not per_channel:
            raise QuantizationError(f"ONNX Runtime quantization failed: {_first_line(e)}") from e
        notes.append(f"per-channel result unusable ({_first_line(e)}); fell back to per-tensor")
        per_channel = False
        try:
            _quantize_static(prepared.path, out, scheme, choice, cache, False, excluded + skipped, external_data,
                             overrides)
            _loads(out)
        except Exception as e2:
            raise QuantizationError(f"ONNX Runtime quantization failed: {_first_line(e2)}") from e2
    if wide:
        notes.append(f"{len(wide)} node(s) with 16-bit activations: the artifact's opset is 21 (ONNX Runtime ≥ "
                     f"{SIXTEEN_BIT_MIN_ORT})")
    return Quantized(out, per_channel, excluded, notes, choice, wide)


def _quantize_static(src: Path, out: Path, scheme: QuantizationScheme, choice: Choice, cache: Path,
                     per_channel: bool, excluded: list[str], external_data: bool,
                     overrides: dict[str, list[dict[str, object]]]) -> None:
    extra: dict[str, object] = {
        "ActivationSymmetric": scheme.activation_symmetric,
        "WeightSymmetric": scheme.weight_symmetric,
    }
    if overrides:
        # 16-bit Q/DQ: ONNX's QuantizeLinear takes 16-bit types from opset 21; the quantizer raises the model's
        # opset to 21 itself (ONNX Runtime runs opset 21 from 1.18: ``SIXTEEN_BIT_MIN_ORT``).
        extra["TensorQuantOverrides"] = overrides
    # Progress printed by the quantizer must not reach stdout, which stays clean for --json; its warning that it
    # raised the opset for 16-bit Q/DQ (intended, see above) must not reach the user's terminal.
    with contextlib.redirect_stdout(io.StringIO()), _muted(logging.getLogger(), "does not support 16-bit"):
        quantize_static(
            str(src), str(out), None,
            quant_format=QuantFormat.QDQ if scheme.format is ProfileQuantFormat.QDQ else QuantFormat.QOperator,
            op_types_to_quantize=list(WEIGHTED_OPS) if choice.ops == "weighted" else None,
            per_channel=per_channel,
            activation_type=_DTYPE[scheme.activation_type],
            weight_type=_DTYPE[scheme.weight_type],
            nodes_to_exclude=excluded,
            calibrate_method=_CALIBRATION[choice.method],
            calibration_cache_path=str(cache),
            use_external_data_format=external_data,
            extra_options=extra,
        )


# 16-bit activations: ONNX Runtime's CPU kernels run 16-bit Q/DQ (opset 21) from 1.18 on; the node itself then
# computes in float between a DequantizeLinear and a QuantizeLinear, its weights stay INT8. For a sensitive tensor
# this is most of float's accuracy at none of its bytes.
SIXTEEN_BIT_MIN_ORT = "1.18"
_WIDE = {QuantDtype.UINT8: QuantType.QUInt16, QuantDtype.INT8: QuantType.QInt16}


def sixteen_bit_supported(runtime: str, runtime_versions: str, providers: Iterable[str]) -> bool:
    """Whether a target's runtime runs 16-bit activations: ONNX Runtime's CPU execution provider, with every version
    the profile admits at or above ``SIXTEEN_BIT_MIN_ORT`` (TensorRT and the other EPs need 8-bit)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if runtime != "onnxruntime" or set(providers) - {"CPUExecutionProvider"}:
        return False
    floor = Version(SIXTEEN_BIT_MIN_ORT)
    return any(s.operator in (">=", ">", "==", "~=") and Version(s.version.rstrip(".*")) >= floor
               for s in SpecifierSet(runtime_versions))


def sixteen_bit_overrides(model: onnx.ModelProto, nodes: Iterable[str],
                          scheme: QuantizationScheme) -> dict[str, list[dict[str, object]]]:
    """ONNX Runtime's per-tensor overrides that give ``nodes`` 16-bit activations: their activation inputs and their
    outputs (a tensor shared with an INT8 node becomes 16-bit for both: one Q/DQ pair per tensor)."""
    wanted = set(nodes)
    if not wanted:
        return {}
    weights = {i.name for i in model.graph.initializer}
    kind = {"quant_type": _WIDE[scheme.activation_type]}
    tensors: list[str] = []
    for node in model.graph.node:
        if node.name in wanted:
            tensors += [t for t in node.input if t and t not in weights]
            tensors += [t for t in node.output if t]
    return {t: [dict(kind)] for t in dict.fromkeys(tensors)}


@contextlib.contextmanager
def _muted(logger: logging.Logger, text: str):
    """Drop a logger's records that contain ``text`` while the block runs."""
    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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


RECURRENT_OPS = {"LSTM", "GRU", "RNN", "Loop", "Scan"}


def output_hints(path: Path) -> dict[str, dict[str, object]]:
    """What the graph says about each output: the op computing it (after reshapes), whether a recurrent layer feeds
    it, and whether its name says logits/scores. Task inference (``converters.tasks``) weighs these beside the
    values the output really takes."""
    model = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    hints: dict[str, dict[str, object]] = {}
    for out in model.graph.output:
        node = producers.get(out.name)
        while node is not None and node.op_type in PASSTHROUGH_OPS:
            node = producers.get(node.input[0])
        producer = node.op_type if node is not None else None
        if node is not None and node.op_type == "Add":  # a bias after a MatMul is still the MatMul's output
            inner = [producers.get(i) for i in node.input]
            if any(p is not None and p.op_type in ("MatMul", "Gemm") for p in inner):
                producer = "MatMul"
        hints[out.name] = {"producer": producer, "recurrent_upstream": _upstream(producers, out.name, RECURRENT_OPS),
                           "name_hint": CLASS_NAME_HINT.search(out.name) is not None}
    return hints


def _upstream(producers: dict[str, onnx.NodeProto], tensor: str, ops: set[str]) -> bool:
    seen: set[int] = set()
    frontier = [tensor]
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or id(node) in seen:
            continue
        if node.op_type in ops:
            return True
        seen.add(id(node))
        frontier.extend(i for i in node.input if i)
    return False


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
