"""SmoothQuant: move activation outliers into the weights that read them, before quantizing.

A transformer's LayerNorm and GELU outputs carry a few channels 10–30× larger than the rest (all-MiniLM-L6-v2: the
same four of 384 channels after every attention block, 18–20× the median; up to 29× after a GELU). One INT8 scale per
tensor then spends most of its 256 steps on those channels, and the others keep a handful of levels. For a MatMul
``X · W`` with constant ``W``, ``(X / s) · (diag(s) W)`` is the same product in float; with
``s_j = max|X_j|^α / max|W_j|^(1-α)`` both factors have flat channel ranges (Xiao et al., 2023, "SmoothQuant").

Here ``X / s`` is an explicit ``Mul`` on the MatMul's side of the tensor: in a post-norm transformer the LayerNorm
output is also the residual, so folding ``1/s`` into the LayerNorm's scale would change the residual path too. The Mul
stays in float (it is not a weight-bearing op); every weight-bearing MatMul/Gemm reading the same tensor shares one
``s``. Channel maxima come from the calibration samples, one sample at a time (only the maxima are kept).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters.calibration import Sample
from converters.errors import QuantizationError
from converters.onnx_int8 import int_attribute
from converters.source import save_model

# Smoothing is worth a candidate only where some tensor's largest channel is this many times its median channel.
OUTLIER_RATIO = 8.0
ALPHA = 0.5  # the paper's balance between activation and weight ranges
# The search tries these: the paper's 0.5 serves asymmetric uint8; symmetric INT8 (TensorRT) wants more of the range
# moved into the weights (all-MiniLM-L6-v2 on jetson-orin-nano, percentile 99.99, embedding cosine against FP32:
# 0.954 unsmoothed, 0.965 at 0.5, 0.982 at 0.75, 0.989 at 0.9).
ALPHAS = (0.5, 0.75, 0.9)
SCALE_LIMITS = (1e-3, 1e3)  # a dead channel (max 0) or a degenerate weight row must not blow up the other side


@dataclass(frozen=True)
class Group:
    """An activation read by weight-bearing nodes as their data input: one smoothing scale for all of them."""

    tensor: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Smoothed:
    path: Path
    groups: int  # activations smoothed
    largest_ratio: float  # the largest channel/median ratio seen, before smoothing

    def summary(self, alpha: float) -> str:
        return (f"SmoothQuant (α={alpha:g}) on {self.groups} MatMul/Gemm input(s): largest channel "
                f"{self.largest_ratio:.0f}× its tensor's median before")


def groups(model: onnx.ModelProto) -> list[Group]:
    """MatMuls with a 2-D constant weight as second input and Gemms with a constant B (transA = 0), by data input."""
    weights = {i.name: i for i in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[0] in weights or node.input[1] not in weights:
            continue
        if len(weights[node.input[1]].dims) != 2:
            continue
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not int_attribute(node, "transA", 0)):
            found.setdefault(node.input[0], []).append(node.name)
    return [Group(t, tuple(nodes)) for t, nodes in found.items()]


def channel_maxima(path: Path, tensors: Iterable[str], samples: list[Sample]) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the samples (one sample in memory at a time)."""
    import onnxruntime as ort

    wanted = list(dict.fromkeys(tensors))
    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in present:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as tmp:
        augmented = Path(tmp) / "maxima.onnx"
        save_model(model, augmented)
        del model
        session = ort.InferenceSession(str(augmented), providers=["CPUExecutionProvider"])
        maxima: dict[str, np.ndarray] = {}
        for sample in samples:
            for name, value in zip(wanted, session.run(wanted, sample), strict=True):
                flat = np.abs(np.asarray(value, dtype=np.float32)).reshape(-1, value.shape[-1]).max(axis=0)
                maxima[name] = flat if name not in maxima else np.maximum(maxima[name], flat)
    return maxima


def outlier_ratio(maxima: np.ndarray) -> float:
    median = float(np.median(maxima))
    return float(maxima.max()) / median if median > 0 else 0.0


