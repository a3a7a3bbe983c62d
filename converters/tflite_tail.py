"""Which ops of a TFLite graph must stay float so that an output's parts keep their own scales.

A YOLO-style head ends in a CONCATENATION of box coordinates (0..320 px) and class scores (0..1). Full-integer
TFLite gives that tensor one int8 scale, about 1.3 px per step: every score becomes 0 (measured on a YOLOv8n
detector, 2026-12-01). The fix is to keep the head's decode — the ops between the last weight-bearing op and the
output — in float, with TF's MLIR quantizer deny-list of nodes (op output tensor names), and to leave that output
float32. This module finds those ops from the *calibrated* model's recorded ranges; it is pure (plain values in,
names out); ``ops_from_flatbuffer`` reads a calibrated .tflite into those values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# Concatenated parts whose calibrated magnitudes differ by this much cannot share one int8 scale: the smaller one
# keeps fewer than 128/30 ≈ 4 levels. Same threshold as the fidelity report's mixed-range outputs.
MIXED_SCALE_RATIO = 30.0
# Ops with learned weights: the decode tail starts after the last of them on each path (they stay INT8).
WEIGHTED_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D", "BATCH_MATMUL",
                "UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM", "UNIDIRECTIONAL_SEQUENCE_RNN"}


@dataclass(frozen=True)
class Op:
    kind: str  # builtin name, e.g. "CONCATENATION"
    inputs: tuple[int, ...]  # tensor indices (-1: optional input absent)
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Graph:
    ops: list[Op]
    tensor_names: list[str]
    magnitudes: dict[int, float]  # tensor index → calibrated max |value| (where recorded)
    outputs: list[int]
    signature_outputs: dict[int, str] = field(default_factory=dict)  # tensor index → signature key ("output_0")
    constants: dict[int, int] = field(default_factory=dict)  # tensor index → element count, for weight tensors


@dataclass(frozen=True)
class FloatTail:
    output: str  # the graph output whose decode stays float
    nodes: list[str]  # op output tensor names, for the MLIR quantizer's denylisted_nodes
    kinds: list[str]  # their op kinds, for the report
    ratio: float  # the largest/smallest magnitude among the concatenated parts that decided it
    tensor: int = -1  # the output's tensor index


def _producers(graph: Graph) -> dict[int, Op]:
    return {t: op for op in graph.ops for t in op.outputs}


def tail_ops(graph: Graph, output: int) -> list[Op]:
    """The ops on every path from ``output`` back to (not including) the nearest weight-bearing op."""
    producers = _producers(graph)
    seen: list[Op] = []
    stack = [output]
    visited: set[int] = set()
    while stack:
        tensor = stack.pop()
        if tensor in visited or tensor not in producers:
            continue
        visited.add(tensor)
        op = producers[tensor]
        if op.kind in WEIGHTED_OPS or op in seen:
            continue
        seen.append(op)
        stack.extend(t for t in op.inputs if t >= 0)
    return seen


def mixed_scale_ratio(graph: Graph, ops: list[Op]) -> float:
    """The worst ratio of calibrated magnitudes among the parts joined by a CONCATENATION in ``ops`` (1.0: none)."""
    worst = 1.0
    for op in ops:
        if op.kind != "CONCATENATION":
            continue
        parts = [graph.magnitudes[t] for t in op.inputs if t >= 0 and t in graph.magnitudes]
        parts = [p for p in parts if p > 0]
        if len(parts) >= 2:
            worst = max(worst, max(parts) / min(parts))
    return worst


def float_tails(graph: Graph, *, ratio: float = MIXED_SCALE_RATIO) -> list[FloatTail]:
    """Per output whose tail concatenates parts of very different ranges: the tail's ops, to keep in float."""
    tails = []
    for output in graph.outputs:
        ops = tail_ops(graph, output)
        worst = mixed_scale_ratio(graph, ops)
        if worst < ratio:
            continue
        tails.append(FloatTail(graph.tensor_names[output], [graph.tensor_names[op.outputs[0]] for op in ops],
                               sorted({op.kind for op in ops}), worst, output))
    return tails


def onnx_output_name(graph: Graph, tensor: int, onnx_outputs: list[str]) -> str:
    """The ONNX name of output ``tensor``: the user knows ``output0``, not TFLite's ``PartitionedCall:0``.

    onnx2tf's signature keeps ONNX names or keys outputs ``output_0``, ``output_1``... in ONNX order."""
    key = graph.signature_outputs.get(tensor, "")
    if key in onnx_outputs:
        return key
    numbered = re.fullmatch(r"output_(\d+)", key)
    if numbered and int(numbered.group(1)) < len(onnx_outputs):
        return onnx_outputs[int(numbered.group(1))]
    if len(onnx_outputs) == 1 and graph.outputs == [tensor]:
        return onnx_outputs[0]
    return graph.tensor_names[tensor]


