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
    # bsdiff4 measured 45 s to encode a 16 MB all-weights-changed update here, and FACTS saw 191 s and 911 MB RSS
    # at 50 MB; above this size it is not tried, so the server is never blocked for minutes.
    bsdiff_max_bytes: int = 8 * 1024 * 1024
    # python-zstandard offers the base only as a raw-content dictionary (the zstd CLI's --patch-from uses a
    # referenced prefix it does not expose); measured here, that finds the base's content up to ~16 MB at level 19,
    # and past ~48 MB at no level without ~1 GB of match tables. Above this size patch-from is not tried.
    zstd_patch_max_bytes: int = 32 * 1024 * 1024
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


# TensorProto.data_type → bytes per element (FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, BOOL, FLOAT16,
# DOUBLE, UINT32, UINT64, BFLOAT16); others are treated as bytes.
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def tensor_layout(model: bytes) -> dict[str, tuple[int, int, int]]:
    """(start, end, bytes per element) of each top-level initializer's raw_data in a serialized ModelProto."""
    spans: dict[str, tuple[int, int, int]] = {}
    for number, wire, s, e in _fields(model, 0, len(model)):
        if number != 7 or wire != 2:  # ModelProto.graph
            continue
        for gnum, gwire, gs, ge in _fields(model, s, e):
            if gnum != 5 or gwire != 2:  # GraphProto.initializer
                continue
            name, raw, dtype = None, None, 0
            for tnum, twire, ts, te in _fields(model, gs, ge):
                if tnum == 8 and twire == 2:  # TensorProto.name
                    name = model[ts:te].decode("utf-8", "replace")
                elif tnum == 9 and twire == 2:  # TensorProto.raw_data
                    raw = (ts, te)
                elif tnum == 2 and twire == 0:  # TensorProto.data_type
                    dtype = _varint(model, ts)[0]
            if name is not None and raw is not None and raw[1] > raw[0]:
                spans[name] = (raw[0], raw[1], _ITEMSIZE.get(dtype, 1))
    return spans


def tensor_spans(model: bytes) -> dict[str, tuple[int, int]]:
    """Byte span of each top-level initializer's raw_data, by tensor name."""
    return {k: (s, e) for k, (s, e, _) in tensor_layout(model).items()}


def _delta_planes(base: bytes, target: bytes, itemsize: int) -> bytes:
    """Byte-wise difference split into one plane per byte of the element: a fine-tuned float keeps its sign and
    exponent bytes, so those planes become runs of zeros that compress to almost nothing."""
    d = (np.frombuffer(target, np.uint8) - np.frombuffer(base, np.uint8)).astype(np.uint8)
    return d.reshape(-1, itemsize).T.tobytes() if itemsize > 1 and len(d) % itemsize == 0 else d.tobytes()


def _undelta_planes(base: bytes, planes: bytes, itemsize: int) -> bytes:
    d = np.frombuffer(planes, np.uint8)
    if itemsize > 1 and len(d) % itemsize == 0:
        d = d.reshape(itemsize, -1).T.reshape(-1)
    return (np.frombuffer(base, np.uint8) + d).astype(np.uint8).tobytes()


# Plan ops: [0, n] n literal bytes; [1, off, n] copy n bytes of the base at off; [2, off, n] n bytes of
# plane-split difference against the base's bytes at off.
_LITERAL, _COPY, _DIFF = 0, 1, 2


def _structure(model: bytes, spans: dict[str, tuple[int, int]]) -> bytes:
    """Everything but the tensor payloads, in file order: the graph, names, shapes, attributes."""
    out, pos = bytearray(), 0
    for s, e in sorted(spans.values()):
        out += model[pos:s]
        pos = e
    return bytes(out + model[pos:])


def _encode_plan(ops: list[list[int]]) -> bytes:
    """Ops as three int64 columns (kind, base offset, length); offsets are stored relative to where the previous
    base read ended, so an unchanged layout turns into runs of equal small numbers that compress to almost nothing."""
    kinds, offs, lens, end = [], [], [], 0
    for op in ops:
        kinds.append(op[0])
        lens.append(op[-1])
        if op[0] == _LITERAL:
            offs.append(0)
        else:
            offs.append(op[1] - end)
            end = op[1] + op[2]
    return np.array([kinds, offs, lens], dtype="<i8").tobytes()


def _decode_plan(raw: bytes) -> list[list[int]]:
    cols = np.frombuffer(raw, dtype="<i8")
    if len(cols) % 3:
        raise ValueError("plan is not three equal columns")
    kinds, offs, lens = cols.reshape(3, -1).tolist()
    ops, end = [], 0
    for kind, off, n in zip(kinds, offs, lens, strict=True):
        if kind == _LITERAL:
            ops.append([kind, n])
        elif kind in (_COPY, _DIFF):
            ops.append([kind, end + off, n])
            end = end + off + n
        else:
            raise ValueError(f"unknown plan op {kind}")
    return ops


def _onnx_patch(base: bytes, target: bytes, level: int) -> bytes:
    """Payload: plan | graph-and-new-tensor bytes (zstd against the base's graph bytes) | changed-tensor
    differences (plain zstd: small-alphabet noise compresses better on its own than mixed with graph bytes)."""
    base_layout, target_spans = tensor_layout(base), tensor_spans(target)
    base_spans = {k: (s, e) for k, (s, e, _) in base_layout.items()}
    itemsize = {s: size for s, _, size in base_layout.values()}  # by base offset, which the plan records
    if not target_spans:
        raise ValueError("no raw_data initializers in the target")
    ops: list[list[int]] = []
    literals, diffs = bytearray(), bytearray()
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
                diffs += _delta_planes(base[b[0] : b[1]], target[s:e], itemsize[b[0]])
        else:
            ops.append([_LITERAL, e - s])
            literals += target[s:e]
        pos = e
    if pos < len(target):
        ops.append([_LITERAL, len(target) - pos])
        literals += target[pos:]
    plan = zstd.ZstdCompressor(level=19).compress(_encode_plan(ops))
    # The base's graph bytes, contiguous, are the dictionary: an unchanged graph becomes one long match.
    packed = _zstd_patch(_structure(base, base_spans) or base, bytes(literals), level)
    packed_diffs = zstd.ZstdCompressor(level=level).compress(bytes(diffs))
    return struct.pack(">IIIII", len(plan), len(literals), len(diffs), len(packed), len(packed_diffs)) + \
        plan + packed + packed_diffs


def _onnx_unpatch(base: bytes, payload: bytes, length: int) -> bytes:
    n_plan, n_lit, n_diff, n_packed, n_packed_diff = struct.unpack(">IIIII", payload[:20])
    if n_lit + n_diff > length or 20 + n_plan + n_packed + n_packed_diff != len(payload):
        raise ValueError("section lengths do not add up")
    at = 20
    ops = _decode_plan(zstd.ZstdDecompressor().decompress(payload[at : at + n_plan], max_output_size=MAX_PLAN))
    at += n_plan
    layout = tensor_layout(base)
    itemsize = {s: size for s, _, size in layout.values()}
    spans = {k: (s, e) for k, (s, e, _) in layout.items()}
    literals = _zstd_unpatch(_structure(base, spans) or base, payload[at : at + n_packed], n_lit)
    at += n_packed
    diffs = zstd.ZstdDecompressor().decompress(payload[at:], max_output_size=n_diff) if n_diff else b""
    out = bytearray()
    li = di = 0
    for op in ops:
        if op[0] == _LITERAL:
            if li + op[1] > len(literals):
                raise ValueError("literal outside its stream")
            out += literals[li : li + op[1]]
            li += op[1]
        else:
            off, n = op[1], op[2]
            if off < 0 or n < 0 or off + n > len(base) or (op[0] == _DIFF and di + n > len(diffs)):
                raise ValueError("copy or difference outside its source")
            if op[0] == _COPY:
                out += base[off : off + n]
            else:
                out += _undelta_planes(base[off : off + n], diffs[di : di + n], itemsize.get(off, 1))
                di += n
        if len(out) > length:
            raise ValueError("patch produces more bytes than the target length")
    return bytes(out)


# ----------------------------------------------------------------------------- encode / apply


def _payload(algorithm: str, base: bytes, target: bytes, level: int) -> bytes:
    if algorithm == "full":
        return zstd.ZstdCompressor(level=level).compress(target)
    if algorithm == "zstd-patch":
        return _zstd_patch(base, target, level)
    if algorithm == "bsdiff4":
        return bsdiff4.diff(base, target)
    if algorithm == "onnx-tensors":
        return _onnx_patch(base, target, level)
    raise ValueError(f"unknown delta algorithm {algorithm!r}")


def encode_as(algorithm: str, base: bytes, target: bytes, options: EncodeOptions | None = None) -> bytes:
    """One algorithm's self-describing patch. ValueError when it does not apply (onnx-tensors on non-ONNX bytes)."""
    o = options or EncodeOptions()
    level = o.zstd_level if len(target) <= o.zstd_fast_above else o.zstd_fast_level
    return _pack(algorithm, sha256(base), sha256(target), len(target), _payload(algorithm, base, target, level))


def encode(base: bytes, target: bytes, options: EncodeOptions | None = None) -> Patch:
    """The smallest of the enabled deltas, or the compressed target when no delta is smaller."""
    o = options or EncodeOptions()
    algorithms = ["full", *(a for a in o.algorithms if a != "full")]
    size = max(len(base), len(target))
    for alg, budget in (("bsdiff4", o.bsdiff_max_bytes), ("zstd-patch", o.zstd_patch_max_bytes)):
        if size > budget and alg in algorithms:
            algorithms.remove(alg)
    candidates: dict[str, bytes] = {}
    seconds: dict[str, float] = {}
    for alg in algorithms:
        t0 = time.perf_counter()
        try:
            candidates[alg] = encode_as(alg, base, target, o)
        except ValueError:  # e.g. onnx-tensors on something that is not an ONNX file
            continue
        finally:
            seconds[alg] = time.perf_counter() - t0
    best = min(candidates, key=lambda k: (len(candidates[k]), k != "full"))
    header, _ = read_header(candidates[best])
    return Patch(best, header["base"], header["target"], len(target), candidates[best],
                 tried={k: len(read_header(v)[1]) for k, v in candidates.items()}, encode_seconds=seconds)


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
