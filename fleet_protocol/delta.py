"""Binary and tensor-aware deltas between two artifacts, with a full (compressed) fallback.

A patch is self-describing: ``EFD1`` + a 4-byte header length + a JSON header (algorithm, base and target sha256,
target length) + the payload. :func:`apply` checks the base's hash before anything else and the result's hash last,
so a wrong base is a clear error and never a wrong model.

Algorithms:
- ``bsdiff4``: the classic; small patches, but slow and memory-hungry on large files (FACTS: 30–191 s on 50 MB), so
  it is only tried below ``EncodeOptions.bsdiff_max_bytes``.
- ``zstd-patch``: zstd with the base as a raw-content dictionary and long-distance matching ("patch-from").
- ``onnx-tensors``: ONNX-aware: unchanged initializers are copied from the base by offset, changed ones and the
  graph bytes ship zstd-compressed. Needs no ``onnx`` package: it walks the protobuf wire format.
- ``full``: the target itself, zstd-compressed: the fallback when no delta is smaller.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass, field

import bsdiff4
import numpy as np
import zstandard as zstd

from fleet_protocol.errors import DeltaError

MAGIC = b"EFD1"
ALGORITHMS = ("bsdiff4", "zstd-patch", "onnx-tensors", "full")
MAX_HEADER = 64 * 1024
MAX_PLAN = 16 * 1024 * 1024


@dataclass(frozen=True)
class EncodeOptions:
    algorithms: tuple[str, ...] = ("bsdiff4", "zstd-patch", "onnx-tensors")
    bsdiff_max_bytes: int = 16 * 1024 * 1024  # above this bsdiff4 takes minutes and ~18x the file in memory
    zstd_level: int = 19
    zstd_fast_level: int = 3  # for targets above zstd_fast_above, to bound encode time
    zstd_fast_above: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class Patch:
    algorithm: str
    base_sha256: str
    target_sha256: str
    target_length: int
    data: bytes  # the whole self-describing patch
    tried: dict[str, int] = field(default_factory=dict)  # candidate sizes, for the report
    encode_seconds: dict[str, float] = field(default_factory=dict)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pack(algorithm: str, base: str, target: str, length: int, payload: bytes) -> bytes:
    header = json.dumps({"alg": algorithm, "base": base, "target": target, "length": length},
                        separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + payload


def read_header(patch: bytes) -> tuple[dict, bytes]:
    if len(patch) < 8 or patch[:4] != MAGIC:
        raise DeltaError("not an edgefleet patch (bad magic)")
    (n,) = struct.unpack(">I", patch[4:8])
    if n > MAX_HEADER or 8 + n > len(patch):
        raise DeltaError("patch header length is out of range (truncated patch?)")
    try:
        header = json.loads(patch[8 : 8 + n])
        alg, length = header["alg"], header["length"]
        if alg not in ALGORITHMS or not isinstance(length, int) or length < 0:
            raise ValueError(f"algorithm {alg!r}, length {length!r}")
        for k in ("base", "target"):
            if not isinstance(header[k], str) or len(header[k]) != 64:
                raise ValueError(f"{k} hash")
    except (ValueError, KeyError, TypeError) as e:
        raise DeltaError(f"patch header is invalid: {e}") from e
    return header, patch[8 + n :]


# ----------------------------------------------------------------------------- zstd


def _window_log(*sizes: int) -> int:
    return max(17, min(31, sum(sizes).bit_length() + 1))


def _zstd_patch(base: bytes, target: bytes, level: int) -> bytes:
    params = zstd.ZstdCompressionParameters.from_level(level, window_log=_window_log(len(base), len(target)),
                                                       enable_ldm=True)
    d = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return zstd.ZstdCompressor(dict_data=d, compression_params=params).compress(target)


def _zstd_unpatch(base: bytes, payload: bytes, length: int) -> bytes:
    d = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return zstd.ZstdDecompressor(dict_data=d, max_window_size=1 << _window_log(len(base), length)).decompress(
        payload, max_output_size=length)


# ----------------------------------------------------------------------------- ONNX wire format


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """(field number, wire type, value start, value end) for each field of the message in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _varint(buf, i)
            yield number, wire, i, j
        elif wire == 1:
            yield number, wire, i, i + 8
            j = i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            j = i + n
            yield number, wire, i, j
        elif wire == 5:
            yield number, wire, i, i + 4
            j = i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if j > end:
            raise ValueError("field runs past its message")
        i = j


