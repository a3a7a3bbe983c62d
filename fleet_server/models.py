"""Tables and API schemas, in SQLModel families (``XBase`` → ``XCreate`` → ``X(table=True)`` → ``XPublic``).

Secrets are never stored: API tokens, enrollment tokens and MQTT passwords are kept as SHA-256 hashes of
high-entropy random values (a slow KDF buys nothing for 256-bit random secrets and would cost every request).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic import Field as PField
from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


# ----------------------------------------------------------------------------- API tokens


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100, index=True)
    role: Role
    token_hash: str = Field(max_length=64, unique=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = Field(default="cli", max_length=100)
    revoked_at: datetime | None = None


class ApiTokenCreate(SQLModel):
    name: str = Field(min_length=1, max_length=100)
    role: Role = Role.VIEWER


class ApiTokenPublic(SQLModel):
    id: int
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


class ApiTokenIssued(ApiTokenPublic):
    token: str  # shown once


# ----------------------------------------------------------------------------- audit


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_entry"
    id: int | None = Field(default=None, primary_key=True)
    ts: datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(max_length=100)
    action: str = Field(max_length=100)
    target: str = Field(default="", max_length=200)
    outcome: str = Field(max_length=20)  # ok | denied | failed
    status: int = 200
    detail: str = Field(default="", max_length=1000)
    source: str = Field(default="", max_length=64)  # the client's address as the server saw it


# ----------------------------------------------------------------------------- enrollment and devices


class EnrollmentToken(SQLModel, table=True):
    __tablename__ = "enrollment_token"
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    expires_at: datetime
    max_uses: int = 1
    uses: int = 0
    profile: str | None = Field(default=None, max_length=64)
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = Field(default="cli", max_length=100)
    revoked_at: datetime | None = None


class EnrollmentTokenCreate(SQLModel):
    expires_in_s: int = Field(default=7 * 24 * 3600, gt=0, le=365 * 24 * 3600)
    max_uses: int = Field(default=1, ge=1, le=100_000)
    profile: str | None = None
    tags: list[str] = []


class EnrollmentTokenIssued(SQLModel):
    id: int
    token: str  # shown once
    expires_at: datetime
    max_uses: int
    profile: str | None
    tags: list[str]


class Device(SQLModel, table=True):
    __tablename__ = "device"
    # (decommissioned_at, id): the device list's default filter and order, so an offset skips index entries only
    __table_args__ = (UniqueConstraint("signing_public_key"), Index("ix_device_live_id", "decommissioned_at", "id"))
    id: str = Field(primary_key=True, max_length=64)
    profile: str = Field(max_length=64, index=True)
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    agent_version: str = Field(default="", max_length=64)
    signing_public_key: str = Field(max_length=200)  # Ed25519, hex
    x25519_public_key: str | None = Field(default=None, max_length=200)  # hex, for encrypted delivery
    mqtt_password_hash: str = Field(max_length=200)  # Mosquitto's $7$ PBKDF2-SHA512 form
    client_cert_serial: str | None = Field(default=None, max_length=64)  # hex; revoked (CRL) at decommission
    enrollment_token_id: int | None = Field(default=None, foreign_key="enrollment_token.id")
    enrolled_at: datetime = Field(default_factory=utcnow)
    decommissioned_at: datetime | None = None
    online: bool = Field(default=False, index=True)
    last_seen: datetime | None = None
    active_version: str | None = Field(default=None, max_length=128, index=True)
    active_sha256: str | None = Field(default=None, max_length=64)


class DeviceModel(SQLModel, table=True):
    """One of a device's named models, as its latest state report described it (issue 17: a device serves several
    models, each with its own A/B slots and update job). A state report replaces all of its device's rows: a model it
    no longer lists is gone. ``Device.active_*`` keep describing the first model, for clients that read only those."""

    __tablename__ = "device_model"
    # by label: the device list's and the console's "runs this version" filters and counts
    __table_args__ = (Index("ix_device_model_version", "active_version"),)
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=64)
    model: str = Field(primary_key=True, max_length=64)  # the registry's model name
    active_version: str | None = Field(default=None, max_length=128)  # "<name> <version>", the telemetry label
    active_sha256: str | None = Field(default=None, max_length=64)
    active_slot: str | None = Field(default=None, max_length=1)  # a | b
    update_state: str = Field(default="idle", max_length=16)  # fleet_protocol.vocabulary.UpdateState
    job: str | None = Field(default=None, max_length=64)  # the update job in progress on this model, if any
    updated_at: datetime = Field(default_factory=utcnow)  # when the device last reported it


class EnrollRequest(BaseModel):  # pydantic directly: SQLModel's Field does not enforce patterns
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "token": "efe_3q2Zb7m0nV0xkq0i7h9m4Yl6b8c0Zt2Q", "profile": "rpi5",
        "signing_public_key": "9f" * 32, "x25519_public_key": "4c" * 32, "agent_version": "0.1.0",
        "tags": ["site:berlin", "line:3"]}]})
    token: str = PField(min_length=16, max_length=200)
    profile: str | None = PField(default=None, max_length=64)
    signing_public_key: str = PField(pattern=r"^[0-9a-f]{64}$", description="Ed25519 public key, hex")
    x25519_public_key: str | None = PField(default=None, pattern=r"^[0-9a-f]{64}$",
                                           description="X25519 public key for encrypted delivery, hex")
    agent_version: str = PField(default="", max_length=64)
    tags: list[str] = PField(default=[], max_length=32)
    client_csr: str | None = PField(default=None, max_length=16384,
                                    description="PEM certificate signing request for a TLS client certificate "
                                                "(mutual TLS with the broker); the subject is set by the server")


class EnrollResponse(SQLModel):
    device_id: str
    profile: str
    mqtt_username: str
    mqtt_password: str  # shown once
    broker_url: str
    trust_root: str  # the pinned root metadata (JSON text)
    broker_ca: str | None = None  # the fleet CA (PEM) that signed the broker's certificate, when there is one
    client_cert: str | None = None  # the device's TLS client certificate (PEM), when it sent a CSR


class DeviceModelPublic(SQLModel):
    name: str
    active_version: str | None
    active_sha256: str | None
    active_slot: str | None
    update_state: str
    job: str | None
    updated_at: datetime

    @field_validator("updated_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class DevicePublic(SQLModel):
    id: str
    profile: str
    tags: list[str]
    agent_version: str
    enrolled_at: datetime
    decommissioned_at: datetime | None
    online: bool
    last_seen: datetime | None
    active_version: str | None  # the first model's (what devices with one model report), as before issue 17
    active_sha256: str | None
    models: list[DeviceModelPublic] = []  # every named model the device reported, by name

    @field_validator("enrolled_at", "decommissioned_at", "last_seen")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """Stored times are UTC; SQLite gives them back naive. Always answered with their offset (Z)."""
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


class DevicePatch(SQLModel):
    tags: list[str] | None = Field(default=None, max_length=32)


class Page(SQLModel):
    total: int
    offset: int
    limit: int
    items: list[DevicePublic]


# ----------------------------------------------------------------------------- model registry and conversion jobs


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every requested profile was converted and judged (some may be refused)
    FAILED = "failed"  # the job could not run (bad source, bad data, a crash)
    CANCELLED = "cancelled"  # an operator stopped it (a running conversion's child is killed)


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, index=True)
    version: str = Field(max_length=64)
    source_sha256: str = Field(max_length=64)
    source_format: str = Field(max_length=8)  # onnx | pt2
    calibration_sha256: str = Field(max_length=64)
    evaluation_sha256: str | None = Field(default=None, max_length=64)
    inputs: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    outputs: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # per input: the calibration data's histogram (quantile edges, shares) and moments — the drift reference
    reference_stats: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False,
                                                                         server_default="{}"))
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = Field(default="", max_length=100)


class ModelVersionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "defect-classifier", "version": "1.4.0", "source_sha256": "ab" * 32, "source_format": "onnx",
        "calibration_sha256": "cd" * 32}]})
    name: str = PField(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = PField(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
    source_sha256: str = PField(pattern=r"^[0-9a-f]{64}$", description="an uploaded artifact (POST /v1/artifacts)")
    source_format: str = PField(default="onnx", pattern=r"^(onnx|pt2)$")
    calibration_sha256: str = PField(pattern=r"^[0-9a-f]{64}$", description="an uploaded .npz of model inputs")
    evaluation_sha256: str | None = PField(default=None, pattern=r"^[0-9a-f]{64}$")


class ConversionJob(SQLModel, table=True):
    __tablename__ = "conversion_job"
    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="model_version.id", index=True)
    profiles: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: JobStatus = Field(default=JobStatus.QUEUED, index=True)
    progress: str = Field(default="", max_length=500)
    log: str = Field(default="", max_length=20000)
    error: str = Field(default="", max_length=2000)
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = Field(default="", max_length=100)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ConversionPart(SQLModel, table=True):
    """One profile of a conversion job on the job queue (settings.job_queue = "procrastinate"): the unit a worker
    takes. Its artifacts are registered with the part's move to succeeded in one transaction, so a part retried after
    its worker died registers exactly one set."""

    __tablename__ = "conversion_part"
    __table_args__ = (UniqueConstraint("job_id", "profile"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="conversion_job.id", index=True)
    profile: str = Field(max_length=64)
    status: JobStatus = Field(default=JobStatus.QUEUED)
    queue_job_id: int | None = None  # procrastinate's job id
    worker: str = Field(default="", max_length=200)  # the worker that took it last
    attempts: int = 0
    error: str = Field(default="", max_length=2000)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ConversionWorker(SQLModel, table=True):
    """A `fleet-server worker` process and what it can build, with its heartbeat: a part that no live worker can
    build fails with that reason instead of waiting."""

    __tablename__ = "conversion_worker"
    name: str = Field(primary_key=True, max_length=200)
    host: str = Field(max_length=200)
    formats: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    flags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # coreml-predict, ...
    profiles: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: float  # time.time()
    current: str = Field(default="", max_length=200)  # "job 12 rpi4" while converting


class ConversionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"profiles": ["rpi5",
                                                                                        "jetson-orin-nano"]}]})
    profiles: list[str] = PField(min_length=1, max_length=32)


class ConvertedArtifact(SQLModel, table=True):
    __tablename__ = "converted_artifact"
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="conversion_job.id", index=True)
    model_version_id: int = Field(foreign_key="model_version.id", index=True)
    profile: str = Field(max_length=64)
    format: str = Field(max_length=32)
    status: str = Field(max_length=16)  # shippable | refused | failed
    artifact_sha256: str | None = Field(default=None, max_length=64)  # in the artifact store
    size: int | None = None
    report_sha256: str = Field(max_length=64)  # the JSON report, in the artifact store
    reasons: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    probe_sha256: str | None = Field(default=None, max_length=64)  # golden inputs + this artifact's outputs (npz)
    fidelity: float | None = None  # the report's headline agreement with FP32 (cosine or top-1), for the gates


# ----------------------------------------------------------------------------- rollouts


class Rollout(SQLModel, table=True):
    __tablename__ = "rollout"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(default="", max_length=100)
    model_version_id: int = Field(foreign_key="model_version.id", index=True)
    state: str = Field(default="draft", max_length=16, index=True)  # planner.RolloutState
    stage: int = 0
    stage_finished_at: float | None = None  # epoch seconds (the planner's clock)
    approved_stage: int = 0  # strategy.require_approval: the highest stage an operator approved (audited)
    retry_of: int | None = Field(default=None, foreign_key="rollout.id")  # a retry of that rollout's failed devices
    selector: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    strategy: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    gates: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    on_gate_failure: str = Field(default="pause", max_length=8)  # pause | abort (abort rolls back)
    encrypt: bool = False
    evaluation: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))  # the latest gate verdict
    notes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = Field(default="", max_length=100)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class RolloutDevice(SQLModel, table=True):
    """One device's part in a rollout; ``job`` is the id its offer carries (unique, so events find their row)."""

    __tablename__ = "rollout_device"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id"), UniqueConstraint("job"))
    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id", index=True)
    device_id: str = Field(foreign_key="device.id", max_length=64, index=True)
    job: str = Field(max_length=64)
    status: str = Field(default="pending", max_length=16)  # planner.MemberStatus
    reason: str = Field(default="", max_length=32)
    detail: str = Field(default="", max_length=1000)
    base_sha256: str | None = Field(default=None, max_length=64)  # what the device ran when offered
    artifact_sha256: str | None = Field(default=None, max_length=64)
    files: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))  # signed path → sha256
    delivery: str = Field(default="", max_length=16)  # full | delta | encrypted
    bytes_offered: int = 0
    offered_at: float | None = None
    finished_at: float | None = None
    timings: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DeltaCache(SQLModel, table=True):
    """The best delta from one artifact to another, computed once per pair."""

    __tablename__ = "delta_cache"
    __table_args__ = (UniqueConstraint("base_sha256", "target_sha256"),)
    id: int | None = Field(default=None, primary_key=True)
    base_sha256: str = Field(max_length=64)
    target_sha256: str = Field(max_length=64)
    algorithm: str = Field(max_length=16)  # bsdiff4 | zstd | none (the full file was smaller)
    delta_sha256: str | None = Field(default=None, max_length=64)
    length: int = 0


