"""Load and validate a source model, and bring it into the form the quantizers need.

Accepts an ONNX file (with or without external data) or a PyTorch ``ExportedProgram`` (``.pt2``), which is
exported to ONNX first. The result is a working copy in the caller's work directory plus what we learned about
it; the user's file is never modified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, shape_inference, version_converter

from converters.errors import InvalidModelError, UnsafeModelError, UnsupportedOpError

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
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        elif d.HasField("dim_value"):  # Paddle and others write -1 (or 0) for a dynamic dimension
            dims.append(None)
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
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != value:
                raise InvalidModelError(f"--input-shape {name}: dim {d.dim_value} is fixed in the model, got {value}")
            d.Clear()
            d.dim_value = value
    # Inferred shapes from before the pin may now contradict it; infer them anew.
    del model.graph.value_info[:]
    return model


def export_pt2(path: Path, out: Path) -> Path:
    """Export a saved ``torch.export`` ExportedProgram to a single ONNX file."""
    program = load_exported_program(path)
    import torch

    try:
        torch.onnx.export(program, f=str(out), dynamo=True, external_data=False, verbose=False)
    except Exception as e:
        raise UnsupportedOpError(f"{path}: PyTorch could not export this program to ONNX ({_first_line(e)})") from e
    return out


# torch 2.13's .pt2 archive (torch/export/pt2_archive/_package.py), names relative to the archive's root folder.
# ``torch.export.load`` unpickles, with ``weights_only=False``: weights and constants whose config says
# ``use_pickle``; ``custom_obj_*``/``opaque_obj_*`` constants; the legacy ``data/weights/model.pt`` and
# ``data/constants/model.pt``; the sample inputs whenever the safe unpickler refuses them (the fallback in
# torch/_export/serde/serialize.py ``deserialize_torch_artifact``); and, when loading the archive fails, the
# 2.7-era ``serialized_*.pt`` members. ``data/aotinductor/`` holds shared libraries it loads. So we read only the
# program JSON and raw tensor records, and refuse every archive whose other members torch would deserialize.
PT2_MODEL = "model"  # the one program torch.export.save writes
PT2_PROGRAM = f"models/{PT2_MODEL}.json"
PT2_WEIGHTS_CONFIG = f"data/weights/{PT2_MODEL}_weights_config.json"
PT2_CONSTANTS_CONFIG = f"data/constants/{PT2_MODEL}_constants_config.json"
PT2_SAMPLE_INPUTS = f"data/sample_inputs/{PT2_MODEL}.pt"  # a pickle: present in every archive, never loaded
PT2_BOOKKEEPING = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
PT2_CONFIG_MAX_BYTES = 64 << 20


def check_pt2_archive(names: list[str], weights: dict, constants: dict, where: str) -> None:
    """Refuse an archive torch would unpickle anything from (or load compiled code from). ``names`` are its
    members; ``weights`` and ``constants`` its parsed payload configs. Pure: raises, changes nothing."""
    for kind, config, prefix in (("weights", weights, "weight_"), ("constants", constants, "tensor_")):
        entries = config.get("config")
        if not isinstance(entries, dict):
            raise InvalidModelError(f"{where}: not a PyTorch ExportedProgram ({kind} config malformed)")
        for meta in entries.values():
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                raise InvalidModelError(f"{where}: not a PyTorch ExportedProgram ({kind} config malformed)")
            if meta.get("use_pickle") is not False or not meta["path_name"].startswith(prefix):
                raise UnsafeModelError(f"{where}: its {kind} are stored as pickled Python objects, which would run "
                                       "code when loaded; save the program with plain tensors (torch.export.save)")
            if meta.get("tensor_meta") is None:
                raise InvalidModelError(f"{where}: not a PyTorch ExportedProgram ({kind} config malformed)")
    records = {f"data/weights/{m['path_name']}" for m in weights["config"].values()}
    records |= {f"data/constants/{m['path_name']}" for m in constants["config"].values()}
    known = PT2_BOOKKEEPING | {PT2_PROGRAM, PT2_WEIGHTS_CONFIG, PT2_CONSTANTS_CONFIG, PT2_SAMPLE_INPUTS} | records
    if any(n.startswith("data/aotinductor/") for n in names):
        raise UnsafeModelError(f"{where}: holds compiled native code (AOTInductor), which would run when loaded")
    unexpected = [n for n in names if n not in known and not n.startswith("extra/")]
    if unexpected:
        raise UnsafeModelError(f"{where}: holds {len(unexpected)} member(s) torch.export.save does not write "
                               "(pickles, compiled code or other programs); only plain exported programs are accepted")


def load_exported_program(path: Path):
    """The ExportedProgram in a ``.pt2``, read without unpickling anything. The archive is checked
    (:func:`check_pt2_archive`) twice: as Python's zip reader sees it, cheaply and before torch is even imported,
    then as torch's own reader sees it (two zip parsers can disagree on a crafted archive). Only the program JSON
    and the raw tensor records are then deserialized; the sample inputs are left out (``example_inputs=None``):
    the ONNX export does not need them."""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_members(_zip_members(archive, path), path)
    except (InvalidModelError, MemoryError):
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, NotImplementedError...
        raise _unreadable_pt2(path, e) from e
    try:
        import torch  # noqa: F401 - only after the archive passed: importing torch takes a second or two
    except ImportError as e:  # pragma: no cover - torch is in the convert extra
        raise InvalidModelError(f"{path}: .pt2 needs PyTorch (pip install 'edgefleet[convert]')") from e
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_state_dict

    try:
        with PT2ArchiveReader(str(path)) as reader:
            records = reader.archive_file
            _check_members(_Members(reader.get_file_names(), records.get_record_size, reader.read_bytes), path)
            program = _bytes_to_dataclass(schema.ExportedProgram, reader.read_bytes(PT2_PROGRAM))
            state_dict = _load_state_dict(reader, PT2_MODEL)
            constants = _load_constants(reader, PT2_MODEL)
            return ExportedProgramDeserializer(None).deserialize(program, state_dict, constants, None)
    except (InvalidModelError, MemoryError):
        raise
    except Exception as e:  # torch raises RuntimeError, AssertionError, SerializeError, KeyError...
        raise _unreadable_pt2(path, e) from e


def _unreadable_pt2(path: Path, e: Exception) -> InvalidModelError:
    # Only the error's type: torch's messages quote the archive's own strings (node names, stack traces).
    log.info("%s: cannot read this .pt2: %s", path, _first_line(e))
    return InvalidModelError(f"{path}: not a PyTorch ExportedProgram this PyTorch can read ({type(e).__name__})")


@dataclass(frozen=True)
class _Members:
    """One zip parser's view of a .pt2: member names (relative to the root folder), their sizes and bytes."""

    names: list[str]
    size: Callable[[str], int]
    read: Callable[[str], bytes]