def tensor_spans(model: bytes) -> dict[str, tuple[int, int]]:
    """Byte span of each top-level initializer's raw_data in a serialized ModelProto, by tensor name."""
    spans: dict[str, tuple[int, int]] = {}
    for number, wire, s, e in _fields(model, 0, len(model)):
        if number != 7 or wire != 2:  # ModelProto.graph
            continue
        for gnum, gwire, gs, ge in _fields(model, s, e):
            if gnum != 5 or gwire != 2:  # GraphProto.initializer
                continue
            name, raw = None, None
            for tnum, twire, ts, te in _fields(model, gs, ge):
                if tnum == 8 and twire == 2:  # TensorProto.name
                    name = model[ts:te].decode("utf-8", "replace")
                elif tnum == 9 and twire == 2:  # TensorProto.raw_data
                    raw = (ts, te)
            if name is not None and raw is not None and raw[1] > raw[0]:
                spans[name] = raw
    return spans


def _delta_planes(base: bytes, target: bytes) -> bytes:
    """Byte-wise difference, split into 4 byte planes: a fine-tuned float keeps its sign and exponent bytes, so the
    high planes become runs of zeros that compress to almost nothing."""
    d = (np.frombuffer(target, np.uint8) - np.frombuffer(base, np.uint8)).astype(np.uint8)
    return d.reshape(-1, 4).T.tobytes() if len(d) % 4 == 0 else d.tobytes()


def _undelta_planes(base: bytes, planes: bytes) -> bytes:
    d = np.frombuffer(planes, np.uint8)
    if len(d) % 4 == 0:
        d = d.reshape(4, -1).T.reshape(-1)
    return (np.frombuffer(base, np.uint8) + d).astype(np.uint8).tobytes()


# Plan ops: [0, n] n literal bytes; [1, off, n] copy n bytes of the base at off; [2, off, n] n bytes of
# plane-split difference against the base's bytes at off.
_LITERAL, _COPY, _DIFF = 0, 1, 2


def _onnx_patch(base: bytes, target: bytes, level: int) -> bytes:
    base_spans, target_spans = tensor_spans(base), tensor_spans(target)
    if not target_spans:
        raise ValueError("no raw_data initializers in the target")
    ops: list[list[int]] = []
    literals = bytearray()
    pos = 0
    for name, (s, e) in sorted(target_spans.items(), key=lambda kv: kv[1][0]):
        if s > pos:
            ops.append([_LITERAL, s - pos])
            literals += target[pos:s]
        b = base_spans.get(name)
        if b is not None and b[1] - b[0] == e - s:
            if base[b[0] : b[1]] == target[s:e]:
                ops.append([_COPY, b[0], e - s])
            else:
                ops.append([_DIFF, b[0], e - s])
                literals += _delta_planes(base[b[0] : b[1]], target[s:e])
        else:
            ops.append([_LITERAL, e - s])
            literals += target[s:e]
        pos = e
    if pos < len(target):
        ops.append([_LITERAL, len(target) - pos])
        literals += target[pos:]
    plan = zstd.ZstdCompressor(level=19).compress(json.dumps(ops, separators=(",", ":")).encode())
    packed = _zstd_patch(base, bytes(literals), level)
    return struct.pack(">II", len(plan), len(literals)) + plan + packed


