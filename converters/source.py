"""Load and validate a source model, and bring it into the form the quantizers need.

Accepts an ONNX file (with or without external data) or a PyTorch ``ExportedProgram`` (``.pt2``), which is
exported to ONNX first. The result is a working copy in the caller's work directory plus what we learned about
it; the user's file is never modified.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, shape_inference, version_converter

from converters.errors import InvalidModelError, UnsupportedOpError

log = logging.getLogger(__name__)

# Per-channel DequantizeLinear (an `axis` attribute) exists from opset 13; we upgrade older models to this.
PER_CHANNEL_OPSET = 13
# Above this many bytes of weights a model is written with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # an int is fixed; a str or None is dynamic

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def describe(self) -> str:
        dims = ",".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.name}[{dims}] {self.dtype}"


@dataclass
class SourceModel:
    path: Path  # the working copy (float ONNX) in the work directory
    original: Path
    sha256: str
    size_bytes: int  # the source's bytes on disk, external data included
    opset: int
    original_opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: bool
    notes: list[str] = field(default_factory=list)

    def input(self, name: str) -> TensorSpec:
        return next(i for i in self.inputs if i.name == name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_files(path: Path) -> list[Path]:
    """The model file and every external data file it references, in a stable order.

    Read from the file itself: once ``onnx.load`` has pulled external data in, the tensors forget where it came from.
    """
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for init in _all_initializers(model.graph):
        if init.data_location == TensorProto.EXTERNAL:
            locations.update(e.value for e in init.external_data if e.key == "location")
    return [path, *sorted(path.parent / loc for loc in locations)]


def files_sha256(paths: list[Path]) -> str:
    if len(paths) == 1:
        return sha256_file(paths[0])
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return digest.hexdigest()


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else np.dtype("float32")
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(value.name, dtype, tuple(dims))


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Real inputs: old exporters list initializers among the inputs too."""
    initializers = {i.name for i in model.graph.initializer}
    return [_tensor_spec(v) for v in model.graph.input if v.name not in initializers]


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_source(path: Path, workdir: Path, *, input_shapes: dict[str, tuple[int, ...]] | None = None) -> SourceModel:
    """Validate ``path`` and write a normalized float working copy into ``workdir``."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, not a model file")
    workdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if path.suffix == ".pt2":
        onnx_path = export_pt2(path, workdir / "exported.onnx")
        notes.append(f"exported PyTorch ExportedProgram {path.name} to ONNX (dynamo exporter)")
        original_files = [path]
    else:
        onnx_path = path
        original_files = []
    model = _read_onnx(onnx_path)
    original_files = original_files or model_files(onnx_path)
    size_bytes = sum(p.stat().st_size for p in original_files)
    sha = files_sha256(original_files)
    external = len(model_files(onnx_path)) > 1

    _check_ops(model, onnx_path)
    original_opset = default_opset(model)
    if original_opset < PER_CHANNEL_OPSET:
        try:
            model = version_converter.convert_version(model, PER_CHANNEL_OPSET)
            notes.append(f"upgraded opset {original_opset} → {PER_CHANNEL_OPSET} (per-channel INT8 needs ≥ 13)")
        except Exception as e:  # the converter lacks adapters for some ops; the quantizer then goes per-tensor
            notes.append(f"could not upgrade opset {original_opset} → {PER_CHANNEL_OPSET} ({_first_line(e)}); "
                         "per-channel quantization will fall back to per-tensor")
    if input_shapes:
        model = pin_input_shapes(model, input_shapes)
        notes.append("pinned input shapes: " + ", ".join(
            f"{k}={'x'.join(map(str, v))}" for k, v in input_shapes.items()))
    try:
        model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:
        notes.append(f"ONNX shape inference failed ({_first_line(e)}); continuing without inferred shapes")

    work_path = workdir / "source.onnx"
    save_model(model, work_path)
    _check_with_runtime(work_path)
    return SourceModel(
        path=work_path, original=path, sha256=sha, size_bytes=size_bytes, opset=default_opset(model),
        original_opset=original_opset, inputs=graph_inputs(model),
        outputs=[_tensor_spec(o) for o in model.graph.output], external_data=external, notes=notes)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, with external data past the protobuf limit; a stale data file from an earlier save is replaced."""
    weights = sum(_initializer_nbytes(i) for i in _all_initializers(model.graph))
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if weights > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _initializer_nbytes(init: TensorProto) -> int:
    if init.data_location == TensorProto.EXTERNAL:
        return next((int(e.value) for e in init.external_data if e.key == "length"), 0)
    n = int(np.prod(init.dims)) if init.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def _read_onnx(path: Path) -> onnx.ModelProto:
    head = path.read_bytes()[:64] if path.stat().st_size else b""
    if not head:
        raise InvalidModelError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidModelError(f"{path}: not an ONNX model or truncated ({_first_line(e)})") from e
    except (FileNotFoundError, onnx.checker.ValidationError) as e:
        raise InvalidModelError(f"{path}: external data file missing or unreadable ({_first_line(e)})") from e
    except OSError as e:
        raise InvalidModelError(f"{path}: cannot read model ({_first_line(e)})") from e
    if not model.graph.node or not model.graph.output:
        raise InvalidModelError(f"{path}: not an ONNX model or truncated (no graph nodes or outputs)")
    try:
        # Path-based check works for > 2 GiB models too; the in-memory one for the rest.
        if len(model_files(path)) > 1:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise InvalidModelError(f"{path}: fails the ONNX checker: {_first_line(e)}") from e
    return model


