"""Service settings, read from ``SCEN_*`` environment variables (or a ``.env`` file).

This is the one place the service reads its configuration; every other module takes
the values it needs as arguments.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from app.scen import ScenConfig


def _default_data_dir() -> Path:
    root = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(root) / "scen"


def _default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "scen"


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


ROLES = ("reader", "editor", "admin")
MIN_KEY_CHARS = 16
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass(frozen=True)
class KeyEntry:
    """One configured API key: only its sha256 is kept."""

    name: str
    role: str
    sha256: str

    def __repr__(self) -> str:
        return f"KeyEntry(name={self.name!r}, role={self.role!r})"


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_keys(text: str) -> list[KeyEntry]:
    """``NAME:ROLE:KEY`` or ``NAME:ROLE:sha256:HEX`` entries, comma-separated. Errors name the
    entry by its position and name, never by its key."""
    entries: list[KeyEntry] = []
    for number, raw in enumerate((part.strip() for part in text.split(",")), start=1):
        if not raw:
            continue
        name, _, rest = raw.partition(":")
        role, _, key = rest.partition(":")
        where = f"SCEN_API_KEYS entry {number}"
        if not key:
            raise ValueError(f"{where} is not NAME:ROLE:KEY")
        if not _KEY_NAME.match(name):
            raise ValueError(f"{where}: the name must be 1-64 letters, digits or _.@- characters")
        if role not in ROLES:
            raise ValueError(f"{where} ({name}): the role must be one of {', '.join(ROLES)}")
        if key.startswith("sha256:"):
            digest = key.removeprefix("sha256:").lower()
            if not _SHA256_HEX.match(digest):
                raise ValueError(f"{where} ({name}): sha256: must be followed by 64 hex digits")
        elif len(key) < MIN_KEY_CHARS:
            raise ValueError(f"{where} ({name}): the key must have at least {MIN_KEY_CHARS} characters")
        else:
            digest = key_sha256(key)
        if any(e.name == name for e in entries):
            raise ValueError(f"{where}: the name {name} is used twice")
        entries.append(KeyEntry(name, role, digest))
    return entries


def _engine_config(overrides: list[str]) -> ScenConfig:
    # Imported here: the engine pulls in torch, which settings alone must not need.
    from app.scen import ScenConfig

    return ScenConfig.from_overrides(overrides)


class Settings(BaseSettings):
    # An invalid setting is reported without the values given: those hold passwords.
    model_config = SettingsConfigDict(env_prefix="SCEN_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    environment: Literal["development", "production"] = "development"

    # Expert files live under data_dir/experts; the default SQLite file too.
    data_dir: Path = Field(default_factory=_default_data_dir)
    # The bundled model converted to safetensors, and the routing pool's keys.
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # None: a SQLite file in data_dir. PostgreSQL: postgresql+psycopg://user@host/db
    # Both URLs may hold passwords: secrets, shown as ********** wherever the settings are
    # printed; ``db_url`` and ``queue_url`` give them for connecting, ``redact_url`` for logs.
    database_url: SecretStr | None = None
    # None: an in-process queue and the worker inside the API process (one machine only).
    redis_url: SecretStr | None = None
    # Every Redis key and channel starts with this, so several deployments can share a server.
    redis_prefix: str = "scen:"

    # Model: HF id or folder; None = the bundled SmolLM2.
    model: str | None = None
    device: str | None = None
    # Engine settings as key=value strings, e.g. SCEN_ENGINE='["theta=0.7"]'.
    engine: list[str] = Field(default_factory=list)

    # Where trained experts are kept: "files" under data_dir/experts (replicas and workers on
    # several machines then share that folder), or "database" (rows of the SQL database: nothing
    # shared beyond the services already there).
    expert_store: Literal["files", "database"] = "files"
    # Memory for resident experts; the least recently used go out beyond it and load again on
    # demand. The routing neurons always stay resident. None: every expert resident.
    expert_cache_mb: float | None = Field(default=512.0, gt=0)

    # Run a worker inside ``scen serve``. Default: only without Redis.
    embedded_worker: bool | None = None
    # How that worker runs. "process": a child process with a model of its own, at a lower CPU
    # priority and with fewer torch threads, so answering never waits for a training (the
    # editor's lock, the layers a training swaps) nor shares the interpreter's lock with it;
    # it costs a second copy of the model in memory. "thread": inside the API process, sharing
    # its model (half the memory; /generate waits while an edit trains).
    embedded_worker_mode: Literal["process", "thread"] = "process"
    # The worker process's CPU priority ("idle": only CPU time the API leaves, so answers do not
    # slow while edits train, but under constant full load training waits; "low": niceness 10;
    # "normal": the API's) and its torch threads (None: half the CPU cores, at least one).
    embedded_worker_priority: Literal["idle", "low", "normal"] = "idle"
    embedded_worker_threads: int | None = Field(default=None, ge=1)
    # Apply migrations when the API starts (convenient for the embedded default).
    auto_migrate: bool = True

    # Queue: a message unacknowledged this long is taken over by another worker;
    # after max_deliveries deliveries the edit is marked failed.
    claim_idle_ms: int = Field(default=60_000, ge=1)
    max_deliveries: int = Field(default=3, ge=1)
    # An edit waiting this long with no message in the queue (its API process died between the
    # database commit and the enqueue, or the queue lost its data) is sent again by a worker.
    requeue_after_s: float = Field(default=60.0, gt=0)
    # A worker that cannot reach the database retries this long, keeping its message, before
    # leaving the edit to a later delivery: an outage shorter than this costs no delivery.
    db_retry_seconds: float = Field(default=300.0, gt=0)
    # How often API processes reconcile their live model with the database.
    reconcile_seconds: float = Field(default=10.0, gt=0)

    # /generate batching: wait this long for company, up to max_batch prompts per model call.
    batch_window_ms: float = Field(default=5.0, ge=0)
    max_batch: int = Field(default=16, ge=1)

    # Requests that change state (posts, rollbacks) per minute and client address; None: unlimited.
    rate_limit_per_minute: int | None = Field(default=None, ge=1)
    # Larger request bodies are refused with 413 before they are parsed. Edits are far smaller.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    # Edits one POST /edits/batch may hold.
    max_batch_edits: int = Field(default=100, ge=1, le=1000)

    # ``scen worker`` serves its own Prometheus metrics (training, failures, process) on this
    # port when set; a worker inside ``scen serve`` adds them to the API's /metrics instead.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    # ``scen worker`` touches this file while its loop turns; ``scen worker --check`` reads it.
    # None: heartbeats/<host name>.json under the data directory (one file per container).
    worker_heartbeat_file: Path | None = None
    # ``scen worker --check`` fails when the heartbeat is older than this.
    worker_heartbeat_max_age_s: float = Field(default=60.0, gt=0)

    log_json: bool = False

    # API keys, comma-separated entries NAME:ROLE:KEY (ROLE: reader, editor or admin), or
    # NAME:ROLE:sha256:HEX to hold only the key's sha256. Keys made with ``scen keys create`` live
    # in the database instead. No keys anywhere: open mode, every caller is an anonymous admin,
    # which ``scen serve`` allows on a loopback address only, unless ``allow_open``.
    api_keys: SecretStr | None = None
    allow_open: bool = False

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, overrides: list[str]) -> list[str]:
        # A typo here would otherwise surface only once the model has loaded, a minute later.
        if overrides:
            try:
                _engine_config(overrides)
            except ValueError as exc:
                raise ValueError(f"SCEN_ENGINE: {exc}") from None
        return overrides

    @field_validator("expert_cache_mb", mode="before")
    @classmethod
    def _unbounded_cache(cls, value: object) -> object:
        # From the environment, "none" (or nothing) keeps every expert resident.
        if isinstance(value, str) and value.strip().lower() in {"", "none"}:
            return None
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_api_keys(value.get_secret_value())  # raises naming the entry, never the key
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.environment == "production" and self.database_url is None:
            raise ValueError("SCEN_DATABASE_URL must be set in production (SQLite is for one machine)")
        if self.environment == "production" and self.redis_url is None:
            raise ValueError("SCEN_REDIS_URL must be set in production (the in-process queue dies with the API)")
        return self

    @property
    def db_url(self) -> str:
        """The database URL to connect with, password included."""
        if self.database_url is None:
            return f"sqlite:///{self.data_dir / 'scen.db'}"
        return self.database_url.get_secret_value()

    @property
    def queue_url(self) -> str | None:
        """The Redis URL to connect with, password included; None: the in-process queue."""
        return None if self.redis_url is None else self.redis_url.get_secret_value()

    @property
    def api_key_entries(self) -> list[KeyEntry]:
        return [] if self.api_keys is None else parse_api_keys(self.api_keys.get_secret_value())

    @property
    def engine_config(self) -> ScenConfig:
        return _engine_config(self.engine)

    @property
    def heartbeat_path(self) -> Path:
        if self.worker_heartbeat_file is not None:
            return self.worker_heartbeat_file
        return self.data_dir / "heartbeats" / f"{socket.gethostname()}.json"

    @property
    def worker_process_threads(self) -> int:
        if self.embedded_worker_threads is not None:
            return self.embedded_worker_threads
        return max(1, (os.cpu_count() or 2) // 2)

    @property
    def run_embedded_worker(self) -> bool:
        return self.redis_url is None if self.embedded_worker is None else self.embedded_worker


@functools.cache
def get_settings() -> Settings:
    return Settings()
