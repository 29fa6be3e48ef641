"""The reference scheduler's configuration (same approach as the agent's)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpuagent.configload import load_config
from gpuagent.logsetup import LogFormat, LogLevel
from gpuagent.units import Duration

DEFAULT_CONFIG_PATH = Path("/etc/gpu-scheduler/config.yaml")

ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "GPU_SCHEDULER_LISTEN": ("server", "listen"),
    "GPU_SCHEDULER_DB": ("database", "path"),
    "GPU_SCHEDULER_LOG_LEVEL": ("log", "level"),
}

SECRET_KEYS = frozenset({"key_file", "password", "token"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogConfig(Strict):
    level: LogLevel = "info"
    format: LogFormat = "auto"


class ServerConfig(Strict):
    listen: str = Field(default="127.0.0.1:7443", description="host:port for gRPC")
    insecure: bool = Field(default=False, description="plaintext gRPC; only for loopback demos")
    cert_file: Path | None = Field(
        default=None,
        description="server certificate; unset = a self-signed CA and certificate are "
        "generated under the database's directory on first start",
    )
    key_file: Path | None = None
    client_ca_file: Path | None = Field(
        default=None, description="require client certificates signed by this CA (mTLS)"
    )
    keepalive_time: Duration = 20.0
    keepalive_timeout: Duration = 10.0
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)

    @model_validator(mode="after")
    def _tls(self) -> ServerConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        return self


class DatabaseConfig(Strict):
    path: Path = Path("/var/lib/gpu-scheduler/scheduler.db")


class LivenessConfig(Strict):
    heartbeat_interval: Duration = 10.0
    suspect_after_missed: int = Field(default=3, ge=1)
    offline_grace: Duration = Field(
        default=45.0, description="no heartbeat for this long -> offline (must exceed keepalive)"
    )
    restart_grace: Duration = Field(
        default=120.0, description="after a scheduler restart, no node goes offline before this"
    )


class MetricsConfig(Strict):
    listen: str | None = "127.0.0.1:9471"


class SchedulerConfig(Strict):
    log: LogConfig = Field(default_factory=LogConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    liveness: LivenessConfig = Field(default_factory=LivenessConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)


def load_scheduler_config(path: Path | None) -> SchedulerConfig:
    return load_config(SchedulerConfig, path, ENV_OVERRIDES)