def smoothing_scales(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1-α), 1 where either side is zero, clipped to ``SCALE_LIMITS``."""
    a = activation_max.astype(np.float64)
    w = weight_max.astype(np.float64)
    live = (a > 0) & (w > 0)
    scales = np.ones_like(a)
    scales[live] = a[live] ** alpha / w[live] ** (1 - alpha)
    return np.clip(scales, *SCALE_LIMITS).astype(np.float32)


class Smoother:
    """One model's groups and channel maxima, measured once (one pass over the calibration samples); each α then
    writes its own smoothed model."""

    def __init__(self, path: Path, samples: list[Sample]):
        self.path = path
        self._samples = samples
        self._measured: tuple[list[Group], dict[str, np.ndarray], float] | None = None

    def measure(self) -> tuple[list[Group], dict[str, np.ndarray], float]:
        if self._measured is None:
            found = groups(onnx.load(str(self.path), load_external_data=False))
            try:
                maxima = channel_maxima(self.path, [g.tensor for g in found], self._samples) if found else {}
            except Exception as e:  # ONNX Runtime raises anything from InvalidArgument to RuntimeException
                raise QuantizationError(f"SmoothQuant could not measure channel ranges: "
                                        f"{str(e).splitlines()[0][:200]}") from e
            largest = max((outlier_ratio(m) for m in maxima.values()), default=0.0)
            self._measured = (found, maxima, largest)
        return self._measured

    def worthwhile(self) -> bool:
        """Whether some weight-bearing MatMul's input has outlier channels (``OUTLIER_RATIO``)."""
        return self.measure()[2] >= OUTLIER_RATIO

    def write(self, out: Path, alpha: float = ALPHA) -> Smoothed | None:
        """The smoothed model at ``out``; None when nothing is worth smoothing."""
        if not self.worthwhile():
            return None
        found, maxima, largest = self.measure()
        model = onnx.load(str(self.path))
        applied = apply(model, found, maxima, alpha)
        save_model(model, out)
        return Smoothed(out, applied, largest)


def smooth(path: Path, samples: list[Sample], out: Path, *, alpha: float = ALPHA) -> Smoothed | None:
    """Write the smoothed model to ``out``; None when no tensor has outlier channels (nothing to gain)."""
    return Smoother(path, samples).write(out, alpha)


def apply(model: onnx.ModelProto, found: list[Group], maxima: dict[str, np.ndarray], alpha: float) -> int:
    """Insert ``Mul(X, 1/s)`` before each group's nodes and scale their weights' input channels by ``s``; returns how
    many groups were smoothed."""
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    position = {n.name: i for i, n in enumerate(graph.node)}  # the Muls go in at the end, so these stay valid
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | set(nodes)
    inserts: list[tuple[int, onnx.NodeProto]] = []
    for index, group in enumerate(found):
        members = [nodes[n] for n in group.nodes]
        rows = [_input_channels(weights[n.input[1]], n) for n in members]
        if any(r.shape[0] != maxima[group.tensor].shape[0] for r in rows):
            continue  # the weight's input axis is not the activation's last axis (a broadcast MatMul): leave it
        weight_max = np.max(np.stack([np.abs(r).max(axis=1) for r in rows]), axis=0)
        scales = smoothing_scales(maxima[group.tensor], weight_max, alpha)
        inverse = _unique(f"{group.tensor}_smoothquant_inverse", taken)
        smoothed = _unique(f"{group.tensor}_smoothquant", taken)
        graph.initializer.append(numpy_helper.from_array((1.0 / scales).astype(np.float32), inverse))
        mul = helper.make_node("Mul", [group.tensor, inverse], [smoothed], name=_unique(f"SmoothQuant_{index}", taken))
        for node, channels in zip(members, rows, strict=True):
            scaled = channels * scales[:, None]
            weight = weights[node.input[1]]
            if readers[weight.name] > 1:  # shared with another node: that one keeps the original
                name = _unique(f"{weight.name}_smoothquant", taken)
                readers[weight.name] -= 1
                readers[name] = 1
                replacement = numpy_helper.from_array(_from_input_channels(scaled, node), name)
                graph.initializer.append(replacement)
                weights[name] = replacement
                node.input[1] = name
            else:
                weight.CopyFrom(numpy_helper.from_array(_from_input_channels(scaled, node), weight.name))
            node.input[0] = smoothed
        inserts.append((min(position[n] for n in group.nodes), mul))
    for index, mul in sorted(inserts, key=lambda p: p[0], reverse=True):
        graph.node.insert(index, mul)
    return len(inserts)


def _input_channels(weight: onnx.TensorProto, node: onnx.NodeProto) -> np.ndarray:
    """The weight as [input channels, outputs]."""
    array = numpy_helper.to_array(weight).astype(np.float32)
    transposed = node.op_type == "Gemm" and int_attribute(node, "transB", 0)
    return array.T if transposed else array


def _from_input_channels(array: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    transposed = node.op_type == "Gemm" and int_attribute(node, "transB", 0)
    return np.ascontiguousarray(array.T if transposed else array)


def _unique(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    taken.add(name)
    return name
