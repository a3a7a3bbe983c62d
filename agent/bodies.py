"""Request bodies of the local inference API, decoded within bounds before anything is allocated: JSON tensors,
``.npy`` and ``.npz`` (numeric dtypes only, element counts × item sizes checked against the request limit, zip members
checked from their headers before decompressing). A 80-byte body once asked for an ``S200000000`` array (+760 MB)."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

NPY, NPZ, JSON = "application/x-npy", "application/x-npz", "application/json"
PYTHON_BYTES_PER_NUMBER = 32  # what json.loads spends on a float (object and list slot): 4M took a 15 MB body +183 MB
ACCEPTED_DTYPES = frozenset({"bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                             "uint16", "uint32", "uint64"})  # what model inputs are (runtimes.ORT_DTYPES, TFLite)
MAX_ARRAYS = 256  # tensors in one request
MAX_NPY_HEADER = 10_000  # bytes; numpy's own bound on the header it will parse
MAX_ZIP_DIRECTORY = MAX_ARRAYS * 512  # bytes of zip central directory (zipfile builds an object per entry)
MAX_DIMS = 32  # numpy's own limit


class BodyError(ValueError):
    """A request body that cannot be decoded. Messages say what is wrong, never quote the body."""


class BodyTooLargeError(BodyError):
    """The arrays a body declares would exceed the request limit."""


class DtypeError(BodyError):
    """A JSON tensor asks for a dtype that is not one of ``ACCEPTED_DTYPES``."""


def _too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"the arrays exceed the request limit of {limit} bytes")


def json_feeds(body: bytes, limit: int) -> dict[str, np.ndarray]:
    """``{"inputs": {name: {"data": [...], "shape": [...], "dtype": "float32"} | [...]}}``."""
    # json.loads makes a Python object per number (8x a short number's text): bound them by the request limit
    # first. Inside a nested list of N numbers there are exactly N - 1 commas, so commas bound numbers from above.
    most = limit // PYTHON_BYTES_PER_NUMBER
    if body.count(b",") > most + 4 * MAX_ARRAYS:
        raise BodyTooLargeError(f"a JSON body carries at most {most} numbers; use {NPY} or {NPZ}")
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as e:
        raise BodyError(f"{e.msg} at line {e.lineno} column {e.colno}") from e
    except (ValueError, RecursionError) as e:
        raise BodyError("the body is not JSON this API can read") from e
    spec = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(spec, dict) or not spec or len(spec) > MAX_ARRAYS:
        raise BodyError(f"'inputs' must be an object of 1 to {MAX_ARRAYS} name → tensor")
    feeds, total = {}, 0
    for index, (name, tensor) in enumerate(spec.items(), 1):
        feeds[name] = arr = _json_tensor(tensor, index)
        total += arr.nbytes
        if total > limit:
            raise _too_large(limit)
    return feeds


def _json_tensor(tensor: object, index: int) -> np.ndarray:
    data, dtype_name, shape = (tensor.get("data"), tensor.get("dtype", "float32"), tensor.get("shape")) \
        if isinstance(tensor, dict) else (tensor, "float32", None)
    dtype = _json_dtype(dtype_name, index)  # before np.asarray: a flexible dtype is where the memory went
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise BodyError(f"input #{index}: data is not a rectangular list of {dtype.name} numbers") from e
    if shape is not None:
        dims = _dims(shape, index)
        if math.prod(dims) != arr.size:
            raise BodyError(f"input #{index}: its shape does not hold its {arr.size} values")
        arr = arr.reshape(dims)
    return arr


def _json_dtype(name: object, index: int) -> np.dtype:
    """A dtype from ``ACCEPTED_DTYPES`` (aliases such as "f4" included). Only a short string is handed to numpy:
    ``np.dtype`` builds a structured type field by field from a long comma-separated one."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) and len(name) <= 16 else None
    except (TypeError, ValueError, SyntaxError):
        dtype = None
    if dtype is None:
        raise BodyError(f"input #{index}: dtype is not a dtype name")
    if not _accepted(dtype):
        raise DtypeError(f"input #{index}: dtype is not accepted; use one of {', '.join(sorted(ACCEPTED_DTYPES))}")
    return dtype


def _accepted(dtype: np.dtype) -> bool:
    return dtype.name in ACCEPTED_DTYPES and dtype.fields is None and dtype.subdtype is None


