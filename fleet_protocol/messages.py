"""Versioned message schemas for every MQTT message (ARCHITECTURE.md, "MQTT"). JSON on the wire.

Every message carries ``v`` (schema version) and ``type``. :func:`parse` turns untrusted bytes into a typed message
or raises a typed error — never anything else: unknown versions are refused loudly (``SchemaVersionError``).
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
)

from fleet_protocol.errors import MalformedError, SchemaVersionError

SCHEMA_VERSION: Literal[1] = 1
MAX_MESSAGE_BYTES = 1024 * 1024
ID = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Sha = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


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
    model_config = ConfigDict(extra="forbid", frozen=True)
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
    indices: tuple[Annotated[int, Field(ge=0)], ...] = Field(min_length=1, max_length=4096)


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
    timings_ms: dict[str, float] = {}
    ts: float


class Histogram(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    edges: tuple[float, ...] = Field(min_length=2, max_length=256)
    counts: tuple[Annotated[int, Field(ge=0)], ...]

    @field_validator("counts")
    @classmethod
    def _one_per_bin(cls, counts, info):
        edges = info.data.get("edges")
        if edges is not None and len(counts) != len(edges) - 1:
            raise ValueError(f"{len(counts)} counts for {len(edges) - 1} bins")
        return counts


class InputStats(BaseModel):
    """Per-input statistics for drift detection."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(max_length=128)
    count: int = Field(ge=0)
    mean: float
    std: float = Field(ge=0)
    min: float
    max: float
    histogram: Histogram


class TelemetryBatch(_Msg):
    type: Literal["telemetry"] = "telemetry"
    seq: int = Field(ge=0)
    window_start: float
    window_end: float
    model_version: str | None = Field(default=None, max_length=64)
    slot: Literal["a", "b"] | None = None
    requests: int = Field(ge=0)
    errors: dict[str, Annotated[int, Field(ge=0)]] = {}
    latency_ms: Histogram | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    cpu_percent: float | None = Field(default=None, ge=0)
    rss_mb: float | None = Field(default=None, ge=0)
    temperature_c: float | None = None
    inputs: tuple[InputStats, ...] = Field(default=(), max_length=64)
    dropped_batches: int = Field(default=0, ge=0)  # lost to the outbox's size bound, oldest first


class DeviceState(_Msg):
    type: Literal["state"] = "state"
    active_version: str | None = None
    active_sha256: Sha | None = None
    active_slot: Literal["a", "b"] | None = None
    staged_version: str | None = None
    root_version: int = Field(ge=1)
    update_version: int = Field(ge=0)
    ts: float


class Online(_Msg):
    type: Literal["online"] = "online"
    online: bool
    ts: float | None = None


Message = Annotated[UpdateOffer | RollbackOrder | Ping | ChunkData | ChunkRequest | UpdateEvent | TelemetryBatch
                    | DeviceState | Online, Field(discriminator="type")]
_ADAPTER: TypeAdapter = TypeAdapter(Message)


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
    if obj.get("v") != SCHEMA_VERSION:
        raise SchemaVersionError(f"unsupported message schema version {obj.get('v')!r} (this side speaks "
                                 f"{SCHEMA_VERSION})")
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as e:
        first = e.errors()[0]
        raise MalformedError(f"invalid {obj.get('type', 'message')!r}: {first['msg']} at "
                             f"{'.'.join(map(str, first['loc']))}") from e
