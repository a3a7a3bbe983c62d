"""Versioned message schemas for every MQTT message (ARCHITECTURE.md, "MQTT"). JSON on the wire.

Every message carries ``v`` (schema version) and ``type``. :func:`parse` turns untrusted bytes into a typed message
or raises a typed error — never anything else: unknown versions are refused loudly (``SchemaVersionError``).

Parsing is strict because the server stores what devices send: numbers are finite and within what both databases
store (a ``seq`` of 2**63 or a ``NaN`` timestamp once failed the server's whole telemetry batch, forever), dictionaries
and their keys are bounded, and no string holds a NUL character (PostgreSQL's text types refuse it).
"""

from __future__ import annotations

import base64
import json
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet_protocol.errors import MalformedError, SchemaVersionError

SCHEMA_VERSION: Literal[1] = 1
MAX_MESSAGE_BYTES = 1024 * 1024
ID = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Sha = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
INT32_MAX = 2**31 - 1  # PostgreSQL's ``integer`` (telemetry counts are stored in such columns)
INT64_MAX = 2**63 - 1  # SQLite's INTEGER and PostgreSQL's ``bigint``
Count32 = Annotated[int, Field(ge=0, le=INT32_MAX)]
Count64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
Timestamp = Annotated[float, Field(ge=0, le=1e11)]  # Unix seconds; finite (allow_inf_nan is off everywhere)
Label = Annotated[str, Field(min_length=1, max_length=64)]
STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _b64decode(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as e:
        raise ValueError(f"invalid base64: {e}") from e


# Bytes travel as base64 text in JSON; Python callers may pass bytes directly.
B64 = Annotated[bytes, BeforeValidator(_b64decode),
                PlainSerializer(lambda b: base64.b64encode(b).decode(), return_type=str, when_used="json")]


class _Msg(BaseModel):
    model_config = STRICT
    v: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


# ----------------------------------------------------------------------------- server → device


class UpdateOffer(_Msg):
    type: Literal["update_offer"] = "update_offer"
    job: ID
    metadata: B64  # signed update metadata (fleet_protocol.metadata), verified by the agent before use
    roots: tuple[B64, ...] = ()  # root rotations to follow first, oldest first
    url: str | None = Field(default=None, max_length=2048)  # optional HTTP(S) base: files at URL/<signed path>
    base_sha256: Sha | None = None  # the delta the server chose assumes this active artifact
    probe: B64 | None = None  # golden inputs + expected outputs (npz); its sha256 is in the signed probe section


class RollbackOrder(_Msg):
    type: Literal["rollback"] = "rollback"
    job: ID
    reason: str = Field(max_length=500)


class Ping(_Msg):
    type: Literal["ping"] = "ping"
    nonce: ID


class ChunkData(_Msg):
    type: Literal["chunk"] = "chunk"
    job: ID
    index: int = Field(ge=0)
    data: B64


_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def chunk_bytes(job: str, index: int, data_b64: str) -> bytes:
    """``ChunkData(job, index, data).to_bytes()`` from already base64-encoded data, byte for byte: a server that
    sends the same chunks to many devices encodes each chunk once instead of once per device."""
    if not _JOB.match(job) or not isinstance(index, int) or index < 0:
        raise ValueError(f"invalid chunk job {job!r} or index {index!r}")
    return (f'{{"v":{SCHEMA_VERSION},"type":"chunk","job":"{job}","index":{index},"data":"'.encode()
            + data_b64.encode("ascii") + b'"}')


# ----------------------------------------------------------------------------- device → server


class ChunkRequest(_Msg):
    type: Literal["chunk_request"] = "chunk_request"
    job: ID
    path: str | None = Field(default=None, max_length=512)  # which signed file (a delta's or the artifact's path)
    indices: tuple[Count32, ...] = Field(min_length=1, max_length=4096)


class Reason(StrEnum):
    """Why an update step failed; the server's health gates and dashboards key on these."""

    OK = "ok"
    BAD_SIGNATURE = "bad_signature"
    ROLLBACK_ATTACK = "rollback_attack"
    EXPIRED = "expired"
    WRONG_DEVICE = "wrong_device"
    MALFORMED = "malformed"
    HASH_MISMATCH = "hash_mismatch"
    DELTA_FAILED = "delta_failed"
    DOWNLOAD_FAILED = "download_failed"
    DECRYPT_FAILED = "decrypt_failed"
    LOAD_FAILED = "load_failed"
    PROBE_FAILED = "probe_failed"
    DISK_FULL = "disk_full"
    ROLLED_BACK = "rolled_back"
    INTERNAL = "internal"


class UpdateEvent(_Msg):
    type: Literal["update_event"] = "update_event"
    job: ID
    state: str = Field(max_length=32)
    progress: float = Field(ge=0, le=1, default=0)
    result: Literal["pending", "ok", "failed"] = "pending"
    reason: Reason = Reason.OK
    detail: str = Field(default="", max_length=1000)
    timings_ms: dict[Label, Annotated[float, Field(ge=0)]] = Field(default={}, max_length=32)
    ts: Timestamp


class Histogram(BaseModel):
    model_config = STRICT
    edges: tuple[float, ...] = Field(min_length=2, max_length=256)
    counts: tuple[Count64, ...]

    @field_validator("counts")
    @classmethod
    def _one_per_bin(cls, counts, info):
        edges = info.data.get("edges")
        if edges is not None and len(counts) != len(edges) - 1:
            raise ValueError(f"{len(counts)} counts for {len(edges) - 1} bins")
        return counts


class InputStats(BaseModel):
    """Per-input statistics for drift detection."""

    model_config = STRICT
    name: str = Field(max_length=128)
    count: Count64
    mean: float
    std: float = Field(ge=0)
    min: float
    max: float
    histogram: Histogram


class TelemetryBatch(_Msg):
    type: Literal["telemetry"] = "telemetry"
    seq: Count64
    window_start: Timestamp
    window_end: Timestamp
    model_version: str | None = Field(default=None, max_length=64)
    slot: Literal["a", "b"] | None = None
    requests: Count32
    errors: dict[Label, Count32] = Field(default={}, max_length=64)
    latency_ms: Histogram | None = None
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    cpu_percent: float | None = Field(default=None, ge=0)
    rss_mb: float | None = Field(default=None, ge=0)
    temperature_c: float | None = None
    inputs: tuple[InputStats, ...] = Field(default=(), max_length=64)
    dropped_batches: Count64 = 0  # lost to the outbox's size bound, oldest first

    @model_validator(mode="after")
    def _errors_fit(self) -> TelemetryBatch:
        if sum(self.errors.values()) > INT32_MAX:  # stored as one integer column
            raise ValueError(f"more than {INT32_MAX} errors in one window")
        return self


class DeviceState(_Msg):
    type: Literal["state"] = "state"
    active_version: str | None = Field(default=None, max_length=128)
    active_sha256: Sha | None = None
    active_slot: Literal["a", "b"] | None = None
    staged_version: str | None = Field(default=None, max_length=128)
    root_version: int = Field(ge=1, le=INT32_MAX)
    update_version: Count64
    ts: Timestamp


class Online(_Msg):
    type: Literal["online"] = "online"
    online: bool
    ts: Timestamp | None = None


Message = Annotated[UpdateOffer | RollbackOrder | Ping | ChunkData | ChunkRequest | UpdateEvent | TelemetryBatch
                    | DeviceState | Online, Field(discriminator="type")]
_ADAPTER: TypeAdapter = TypeAdapter(Message)


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse(raw: bytes, *, limit: int = MAX_MESSAGE_BYTES):
    """Untrusted bytes → a typed message, or MalformedError / SchemaVersionError."""
    if not isinstance(raw, bytes | bytearray):
        raise MalformedError(f"message must be bytes, got {type(raw).__name__}")
    if len(raw) > limit:
        raise MalformedError(f"message is {len(raw)} bytes; the limit is {limit}")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MalformedError(f"message is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise MalformedError("message is not a JSON object")
    # JSON can carry NUL only as the escape \u0000 (a raw control character is invalid JSON): a cheap test on the
    # bytes, then an exact one, so ordinary messages pay nothing for it.
    if b"\\u0000" in raw and _has_nul(obj):
        raise MalformedError("message holds a NUL character")
    if obj.get("v") != SCHEMA_VERSION:
        raise SchemaVersionError(f"unsupported message schema version {obj.get('v')!r} (this side speaks "
                                 f"{SCHEMA_VERSION})")
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as e:
        first = e.errors()[0]
        raise MalformedError(f"invalid {obj.get('type', 'message')!r}: {first['msg']} at "
                             f"{'.'.join(map(str, first['loc']))}") from e