def _dims(shape: object, index: int) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BodyError(f"input #{index}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    return tuple(shape)


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=][a-z]\d{1,2})', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")
_NPY_DTYPES = {"f4", "f2", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclass(frozen=True)
class NpyLayout:
    """What an .npy header declares: the array's dtype, shape and order, and where its data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize  # Python ints: np.prod wraps around on a hostile shape

    def array(self, data: bytes, offset: int = 0) -> np.ndarray:
        flat = np.frombuffer(data, self.dtype, math.prod(self.shape), offset)
        return flat.reshape(self.shape, order="F" if self.fortran_order else "C")


def npy_layout(read: Callable[[int], bytes]) -> NpyLayout:
    """Read and check an .npy header through ``read`` (at most n bytes a call), before any of its data: a dtype from
    ``ACCEPTED_DTYPES``, a header of at most ``MAX_NPY_HEADER`` bytes."""
    magic = read(8)
    if len(magic) != 8 or magic[:6] != b"\x93NUMPY" or (magic[6], magic[7]) not in _NPY_HEADER_READERS:
        raise BodyError("not an .npy array (format 1.0 or 2.0)")
    width = 2 if magic[6] == 1 else 4
    length = read(width)
    size = int.from_bytes(length, "little") if len(length) == width else 0
    if not 0 < size <= MAX_NPY_HEADER:
        raise BodyError("the .npy header is missing or too long")
    header = read(size)
    if len(header) != size:
        raise BodyError("the .npy header is cut short")
    m = _NPY_HEADER.match(header.rstrip(b" \n"))
    if m and m.group(1).decode()[1:] in _NPY_DTYPES:  # the layout every client writes: no ast.literal_eval
        dtype, fortran = np.dtype(m.group(1).decode()), False
        shape: tuple[int, ...] = tuple(int(d) for d in m.group(2).split(b",") if d.strip())
    else:
        try:
            shape, fortran, dtype = _NPY_HEADER_READERS[magic[6], magic[7]](
                io.BytesIO(length + header), max_header_size=MAX_NPY_HEADER)
        except (ValueError, TypeError, SyntaxError) as e:
            raise BodyError("the .npy header cannot be parsed") from e
    if not _accepted(dtype):
        raise BodyError(f"dtype is not accepted; use one of {', '.join(sorted(ACCEPTED_DTYPES))}")
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise BodyError("the .npy shape is not valid")
    return NpyLayout(dtype, shape, bool(fortran), 8 + width + size)


def read_npy(body: bytes, limit: int) -> np.ndarray:
    """An .npy body, without a copy of its data."""
    layout = npy_layout(io.BytesIO(body).read)
    if layout.nbytes > limit:
        raise _too_large(limit)
    if len(body) - layout.offset != layout.nbytes:
        raise BodyError("the data does not match the header's shape and dtype")
    return layout.array(body, layout.offset)


def read_npz(body: bytes, limit: int) -> dict[str, np.ndarray]:
    """An .npz body (one .npy per input, stored or deflated). The zip directory's sizes and then each member's .npy
    header are checked against ``limit`` before that member is inflated; each read is bounded by what was checked."""
    _check_zip_directory(body)
    arrays: dict[str, np.ndarray] = {}
    left = limit
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        members = archive.infolist()
        if len(members) > MAX_ARRAYS:
            raise BodyError(f"more than {MAX_ARRAYS} arrays")
        if sum(m.file_size for m in members) > limit + len(members) * (12 + MAX_NPY_HEADER):
            raise _too_large(limit)
        for member in members:
            name = _member_name(member, arrays)
            with archive.open(member) as f:
                layout = npy_layout(f.read)
                left -= layout.nbytes
                if left < 0:
                    raise _too_large(limit)
                if member.file_size != layout.offset + layout.nbytes:
                    raise BodyError("an array's size does not match its header")
                data = f.read(layout.nbytes)  # inflates no more than was declared (zipfile stops at file_size)
                if len(data) != layout.nbytes:
                    raise BodyError("an array is cut short")
                arrays[name] = layout.array(data)
    return arrays


def _member_name(member: zipfile.ZipInfo, seen: dict[str, np.ndarray]) -> str:
    # bzip2 and lzma members are inflated a whole compressed block at a time (zipfile bounds only deflate's output)
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or member.flag_bits & 0x1:
        raise BodyError("arrays must be stored or deflated, unencrypted (as numpy.savez writes them)")
    if not member.filename.endswith(".npy"):
        raise BodyError("every member must be an .npy array")
    name = member.filename[:-4]
    if name in seen:
        raise BodyError("two arrays have the same name")
    return name


def _check_zip_directory(body: bytes) -> None:
    """Bound the zip's central directory before ``zipfile`` parses it into an object per entry. The end record is
    found as zipfile finds it: the last 22 bytes, else the last signature within a maximal comment's reach."""
    end = len(body) - 22
    if end < 0 or body[end:end + 4] != b"PK\x05\x06":
        end = body.rfind(b"PK\x05\x06", max(0, len(body) - 22 - 0xFFFF))
    if end < 0 or len(body) < end + 22:
        raise BodyError("not a zip archive")
    entries, directory_size = struct.unpack_from("<HI", body, end + 10)
    if end >= 20 and body[end - 20:end - 16] == b"PK\x06\x07":
        raise BodyError("zip64 archives are not accepted")
    if entries > MAX_ARRAYS or directory_size > MAX_ZIP_DIRECTORY:
        raise BodyError(f"more than {MAX_ARRAYS} arrays")


def write_npy(a: np.ndarray) -> bytes:
    """``np.save``'s format 1.0 bytes, without its per-call overhead."""
    a = a if a.flags.c_contiguous else a.copy(order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
    header = f"{{'descr': '{a.dtype.str}', 'fortran_order': False, 'shape': {a.shape!r}, }}"
    pad = 63 - (10 + len(header)) % 64
    return b"\x93NUMPY\x01\x00" + (len(header) + pad + 1).to_bytes(2, "little") + header.encode() + \
        b" " * pad + b"\n" + a.tobytes()