def _onnx_unpatch(base: bytes, payload: bytes, length: int) -> bytes:
    n_plan, n_lit = struct.unpack(">II", payload[:8])
    if n_plan > len(payload) or n_lit > length:
        raise ValueError("plan or literal length out of range")
    ops = json.loads(zstd.ZstdDecompressor().decompress(payload[8 : 8 + n_plan], max_output_size=MAX_PLAN))
    literals = _zstd_unpatch(base, payload[8 + n_plan :], n_lit)
    out = bytearray()
    li = 0
    for op in ops:
        if op[0] == _LITERAL:
            out += literals[li : li + op[1]]
            li += op[1]
        else:
            off, n = op[1], op[2]
            if off < 0 or n < 0 or off + n > len(base) or (op[0] == _DIFF and li + n > len(literals)):
                raise ValueError("copy or difference outside its source")
            if op[0] == _COPY:
                out += base[off : off + n]
            else:
                out += _undelta_planes(base[off : off + n], literals[li : li + n])
                li += n
        if len(out) > length:
            raise ValueError("patch produces more bytes than the target length")
    return bytes(out)


# ----------------------------------------------------------------------------- encode / apply


def encode(base: bytes, target: bytes, options: EncodeOptions | None = None) -> Patch:
    """The smallest of the enabled deltas, or the compressed target when no delta is smaller."""
    o = options or EncodeOptions()
    level = o.zstd_level if len(target) <= o.zstd_fast_above else o.zstd_fast_level
    candidates: dict[str, bytes] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            candidates[name] = fn()
        except ValueError:  # e.g. onnx-tensors on something that is not an ONNX file
            return
        finally:
            seconds[name] = time.perf_counter() - t0

    timed("full", lambda: zstd.ZstdCompressor(level=level).compress(target))
    if "zstd-patch" in o.algorithms:
        timed("zstd-patch", lambda: _zstd_patch(base, target, level))
    if "bsdiff4" in o.algorithms and max(len(base), len(target)) <= o.bsdiff_max_bytes:
        timed("bsdiff4", lambda: bsdiff4.diff(base, target))
    if "onnx-tensors" in o.algorithms:
        timed("onnx-tensors", lambda: _onnx_patch(base, target, level))
    best = min(candidates, key=lambda k: (len(candidates[k]), k != "full"))
    b, t = sha256(base), sha256(target)
    return Patch(best, b, t, len(target), _pack(best, b, t, len(target), candidates[best]),
                 tried={k: len(v) for k, v in candidates.items()}, encode_seconds=seconds)


def apply(base: bytes | None, patch: bytes) -> bytes:
    """Rebuild the target. The base's hash is checked first, the result's last. ``base`` may be None for ``full``."""
    header, payload = read_header(patch)
    alg, length = header["alg"], header["length"]
    if alg != "full" and (base is None or sha256(base) != header["base"]):
        raise DeltaError(f"wrong base for this {alg} patch: expected sha256 {header['base'][:12]}…")
    try:
        if alg == "full":
            out = zstd.ZstdDecompressor().decompress(payload, max_output_size=length)
        elif alg == "zstd-patch":
            out = _zstd_unpatch(base, payload, length)  # type: ignore[arg-type]
        elif alg == "bsdiff4":
            out = bsdiff4.patch(base, payload)
        else:
            out = _onnx_unpatch(base, payload, length)  # type: ignore[arg-type]
    except (zstd.ZstdError, ValueError, KeyError, TypeError, IndexError, struct.error, json.JSONDecodeError) as e:
        raise DeltaError(f"corrupt {alg} patch: {e}") from e
    except Exception as e:  # bsdiff4 raises plain errors on hostile input
        raise DeltaError(f"corrupt {alg} patch: {type(e).__name__}: {e}") from e
    if len(out) != length or sha256(out) != header["target"]:
        raise DeltaError(f"{alg} patch produced bytes that do not match the target hash")
    return out
