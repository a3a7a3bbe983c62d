"""The float ONNX graph the TFLite route starts from: input dimensions pinned from the data, then shapes folded.

onnx2tf builds Keras layers with static shapes. Exported detectors and recognizers compute their anchors, reshapes
and slices from ``Shape`` of a dynamic input; onnx2tf then fails on that arithmetic (YOLOv8n: ``SlicingOpLambda``;
PP-OCR's recognizer with a dynamic width: "Cannot convert a partially known TensorShape"). Pinning every dynamic
dimension to what the calibration data actually has, *before* symbolic shape inference and constant folding, lets
those passes turn the shape arithmetic into constants; onnx2tf then sees a static graph (measured 2026-12-01 on a
YOLOv8n-class detector and a PP-OCR-class recognizer). The artifact is then only valid for that input shape, and the
report says so.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from converters.calibration import Sample
from converters.errors import QuantizationError
from converters.source import SourceModel, pin_input_shapes, save_model

log = logging.getLogger(__name__)


@dataclass
class TflitePrepared:
    """The graph handed to onnx2tf, what was pinned on the way, and what happened."""

    path: Path
    pinned: dict[str, tuple[int, ...]]  # only inputs that had a dynamic dimension
    notes: list[str] = field(default_factory=list)


def data_shapes(source: SourceModel, samples: list[Sample]) -> dict[str, tuple[int, ...]]:
    """Each input's shape as the data has it; every sample must agree (a TFLite model has one static shape)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in source.inputs:
        seen = {tuple(int(d) for d in s[spec.name].shape) for s in samples}
        if len(seen) > 1:
            listed = ", ".join("x".join(map(str, sh)) for sh in sorted(seen)[:4])
            raise QuantizationError(
                f"TFLite needs one static shape per input, but the data's {spec.name!r} comes in {len(seen)} shapes "
                f"({listed}{', ...' if len(seen) > 4 else ''}); resize or pad the samples to one shape, or pin it "
                "with --input-shape")
        shapes[spec.name] = seen.pop()
    return shapes


def dims_to_pin(source: SourceModel, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The inputs with a dynamic dimension, with the data's shape for them."""
    return {spec.name: shapes[spec.name] for spec in source.inputs if not spec.is_static}


def describe_pins(source: SourceModel, pinned: dict[str, tuple[int, ...]]) -> str:
    parts = []
    for name, dims in pinned.items():
        declared = source.input(name).shape
        moved = [f"{d if d is not None else '?'}={v}" for d, v in zip(declared, dims, strict=True)
                 if not isinstance(d, int)]
        parts.append(f"{name}[{','.join(map(str, dims))}] ({', '.join(moved)})")
    return ("TFLite model built for fixed input shapes taken from the calibration data: " + "; ".join(parts) +
            " — the .tflite accepts only these shapes")


def prepare(source: SourceModel, samples: list[Sample], workdir: Path) -> TflitePrepared:
    """Pin ``source``'s dynamic inputs to the data's shapes, then fold the graph (shape inference + ORT's basic
    optimizations: constant folding, redundant node removal), into ``workdir/tflite-prepared.onnx``."""
    workdir.mkdir(parents=True, exist_ok=True)
    pinned = dims_to_pin(source, data_shapes(source, samples))
    notes = [describe_pins(source, pinned)] if pinned else []
    pinned_path = workdir / "tflite-pinned.onnx"
    model = onnx.load(str(source.path))
    save_model(pin_input_shapes(model, pinned) if pinned else model, pinned_path)
    out = workdir / "tflite-prepared.onnx"
    notes += fold(pinned_path, out, workdir, external_data=source.external_data)
    renamed = sanitize_node_names(out)
    if renamed:
        log.info("renamed %d nodes whose names TensorFlow rejects as scope names", renamed)
    return TflitePrepared(out, pinned, notes)


# TensorFlow's scope-name rule: onnx2tf names some Keras layers (Softmax, ...) after the ONNX node, and a name
# outside it fails the conversion. PP-OCR's classifier comes out of the graph optimizer with nodes named
# ``Softmax@0``: onnx2tf failed with '"Softmax@0" is not a valid scope name' under every option set (2026-12-01).
INVALID_SCOPE_CHARS = re.compile(r"[^A-Za-z0-9_.\\/>-]")


def scope_safe_names(names: list[str]) -> list[str]:
    """``names`` with characters TensorFlow rejects in scope names replaced, kept unique."""
    taken: set[str] = set(names)
    safe = []
    for name in names:
        fixed = INVALID_SCOPE_CHARS.sub("_", name)
        if fixed != name:
            base, i = fixed, 1
            while fixed in taken:
                fixed, i = f"{base}_{i}", i + 1
            taken.add(fixed)
        safe.append(fixed)
    return safe


def sanitize_node_names(path: Path) -> int:
    """Rename ``path``'s nodes (not its tensors: inputs and outputs keep their names) to scope-safe names, in place;
    how many changed."""
    model = onnx.load(str(path))
    nodes = model.graph.node
    safe = scope_safe_names([n.name for n in nodes])
    changed = sum(n.name != s for n, s in zip(nodes, safe, strict=True))
    if changed:
        for node, name in zip(nodes, safe, strict=True):
            node.name = name
        save_model(model, path)
    return changed


def fold(src: Path, out: Path, workdir: Path, *, external_data: bool) -> list[str]:
    """ONNX Runtime's quantization pre-processing (symbolic shape inference, then the BASIC-level graph optimizer
    saved to file, then ONNX shape inference), retried without the symbolic pass when that fails on a model."""
    from onnxruntime.quantization import quant_pre_process

    error = ""
    for skip_symbolic in (False, True):
        try:
            with contextlib.chdir(workdir):  # a failed symbolic pass leaves sym_shape_infer_temp.onnx behind
                quant_pre_process(str(src.resolve()), str(out.resolve()), skip_symbolic_shape=skip_symbolic,
                                  save_as_external_data=external_data, all_tensors_to_one_file=True)
            if skip_symbolic:
                return [f"symbolic shape inference failed before TFLite conversion ({error}); folded with ONNX shape "
                        "inference only"]
            return []
        except Exception as e:  # the pre-processor raises anything from AssertionError to ORT's Fail
            error = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.info("folding for TFLite failed (skip_symbolic=%s): %s", skip_symbolic, error)
    save_model(onnx.load(str(src)), out)
    return [f"graph folding failed before TFLite conversion ({error}); onnx2tf got the pinned graph unfolded"]