def ops_from_flatbuffer(tflite: bytes) -> Graph:
    """A calibrated .tflite (``_experimental_calibrate_only``: float ops, min/max recorded per tensor) as a Graph."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    sub = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    ops = [Op(names.get(codes[o.opcodeIndex], "CUSTOM"), tuple(int(i) for i in o.inputs),
              tuple(int(i) for i in o.outputs)) for o in sub.operators]
    magnitudes = {}
    for i, t in enumerate(sub.tensors):
        q = t.quantization
        if q is not None and q.min is not None and q.max is not None and len(q.min) == 1:
            magnitudes[i] = float(max(abs(q.min[0]), abs(q.max[0])))
    signature = {int(o.tensorIndex): o.name.decode() for sig in model.signatureDefs or [] if sig.subgraphIndex == 0
                 for o in sig.outputs}
    constants = {i: int(np.prod(t.shape)) if t.shape is not None else 1 for i, t in enumerate(sub.tensors)
                 if t.buffer and model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data)}
    return Graph(ops, [t.name.decode() for t in sub.tensors], magnitudes, [int(i) for i in sub.outputs], signature,
                 constants)


# Outlier layers: a weight-bearing op whose calibrated output range is this many times the median of all
# weight-bearing ops' ranges gives most of its values a handful of int8 steps (all-MiniLM-L6-v2: the FFN output
# projections reach ±223 and the attention-score BATCH_MATMULs ±542 where the median is ±8; measured 2026-12-01).
OUTLIER_RATIOS = (4.0, 2.0)  # the variants' thresholds, fewest float layers first
# Float weights cost 4 bytes instead of 1: at most a third of the weight elements keeps the model ≤ 0.5x FP32.
MAX_FLOAT_WEIGHT_FRACTION = 0.3


def outlier_layers(graph: Graph, ratio: float, *, max_weight_fraction: float = MAX_FLOAT_WEIGHT_FRACTION) -> list[Op]:
    """Weight-bearing ops whose calibrated output magnitude is ≥ ``ratio`` × the median one, widest first, while
    their weights (constant inputs) stay within ``max_weight_fraction`` of the model's weight elements."""
    weighted = [op for op in graph.ops if op.kind in WEIGHTED_OPS and op.outputs[0] in graph.magnitudes]
    if not weighted:
        return []
    median = float(np.median([graph.magnitudes[op.outputs[0]] for op in weighted]))
    wide = sorted((op for op in weighted if graph.magnitudes[op.outputs[0]] >= ratio * median),
                  key=lambda op: -graph.magnitudes[op.outputs[0]])
    budget = max_weight_fraction * sum(graph.constants.values())
    chosen, used = [], 0
    for op in wide:
        weights = sum(graph.constants.get(t, 0) for t in op.inputs if t >= 0)
        if used + weights > budget:
            continue
        chosen.append(op)
        used += weights
    return chosen


# A calibrated magnitude beyond this is no activation range but ±FLT_MAX showing through: a padding constant (handled
# by the worker's PADV2 clamp), or a BERT-style attention mask, ``(1 - mask) * finfo(float32).min`` added to the
# attention scores.
UNBOUNDED_MAGNITUDE = 1e30
# The padding ops whose ±FLT_MAX constant the worker clamps to the input's range: they quantize fine.
CLAMPED_PADDING_OPS = {"PADV2"}


def unbounded_range_ops(graph: Graph) -> list[Op]:
    """Ops that read or write a tensor whose calibrated range is ±FLT_MAX, in graph order.

    With that range one int8 step is worth 1e36: every value quantizes to zero, and LiteRT's INT8 SUB/ADD compute
    a zero rescale multiplier and abort the whole process in Prepare (``QuantizeMultiplierSmallerThanOneExp``;
    all-MiniLM-L6-v2's mask arithmetic, measured 2026-12-01). They have to stay float."""
    unbounded = {t for t, m in graph.magnitudes.items() if m > UNBOUNDED_MAGNITUDE}
    return [op for op in graph.ops if op.kind not in CLAMPED_PADDING_OPS
            and any(t in unbounded for t in (*op.inputs, *op.outputs))]