def _zip_members(archive: zipfile.ZipFile, path: Path) -> _Members:
    names = [n for n in archive.namelist() if not n.endswith("/")]
    root = names[0].split("/", 1)[0] if names else ""
    if not names or not all(n.startswith(root + "/") for n in names):
        raise InvalidModelError(f"{path}: not a PyTorch ExportedProgram (no single root folder)")
    relative = [n[len(root) + 1:] for n in names]
    if len(set(relative)) != len(relative):
        raise InvalidModelError(f"{path}: not a PyTorch ExportedProgram (duplicate members)")
    return _Members(relative, lambda n: archive.getinfo(f"{root}/{n}").file_size,
                    lambda n: archive.read(f"{root}/{n}"))


def _check_members(members: _Members, path: Path) -> None:
    weights, constants = (_pt2_config(members, name, path) for name in (PT2_WEIGHTS_CONFIG, PT2_CONSTANTS_CONFIG))
    if PT2_PROGRAM not in members.names:
        raise InvalidModelError(f"{path}: not a PyTorch ExportedProgram (no {PT2_PROGRAM})")
    check_pt2_archive(members.names, weights, constants, where=str(path))


def _pt2_config(members: _Members, name: str, path: Path) -> dict:
    if name not in members.names:
        raise UnsafeModelError(f"{path}: an older .pt2 layout without {name}, whose weights are pickled; "
                               "save it again with torch.export.save")
    if members.size(name) > PT2_CONFIG_MAX_BYTES:
        raise InvalidModelError(f"{path}: not a PyTorch ExportedProgram ({name} is implausibly large)")
    try:
        config = json.loads(members.read(name))
    except ValueError as e:
        raise InvalidModelError(f"{path}: not a PyTorch ExportedProgram ({name} is not JSON)") from e
    if not isinstance(config, dict):
        raise InvalidModelError(f"{path}: not a PyTorch ExportedProgram ({name} is not a JSON object)")
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:400]
