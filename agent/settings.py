"""Typed agent settings: a TOML file, overridden by ``EF_AGENT_*`` environment variables.

A pydantic model with a twenty-line loader rather than pydantic-settings: on the device that library costs 2.8 MB of
RSS for what ``tomllib`` and ``os.environ`` do here (the server, with more sources, uses pydantic-settings).
Environment values are parsed as JSON when they look like JSON (lists, numbers, booleans), else taken as text.
"""

from __future__ import annotations

import json
import os
import shlex
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from agent.metering import LinkPolicy
from fleet_protocol.topics import DEVICE_ID

ENV_PREFIX = "EF_AGENT_"


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=DEVICE_ID.pattern)
    profile: str
    cohort: str | None = None
    # broker
    broker_url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None  # preferred to `password`: keep secrets out of the config file
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # trust and state
    trust_root: Path  # the pinned root metadata (root.json) from enrollment
    device_key_file: Path | None = None  # X25519 private key (32 raw bytes) for encrypted delivery
    state_dir: Path
    # local API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8470, ge=0, le=65535)
    api_socket: Path | None = None  # a Unix socket instead of TCP
    max_request_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    api_read_timeout_s: float = Field(default=30.0, gt=0)  # idle wait for a request, and the time to read one
    api_max_connections: int = Field(default=256, ge=1)  # each holds a thread and up to max_request_bytes
    batch_max: int = Field(default=1, ge=1, le=1024)  # > 1: micro-batch concurrent requests (dynamic-batch models)
    batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    # telemetry
    telemetry_interval_s: float = Field(default=60.0, gt=0)
    outbox_max_messages: int = Field(default=10_000, gt=0)
    # runtimes
    threads: int = Field(default=2, ge=1)
    execution_providers: list[str] = ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                      "CPUExecutionProvider"]
    tflite_runtime: Literal["auto", "ai_edge_litert", "tflite_runtime"] = "auto"
    # downloads
    chunk_window: int = Field(default=64, ge=1, le=4096)
    chunk_timeout_s: float = Field(default=5.0, gt=0)
    # metered links (agent.metering): a cap, a daily budget, and the integrator's "metered now" condition
    max_download_bps: int | None = Field(default=None, gt=0)
    daily_download_bytes: int | None = Field(default=None, gt=0)
    metered_file: Path | None = None  # downloads hold while this file exists
    metered_command: str | None = None  # … or while this command exits 0
    metered_check_s: float = Field(default=10.0, gt=0)  # how often the command runs at most
    # several models: what they may hold in memory together (default: the profile's model_ram_budget_mb)
    model_memory_budget_mb: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AgentSettings:
        if self.api_host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("api_host must be a loopback address: the local API has no authentication")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.metered_command is not None:
            try:
                if not shlex.split(self.metered_command):
                    raise ValueError("it is empty")
            except ValueError as e:
                raise ValueError(f"metered_command {self.metered_command!r} cannot be parsed: {e}") from e
        return self

    def broker_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password.get_secret_value() if self.password else None

    def link_policy(self) -> LinkPolicy:
        return LinkPolicy(max_download_bps=self.max_download_bps, daily_download_bytes=self.daily_download_bytes,
                          metered_file=self.metered_file, metered_command=self.metered_command,
                          check_every_s=self.metered_check_s)

    def memory_budget_bytes(self) -> int | None:
        """The budget the models' estimated footprints must fit (agent.models): this setting, else the profile's
        ``model_ram_budget_mb`` when the profile is one of the packaged ones, else none."""
        if self.model_memory_budget_mb is not None:
            return int(self.model_memory_budget_mb * 2**20)
        try:  # data and a small loader, no server or converter code
            from firmware_profiles import builtin_profile_ids, load_profile
        except ImportError:
            return None
        if self.profile not in builtin_profile_ids():  # an integrator's own profile: no budget unless set here
            return None
        return load_profile(self.profile).memory.model_ram_budget_mb * 2**20

    def device_key(self) -> bytes | None:
        return self.device_key_file.read_bytes() if self.device_key_file else None


def load_settings(path: Path | None = None, **overrides) -> AgentSettings:
    """Settings from ``path`` (TOML), ``EF_AGENT_*`` environment variables on top, ``overrides`` on top of both."""
    values: dict = {}
    if path is not None:
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"agent config {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"agent config {path} is not valid TOML: {e}") from e
    fields = set(AgentSettings.model_fields)
    for key, raw in os.environ.items():
        name = key[len(ENV_PREFIX):].lower() if key.startswith(ENV_PREFIX) else None
        if name in fields:
            values[name] = _env_value(raw)
    values.update(overrides)
    return AgentSettings(**values)


def _env_value(raw: str):
    if raw[:1] in "[{" or raw in ("true", "false", "null") or raw.replace(".", "", 1).lstrip("-").isdigit():
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw
