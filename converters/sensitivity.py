"""Which quantized tensors hurt fidelity most — measured on the quantized model, not guessed.

Each activation is recorded just before its QuantizeLinear and just after its DequantizeLinear (weights through
ONNX Runtime's ``qdq_loss_debug.create_weight_matching``). The local damage of quantizing a tensor is the noise
between the two. Whole-tensor SQNR hides the failures we care about (one outlier channel or one large-range slice
dominates the signal and the rest rounds to zero), so damage is scored per slice — per channel and per feature — and
a tensor is ranked by its median slice SQNR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.quantization.qdq_loss_debug import create_weight_matching

from converters.calibration import Sample
from converters.fidelity import sqnr_db


@dataclass(frozen=True)
class TensorDamage:
    tensor: str
    kind: str  # "activation" or "weight"
    median_slice_sqnr_db: float
    whole_sqnr_db: float


def slice_sqnr(pre: np.ndarray, post: np.ndarray) -> float:
    """Median SQNR over the slices of axis 1 and of the last axis, whichever is worse; slices with no signal are
    skipped."""
    if pre.ndim < 2:
        return sqnr_db(pre, post)
    worst = 120.0
    for axis in {1, pre.ndim - 1}:
        a = np.moveaxis(pre, axis, 0).reshape(pre.shape[axis], -1).astype(np.float64)
        b = np.moveaxis(post, axis, 0).reshape(pre.shape[axis], -1).astype(np.float64)
        signal = (a**2).sum(axis=1)
        noise = ((a - b) ** 2).sum(axis=1)
        live = signal > 0
        if not live.any():
            continue
        with np.errstate(divide="ignore"):
            per = 10 * np.log10(signal[live] / np.maximum(noise[live], 1e-30))
        worst = min(worst, float(np.median(np.minimum(per, 120.0))))
    return worst


def qdq_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """Float activation → the tensor it becomes after QuantizeLinear → DequantizeLinear."""
    initializers = {i.name for i in model.graph.initializer}
    dq_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.input[0]: dq_of[n.output[0]] for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in initializers and n.output[0] in dq_of}


def _activation_pairs(qdq_model: Path, samples: list[Sample]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each quantized activation before and after its QDQ, shapes kept.

    ONNX Runtime's qdq_loss_debug reshapes every saved tensor to 1-D inside the graph, which would reduce
    per-slice scoring to whole-tensor SQNR; so the tensors are exposed as graph outputs here instead.
    """
    model = onnx.load(str(qdq_model))
    pairs = qdq_pairs(model)
    existing = {o.name for o in model.graph.output}
    for name in {t for pair in pairs.items() for t in pair} - existing:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every QDQ pair visible
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = sorted({t for pair in pairs.items() for t in pair})
    runs = [dict(zip(wanted, sess.run(wanted, sample), strict=True)) for sample in samples]
    return {pre: (np.concatenate([r[pre] for r in runs]), np.concatenate([r[post] for r in runs]))
            for pre, post in pairs.items()}


def rank_tensors(float_model: Path, qdq_model: Path, samples: list[Sample]) -> list[TensorDamage]:
    """Every quantized activation and weight, most damaged first."""
    ranked: list[TensorDamage] = []
    for name, (a, b) in _activation_pairs(qdq_model, samples).items():
        if a.shape == b.shape and np.issubdtype(a.dtype, np.floating) and a.size:
            ranked.append(TensorDamage(name, "activation", slice_sqnr(a, b), sqnr_db(a, b)))
    # compute_weight_error in ONNX Runtime 1.32 fails on scalar weights; score them the same way as activations.
    for name, pair in create_weight_matching(str(float_model), str(qdq_model)).items():
        w, dq = np.asarray(pair["float"]), np.asarray(pair["dequantized"])
        if w.shape == dq.shape and w.size:
            ranked.append(TensorDamage(name, "weight", slice_sqnr(w, dq), sqnr_db(w, dq)))
    ranked.sort(key=lambda d: d.median_slice_sqnr_db)
    return ranked
