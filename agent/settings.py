"""Typed agent settings: a TOML file, overridden by ``EF_AGENT_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, TomlConfigSettingsSource

from fleet_protocol.topics import DEVICE_ID


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EF_AGENT_", extra="forbid")

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
    # test hooks (never set in production): pause after journaling a state / after an action
    test_pause_at: str | None = None
    test_pause_after: str | None = None

    @model_validator(mode="after")
    def _check(self) -> AgentSettings:
        if self.api_host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("api_host must be a loopback address: the local API has no authentication")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self

    def broker_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password.get_secret_value() if self.password else None

    def device_key(self) -> bytes | None:
        return self.device_key_file.read_bytes() if self.device_key_file else None


def load_settings(path: Path | None = None, **overrides) -> AgentSettings:
    """Settings from ``path`` (TOML), environment variables on top, ``overrides`` on top of both."""

    class FromFile(AgentSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            sources = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"agent config {path} does not exist")
    return FromFile(**overrides)