def _check_ops(model: onnx.ModelProto, path: Path) -> None:
    unknown = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in _all_nodes(model.graph)
                      if n.domain not in KNOWN_DOMAINS
                      or (n.domain in ("", "ai.onnx", "ai.onnx.ml") and not onnx.defs.has(n.op_type, n.domain))})
    if unknown:
        raise UnsupportedOpError(f"{path}: unsupported operators (no runtime we target implements them): "
                                 + ", ".join(unknown))


def _check_with_runtime(path: Path) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented classes
        text = _first_line(e)
        if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
            raise UnsupportedOpError(f"{path}: ONNX Runtime cannot run this model: {text}") from e
        raise InvalidModelError(f"{path}: ONNX Runtime cannot load this model: {text}") from e


def pin_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Fix the dims of named inputs (``--input-shape name=1,3,224,224``); ranks must match."""
    inputs = {v.name: v for v in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise InvalidModelError(f"--input-shape: model has no input {name!r} "
                                    f"(inputs: {', '.join(i.name for i in graph_inputs(model))})")
        tdims = inputs[name].type.tensor_type.shape.dim
        if len(tdims) != len(dims):
            raise InvalidModelError(f"--input-shape {name}: rank {len(dims)} given, model input has rank {len(tdims)}")
        for d, value in zip(tdims, dims, strict=True):
            if d.HasField("dim_value") and d.dim_value != value:
                raise InvalidModelError(f"--input-shape {name}: dim {d.dim_value} is fixed in the model, got {value}")
            d.Clear()
            d.dim_value = value
    # Inferred shapes from before the pin may now contradict it; infer them anew.
    del model.graph.value_info[:]
    return model


def export_pt2(path: Path, out: Path) -> Path:
    """Export a saved ``torch.export`` ExportedProgram to a single ONNX file."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the convert extra
        raise InvalidModelError(f"{path}: .pt2 needs PyTorch (pip install 'edgefleet[convert]')") from e
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise InvalidModelError(f"{path}: not a PyTorch ExportedProgram ({_first_line(e)})") from e
    try:
        torch.onnx.export(program, f=str(out), dynamo=True, external_data=False, verbose=False)
    except Exception as e:
        raise UnsupportedOpError(f"{path}: PyTorch could not export this program to ONNX ({_first_line(e)})") from e
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:400]