class TelemetryWindow(SQLModel, table=True):
    """One telemetry batch from a device. (device_id, seq) is unique: a QoS 1 redelivery is stored once."""

    __tablename__ = "telemetry_window"
    __table_args__ = (UniqueConstraint("device_id", "seq"), Index("ix_telemetry_device_end", "device_id",
                                                                   "window_end"))
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64)
    seq: int = Field(sa_type=BigInteger)
    window_start: float
    window_end: float = Field(index=True)
    model_version: str | None = Field(default=None, max_length=64)
    requests: int = 0
    errors: int = 0
    latency_edges: list[float] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    latency_counts: list[int] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    cpu_percent: float | None = None
    rss_mb: float | None = None
    temperature_c: float | None = None  # the device's first thermal zone, where it has one
    inputs: list[dict] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class EngineLease(SQLModel, table=True):
    """Which server process runs the rollout engine (one at a time; another takes over when the lease lapses)."""

    __tablename__ = "engine_lease"
    name: str = Field(primary_key=True, max_length=32)
    holder: str = Field(max_length=100)
    expires_at: float


class ServerReplica(SQLModel, table=True):
    """A server process's broker session, with its heartbeat: when a process dies without a clean stop, the broker
    keeps its persistent session, and the shared subscription keeps handing that session its share of the devices'
    messages. The engine's holder drains such an orphan and retires it (fleet_server/replicas.py)."""

    __tablename__ = "server_replica"
    client_id: str = Field(primary_key=True, max_length=100)
    username: str | None = Field(default=None, max_length=100)
    holder: str = Field(max_length=100)  # host:pid of the process
    heartbeat_at: float


