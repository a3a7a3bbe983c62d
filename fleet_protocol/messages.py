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
from fleet_protocol.vocabulary import Reason, UpdateResult, UpdateState

SCHEMA_VERSION: Literal[1] = 1
MAX_MESSAGE_BYTES = 1024 * 1024
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # ids, jobs and model names: also a directory name on a device
ID = Annotated[str, Field(pattern=NAME)]
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


# Chunks as raw bytes (issue: base64 JSON cost a third more bytes on every link and most of a simulated fleet's CPU).
# A frame is MAGIC, one byte of job-id length, the job id, the chunk index (4 bytes, big-endian), then the data.
# Negotiated per request: an agent that decodes frames says so in an MQTT 5 user property of its chunk request
# (``CHUNK_ENCODINGS_PROPERTY``: ``BINARY_CHUNKS``); an older agent says nothing and keeps getting JSON. A property,
# not a message field: both sides refuse unknown fields, so a new field would break old agents or old servers.
CHUNK_FRAME_MAGIC = b"EFc\x01"
CHUNK_ENCODINGS_PROPERTY = "ef-chunks"
BINARY_CHUNKS = "bin1"


def chunk_frame(job: str, index: int, data: bytes) -> bytes:
    """``ChunkData(job, index, data)`` as a binary frame: 9 bytes plus the job id on top of the data."""
    if not _JOB.match(job) or not isinstance(index, int) or not 0 <= index < 2**32:
        raise ValueError(f"invalid chunk job {job!r} or index {index!r}")
    name = job.encode("ascii")
    return b"".join((CHUNK_FRAME_MAGIC, bytes((len(name),)), name, index.to_bytes(4, "big"), data))


def _chunk_from_frame(raw: bytes) -> ChunkData:
    head = len(CHUNK_FRAME_MAGIC)
    if len(raw) < head + 1 or len(raw) < head + 1 + raw[head] + 4:
        raise MalformedError("truncated chunk frame")
    n = raw[head]
    try:
        job = raw[head + 1 : head + 1 + n].decode("ascii")
    except UnicodeDecodeError as e:
        raise MalformedError("chunk frame: job id is not ASCII") from e
    if not _JOB.match(job):
        raise MalformedError("chunk frame: invalid job id")
    index = int.from_bytes(raw[head + 1 + n : head + 5 + n], "big")
    return ChunkData.model_construct(job=job, index=index, data=bytes(raw[head + 5 + n :]))


# ----------------------------------------------------------------------------- device → server


class ChunkRequest(_Msg):
    type: Literal["chunk_request"] = "chunk_request"
    job: ID
    path: str | None = Field(default=None, max_length=512)  # which signed file (a delta's or the artifact's path)
    indices: tuple[Count32, ...] = Field(min_length=1, max_length=4096)


class UpdateEvent(_Msg):
    type: Literal["update_event"] = "update_event"
    job: ID
    state: UpdateState
    progress: float = Field(ge=0, le=1, default=0)
    result: UpdateResult = UpdateResult.PENDING
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


MAX_INPUT_BINS = 64  # agents bin an input into 16 (agent.telemetry.INPUT_BINS)
# The latency bins every agent (and fleet-sim) reports in: 0.01 ms to 10 s, 42 log-spaced bins. Shared, so windows
# from the whole fleet merge bin by bin (the server's gates and insights add them up).
LATENCY_EDGES_MS: tuple[float, ...] = tuple(float(f"{0.01 * 10 ** (6 * i / 42):.4g}") for i in range(43))


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

    @field_validator("histogram")
    @classmethod
    def _few_bins(cls, histogram: Histogram) -> Histogram:
        # 256 bins (the latency histogram's bound) let one window of 64 inputs carry 0.6 MB, all of it stored
        if len(histogram.counts) > MAX_INPUT_BINS:
            raise ValueError(f"an input histogram has at most {MAX_INPUT_BINS} bins")
        return histogram


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


MAX_MODELS = 16  # named models one device serves at once (issue 17)


