"""Server settings: environment (``EF_SERVER_*``) and an optional ``.env`` file, built once at start-up and passed
down (no module-level singletons)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EF_SERVER_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///./fleet-data/fleet.db"
    data_dir: Path = Path("./fleet-data")  # artifacts, keys (online only), generated broker files
    broker_url: str = "mqtt://127.0.0.1:1883"  # how the server reaches the broker
    device_broker_url: str | None = None  # how devices reach it (told at enrollment); default: broker_url
    broker_ca_file: Path | None = None  # the server's trust for an mqtts:// broker_url (default: the fleet CA)
    broker_cert_file: Path | None = None  # the server's own TLS client certificate, for a mutual-TLS listener
    broker_key_file: Path | None = None
    pki_dir: Path | None = None  # the fleet CA (ca.key, ca.crt); default: <data_dir>/pki
    public_url: str = "http://127.0.0.1:8000"
    token_bytes: int = Field(default=32, ge=16, le=64)
    page_size_max: int = Field(default=500, ge=1)
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    broker_files_dir: Path | None = None  # when set: Mosquitto's passwd and acl, rewritten on every (de)enrollment
    broker_pid_file: Path | None = None  # Mosquitto's pid_file, for the reload (SIGHUP) after each rewrite
    mqtt_username: str | None = None  # the server's own broker account (fleet-wide rights)
    mqtt_password: str | None = None
    # This replica's broker account (fleet_server/broker.py server_account): unique across the deployment. Default:
    # the lowest number free among this host's server processes, enough for replicas on one host.
    server_instance: int | None = Field(default=None, ge=0, le=15)
    rollout_engine: bool = True  # connect to the broker, ingest device messages, run rollouts
    engine_tick_s: float = Field(default=0.5, gt=0, le=60)
    drift_interval_s: float = Field(default=60.0, gt=0)  # how often the engine checks inputs for drift
    # remote configuration: an online device whose report lags what it was sent this long gets it again
    config_resend_s: float = Field(default=60.0, gt=0)
    drift_window_s: float = Field(default=900.0, gt=0)  # over how much recent telemetry
    conversion_workers: int = Field(default=1, ge=1, le=16)  # processes; each conversion is CPU- and RAM-heavy
    # Where conversion jobs run: "local" (a process pool inside this server; SQLite is fine) or "procrastinate" (the
    # procrastinate job queue in the server's PostgreSQL; `fleet-server worker` processes on any machine take them).
    job_queue: Literal["local", "procrastinate"] = "local"
    worker_heartbeat_s: float = Field(default=10.0, gt=0, le=600)  # a worker's heartbeat (its registry row and queue)
    # The visibility timeout: a part whose worker has not beaten for this long is retried on another worker.
    worker_stall_s: float = Field(default=60.0, gt=0)
    job_attempts: int = Field(default=3, ge=1, le=20)  # tries of a part that fails for a transient reason
    job_retry_wait_s: float = Field(default=5.0, ge=0)  # the first retry's wait; doubled each time after
    # Artifacts: "local" (files under data_dir/artifacts) or "s3" (any S3-compatible object storage, boto3).
    artifact_store: Literal["local", "s3"] = "local"
    s3_bucket: str = ""
    s3_endpoint_url: str | None = None  # e.g. http://minio:9000; None: AWS S3
    s3_public_endpoint_url: str | None = None  # the host presigned URLs name (what devices reach); default: the above
    s3_region: str = "us-east-1"
    s3_prefix: str = "artifacts/"
    s3_access_key: str | None = None  # None: boto3's own chain (environment, instance role...)
    s3_secret_key: str | None = None
    s3_presign_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Devices download update files over HTTP(S) with Range from <public_url>/v1/deliveries/<job>/ (redirected to
    # presigned object-storage URLs) instead of in chunks over MQTT. None: on when artifacts are in object storage.
    device_http_downloads: bool | None = None
    # Validation and conversion of uploaded models run in a sandboxed child (fleet_server/sandbox.py).
    # the child's private address space (RLIMIT_DATA: reserved, not only resident; TensorFlow and ONNX Runtime reserve
    # far more than they touch: make demo's 64×64 model hit 4 GiB of it converting for a Jetson)
    sandbox_memory_mb: int = Field(default=8192, ge=128)
    sandbox_timeout_s: float = Field(default=300.0, gt=0)  # validating one upload at POST /v1/models
    sandbox_job_timeout_s: float = Field(default=3600.0, gt=0)  # one conversion job, all its profiles
    sandbox_user: str | None = "nobody"  # the child's user when the server is root ("": uid 0, no capabilities)

    @property
    def http_downloads(self) -> bool:
        return self.artifact_store == "s3" if self.device_http_downloads is None else self.device_http_downloads

    @property
    def pki_folder(self) -> Path:
        return self.pki_dir or self.data_dir / "pki"
