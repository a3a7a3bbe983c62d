"""The telemetry hot path's decoder: msgspec structs that mirror ``fleet_protocol.messages.TelemetryBatch``.

Telemetry is nearly all of what a fleet sends, and pydantic's validation of one ~700-byte window was the largest
single cost of ingest (~10–30 µs of the server's CPU per message; msgspec decodes and checks the same in ~2 µs).
The protocol's pydantic models stay the definition: this mirror is only ever *stricter*. It accepts no type
coercion (``"5"`` for an integer, ``5.0`` for a count) and every bound of the model is repeated here; whatever it
refuses goes to ``fleet_protocol.messages.parse_for``, which decides and says why. So a window the mirror accepts is
one the protocol accepts, with the same values — ``tests/fleet_server/test_fastdecode.py`` checks that over every
field's boundaries, and a changed model fails there until the mirror follows.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from fleet_protocol import messages

FLOAT_MAX = sys.float_info.max  # msgspec refuses NaN/Infinity tokens and out-of-range numbers; bounds stay explicit
Finite = Annotated[float, Meta(ge=-FLOAT_MAX, le=FLOAT_MAX)]
NonNegative = Annotated[float, Meta(ge=0, le=FLOAT_MAX)]
Timestamp = Annotated[float, Meta(ge=0, le=1e11)]
Count32 = Annotated[int, Meta(ge=0, le=messages.INT32_MAX)]
Count64 = Annotated[int, Meta(ge=0, le=messages.INT64_MAX)]
Label = Annotated[str, Meta(min_length=1, max_length=64)]


class Histogram(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    edges: Annotated[tuple[Finite, ...], Meta(min_length=2, max_length=256)]
    counts: tuple[Count64, ...]


class LatencyHistogram(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """A window's latency histogram. The bin edges are the same for the whole fleet
    (``messages.LATENCY_EDGES_MS``): they stay JSON text here, checked once per distinct text (see ``_edges``), and
    are stored as that text."""

    edges: msgspec.Raw
    counts: tuple[Count64, ...]


class InputStats(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    name: Annotated[str, Meta(max_length=128)]
    count: Count64
    mean: Finite
    std: NonNegative
    min: Finite
    max: Finite
    histogram: Histogram


class TelemetryBatch(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    seq: Count64
    window_start: Timestamp
    window_end: Timestamp
    requests: Count32
    v: Literal[1] = 1
    type: Literal["telemetry"] = "telemetry"
    model_version: Annotated[str, Meta(max_length=64)] | None = None
    slot: Literal["a", "b"] | None = None
    errors: Annotated[dict[Label, Count32], Meta(max_length=64)] = {}
    latency_ms: LatencyHistogram | None = None
    p50_ms: NonNegative | None = None
    p95_ms: NonNegative | None = None
    p99_ms: NonNegative | None = None
    cpu_percent: NonNegative | None = None
    rss_mb: NonNegative | None = None
    temperature_c: Finite | None = None
    inputs: Annotated[tuple[InputStats, ...], Meta(max_length=64)] = ()
    dropped_batches: Count64 = 0


_DECODER = msgspec.json.Decoder(TelemetryBatch)
_EDGES = msgspec.json.Decoder(Annotated[tuple[Finite, ...], Meta(min_length=2, max_length=256)])
_last_edges: tuple[bytes, int, str] = (b"", 0, "")  # the last edges' text → (their count, the text to store)


def _edges(raw: bytes) -> tuple[int, str] | None:
    """How many bin edges ``raw`` holds and the JSON text to store, or None if they break the protocol's bounds."""
    global _last_edges
    last = _last_edges
    if raw == last[0]:
        return last[1], last[2]
    try:
        count = len(_EDGES.decode(raw))
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    _last_edges = (raw, count, raw.decode())
    return count, _last_edges[2]


def telemetry(raw: bytes) -> TelemetryBatch | None:
    """A telemetry window, or None where the mirror cannot vouch for it (the protocol's parser then decides)."""
    if len(raw) > messages.MAX_MESSAGE_BYTES or b"\\u0000" in raw:  # a NUL is refused by the protocol's parser
        return None
    try:
        m = _DECODER.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if m.latency_ms is not None:
        edges = _edges(bytes(m.latency_ms.edges))
        if edges is None or len(m.latency_ms.counts) != edges[0] - 1:
            return None
    for i in m.inputs:
        if len(i.histogram.counts) != len(i.histogram.edges) - 1 or len(i.histogram.counts) > messages.MAX_INPUT_BINS:
            return None
    return m


def latency_json(m: TelemetryBatch) -> tuple[str | None, str | None]:
    """The stored form of a window's latency histogram: (edges, counts) as JSON text, or (None, None)."""
    if m.latency_ms is None:
        return None, None
    checked = _edges(bytes(m.latency_ms.edges))
    assert checked is not None  # telemetry() refused the window otherwise
    return checked[1], msgspec.json.encode(m.latency_ms.counts).decode()


def inputs_json(m: TelemetryBatch) -> str:
    """The stored form of a window's input statistics (what ``model_dump(mode="json")`` of the protocol's gives)."""
    return msgspec.json.encode(m.inputs).decode() if m.inputs else "[]"