class ModelState(BaseModel):
    """One of the device's named models: what its active slot serves, and where its own update is."""

    model_config = STRICT
    name: ID  # the model's name in the registry (a directory name on the device)
    active_version: str | None = Field(default=None, max_length=128)  # "<name> <version>", the telemetry label
    active_sha256: Sha | None = None
    active_slot: Literal["a", "b"] | None = None
    update_state: UpdateState = UpdateState.IDLE
    job: ID | None = None  # the update job in progress, if any


class DeviceState(_Msg):
    """Retained. ``active_*`` describe the device's first model by name (what an agent with one model always sent);
    ``models`` lists every named model (empty from agents older than several models per device)."""

    type: Literal["state"] = "state"
    active_version: str | None = Field(default=None, max_length=128)
    active_sha256: Sha | None = None
    active_slot: Literal["a", "b"] | None = None
    staged_version: str | None = Field(default=None, max_length=128)
    root_version: int = Field(ge=1, le=INT32_MAX)
    update_version: Count64
    ts: Timestamp
    models: tuple[ModelState, ...] = Field(default=(), max_length=MAX_MODELS)

    @field_validator("models")
    @classmethod
    def _names_unique(cls, models: tuple[ModelState, ...]) -> tuple[ModelState, ...]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError("a model is listed twice")
        return models


ScalarValue = Annotated[str, Field(max_length=200)] | bool | int | float | None


class ConfigOffer(_Msg):
    """Server → device, retained per device: the desired settings, signed (``metadata.build_config``)."""

    type: Literal["config"] = "config"
    metadata: B64


class ConfigReport(_Msg):
    """Device → server: what the agent applied of a desired-settings version, and why it refused the rest."""

    type: Literal["config_report"] = "config_report"
    version: Count64
    applied: dict[Label, ScalarValue] = Field(default={}, max_length=64)
    refused: dict[Label, Annotated[str, Field(max_length=300)]] = Field(default={}, max_length=64)
    ts: Timestamp


class Online(_Msg):
    type: Literal["online"] = "online"
    online: bool
    ts: Timestamp | None = None


Message = Annotated[UpdateOffer | RollbackOrder | Ping | ChunkData | ChunkRequest | UpdateEvent | TelemetryBatch
                    | DeviceState | Online | ConfigOffer | ConfigReport, Field(discriminator="type")]
_ADAPTER: TypeAdapter = TypeAdapter(Message)


# What each topic kind carries (fleet_protocol.topics): both sides parse through this one table.
KIND_TYPES: dict[str, tuple[type[_Msg], ...]] = {
    "cmd": (UpdateOffer, RollbackOrder, Ping), "dl": (ChunkData,), "dl-req": (ChunkRequest,),
    "evt": (UpdateEvent, ConfigReport), "tm": (TelemetryBatch,), "state": (DeviceState,), "online": (Online,),
    "cfg": (ConfigOffer,)}


def parse_for(kind: str, raw: bytes, *, limit: int = MAX_MESSAGE_BYTES):
    """Untrusted bytes received on a topic of ``kind`` → a message of a type that kind carries, or MalformedError /
    SchemaVersionError. A chunk may come as a binary frame. Where a kind carries one type (telemetry, the hot path),
    the JSON is validated straight from bytes; anything that fails there is parsed again by :func:`parse`, so the
    errors (and what is accepted) are the same either way."""
    types = KIND_TYPES.get(kind)
    if types is None:
        raise MalformedError(f"no message is expected on a {kind!r} topic")
    if not isinstance(raw, bytes | bytearray):
        raise MalformedError(f"message must be bytes, got {type(raw).__name__}")
    if kind == "dl" and raw[: len(CHUNK_FRAME_MAGIC)] == CHUNK_FRAME_MAGIC:
        if len(raw) > limit:
            raise MalformedError(f"message is {len(raw)} bytes; the limit is {limit}")
        return _chunk_from_frame(raw)
    if len(types) == 1 and len(raw) <= limit and b"\\u0000" not in raw:
        try:
            return types[0].model_validate_json(raw)
        except ValidationError:
            pass  # parse() says precisely why (a version, a type, a field)
    message = parse(raw, limit=limit)
    if not isinstance(message, types):
        raise MalformedError(f"a {message.type!r} message cannot come on a {kind!r} topic")
    return message


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