class TagWindows(SQLModel, table=True):
    """A device tag's maintenance windows (fleet_protocol.windows): a device with the tag switches to a new model
    only inside one of them (and inside the rollout's own, when it has some)."""

    __tablename__ = "tag_windows"
    tag: str = Field(primary_key=True, max_length=64)
    windows: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    updated_by: str = Field(default="", max_length=100)
    updated_at: datetime = Field(default_factory=utcnow)


class DesiredConfig(SQLModel, table=True):
    """Settings an operator wants (fleet_protocol.config) for one device (``device:<id>``) or every device with a tag
    (``tag:<tag>``). A device's effective settings: its tags' in tag order, then its own on top."""

    __tablename__ = "desired_config"
    scope: str = Field(primary_key=True, max_length=80)
    settings: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_by: str = Field(default="", max_length=100)
    updated_at: datetime = Field(default_factory=utcnow)


class DeviceConfig(SQLModel, table=True):
    """What a device was last sent (signed, retained) and what it reported back."""

    __tablename__ = "device_config"
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=64)
    desired_version: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    desired: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    sent_at: float | None = None  # when the desired document was last published
    reported_version: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    applied: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    refused: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reported_at: float | None = None


class DriftAlert(SQLModel, table=True):
    """An input of a model version whose recent fleet statistics drifted from its calibration data (PSI ≥ 0.25).
    One open alert per (model, input), updated while the drift lasts, closed when it subsides."""

    __tablename__ = "drift_alert"
    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="model_version.id", index=True)
    input_name: str = Field(max_length=128)
    psi: float
    level: str = Field(max_length=16)
    values: int = 0
    devices: int = 0
    open: bool = Field(default=True, index=True)
    first_seen: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow)


class ABTest(SQLModel, table=True):
    """Two model versions over one cohort, split by a stable hash of the device id; each arm ships as a rollout."""

    __tablename__ = "ab_test"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(default="", max_length=100)
    model_a_id: int = Field(foreign_key="model_version.id")
    model_b_id: int = Field(foreign_key="model_version.id")
    selector: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    split_percent: float = 50.0  # the share of the cohort on B
    rollout_a_id: int | None = Field(default=None, foreign_key="rollout.id")
    rollout_b_id: int | None = Field(default=None, foreign_key="rollout.id")
    devices_a: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    devices_b: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    started_at: float = 0.0  # epoch seconds: telemetry from here on counts
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = Field(default="", max_length=100)
