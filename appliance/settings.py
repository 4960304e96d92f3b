"""The one reader of the environment: every service builds a frozen `Settings` at start-up.

Services started by `appliance up` (or by the test fixtures) receive these variables; secrets are
never passed inline, only paths to files readable by the service alone.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ApplianceError


class ConfigurationError(ApplianceError):
    """Raised when a service starts without a setting its role requires."""

    code, title = "configuration_error", "Configuration error"


@dataclass(frozen=True)
class ServiceFiles:
    """A service's AppRole login files and its audit log, all present."""

    role_id_file: Path
    secret_id_wrap_file: Path
    audit_log: Path


#: A host name, an IPv4 address or a bracketed IPv6 address, with an optional port.
_AUTHORITY = re.compile(r"(?:[a-z0-9](?:[a-z0-9.-]{0,252})|\[[0-9a-f:.]{2,45}\])(?::[0-9]{1,5})?")


#: A DNS name (RFC 1123 labels, no wildcard): a generated certificate names hosts exactly.
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)


def normalise_tls_name(raw_name: str) -> str:
    """A name for the API's generated certificate: an IP address (compressed) or a DNS name
    (lower case); ValueError for anything else."""
    text = raw_name.strip().lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _DNS_NAME.fullmatch(text):
        raise ValueError(f"not a DNS name or an IP address: {raw_name[:80]!r}")
    return text


class Settings(BaseSettings):
    """Configuration of one appliance process (API, worker, Flower or CLI)."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", frozen=True, extra="ignore")

    state_dir: Path = Path(".appliance")

    # Redis: TLS only, one ACL user per role.
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_ca: Path | None = None
    redis_cert: Path | None = None
    redis_key: Path | None = None
    redis_username: str = "default"
    redis_password_file: Path | None = None
    redis_db: int = 0
    # When set, this service's Redis user is a short-lived one from OpenBao's database engine
    # (`database/creds/<role>`), not the static user and password file above.
    redis_lease_role: str | None = None
    # The stack's Redis memory limit in MiB (`maxmemory`, writes refused beyond it); 0: a quarter
    # of the host's memory, at least 256 MiB and at most 4 GiB (SECURITY.md, "Redis memory").
    redis_maxmemory_mb: int = Field(default=0, ge=0)
    # Whether the stack's Redis keeps an append-only file in its directory (`appliance serve
    # redis` on a volume, issue 14): accepted jobs, results and nonces survive its restart. Off:
    # a restart of Redis loses them, as the single-host stack always did.
    redis_appendonly: bool = False

    # OpenBao (Vault API). The service logs in with its own AppRole: role_id in a file, and a
    # single-use secret_id: the bootstrap's, response-wrapped, in the wrap file, or else the
    # successor its last login minted, kept beside it (`vault.successor_file`).
    vault_addr: str = "http://127.0.0.1:8200"
    vault_role_id_file: Path | None = None
    vault_secret_id_wrap_file: Path | None = None
    # Only for the operator's CLI (`appliance clients add`, `keys rotate`): a token file.
    vault_token_file: Path | None = None
    transit_mount: str = "transit"
    kv_mount: str = "kv"
    # Data keys (issue 16; SECURITY.md, "Envelope keys"): one transit data key seals messages of
    # one client for one purpose until it is this old, has sealed this many messages or this many
    # bytes; an unwrapped key opens envelopes for this long after it was unwrapped. Held in the
    # process that uses it only, wiped on eviction. Any of the first three at 0: a fresh key per
    # seal and a transit call per open.
    data_key_max_age_seconds: float = Field(default=60.0, ge=0, le=3600)
    data_key_max_messages: int = Field(default=1000, ge=0, le=1_000_000)
    data_key_max_bytes: int = Field(default=64 * 2**20, ge=0, le=2**34)
    data_key_max_keys: int = Field(default=512, ge=1, le=100_000)
    # How often a worker reads the task-message signing key's configuration again (its public
    # keys are pinned per version; a version retired by `keys rotate --min-decryption-version`
    # is refused at most this long after the retirement).
    signing_key_refresh_seconds: float = Field(default=30.0, gt=0, le=3600)

    result_ttl_seconds: int = Field(default=300, ge=1, le=86400)
    result_prefix: str = "result:"
    queue_name: str = "appliance"
    max_body_bytes: int = 256 * 1024
    # How old a signature's `created` may be, and how far ahead of this host's clock (CONTRACT
    # §2's 300 s and 30 s by default; a deployment may narrow or widen them).
    signature_window_seconds: int = Field(default=300, ge=1, le=3600)
    signature_future_skew_seconds: int = Field(default=30, ge=0, le=300)
    # The `@authority` values a signed request may name (issue 12, finding 19), comma-separated,
    # each as RFC 9421 normalises it: the host in lower case and the port unless it is the
    # scheme's default (`127.0.0.1:8000`, `appliance.example`). Empty: only the address and port
    # the connection arrived at (the local stack sets its `127.0.0.1:PORT` explicitly).
    api_authorities: Annotated[tuple[str, ...], NoDecode] = ()
    # Unauthenticated failures of one source are audited one by one only for the first of each
    # window this long; the rest are counted into one `auth.failures` entry when it ends.
    auth_failure_window_seconds: float = Field(default=10.0, ge=1, le=3600)

    # Slow clients (issue 12, finding 11; `api/_server.py`): a request's line and headers must
    # arrive within the first, its body within the second; a request arriving while this many
    # are in progress is answered 503; connections beyond the last are closed when accepted.
    api_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    api_body_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    api_limit_concurrency: int = Field(default=512, ge=1, le=65536)
    api_max_connections: int = Field(default=2048, ge=1, le=65536)
    # The proxies whose X-Forwarded-For names a request's source (red team of issue 12, item 3),
    # comma-separated addresses or networks. Empty (the default): no proxy is trusted and the
    # source is the socket's peer, so no caller chooses the source that is audited and that
    # unauthenticated failures are counted under.
    api_trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    # The API over TLS (issue 15): read by `appliance prepare` (and `up`), which records it in
    # stack.json and issues `tls/api.crt` from the stack's CA for loopback, the host's name and
    # the extra names (comma-separated DNS names or IP addresses) under which clients reach it.
    # Unset, a prepared stack keeps what it recorded; a new stack serves plain HTTP on loopback.
    api_tls: bool = False
    api_tls_names: Annotated[tuple[str, ...], NoDecode] = ()

    audit_log: Path | None = None

    # Task lifecycle. A message not acknowledged this long after delivery (its worker died) is
    # delivered again; keep it above the longest job (the policy's wall-clock maximum).
    visibility_timeout_seconds: int = Field(default=300, ge=1)
    # Workers beat this often; one silent for three beats is taken for dead.
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # A job whose worker died this many times (e.g. killed by the OOM killer) ends as failed.
    max_attempts: int = Field(default=3, ge=1, le=20)
    workflow_max_steps: int = Field(default=10, ge=1, le=100)

    # The worker starts as root (its sandbox fork servers need it), starts their launcher, then
    # becomes this user before it reads any credential (`worker.privileges`). None: no change.
    worker_user: str | None = None

    # Prometheus: `/metrics` (API) and the worker's endpoint answer only this bearer token.
    metrics_token_file: Path | None = None
    metrics_port: int = 0  # the worker's metrics port on loopback; 0: not served

    @field_validator("api_authorities", mode="before")
    @classmethod
    def _authorities(cls, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else list(value)
        authorities = tuple(str(item).strip().lower() for item in items if str(item).strip())
        for authority in authorities:
            if not _AUTHORITY.fullmatch(authority):
                raise ValueError(f"not a host[:port] authority: {authority[:80]!r}")
        return authorities

    @field_validator("api_trusted_proxies", mode="before")
    @classmethod
    def _trusted_proxies(cls, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else list(value)
        proxies = tuple(str(item).strip() for item in items if str(item).strip())
        for proxy in proxies:
            # `*` (uvicorn's "trust everyone") is no address: every caller would choose its source.
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"not an address or network: {proxy[:80]!r}") from None
        return proxies

    @field_validator("api_tls_names", mode="before")
    @classmethod
    def _tls_names(cls, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else list(value)
        names = (normalise_tls_name(str(item)) for item in items if str(item).strip())
        return tuple(dict.fromkeys(names))

    def service_files(self) -> ServiceFiles:
        """The files a long-running service (API, worker, Flower) needs to log in and audit.

        Raises ConfigurationError naming every missing setting: a service refuses to start
        half-configured rather than failing later (not an `assert`, which `python -O` drops).
        """
        missing = [
            f"APPLIANCE_{name.upper()}"
            for name in ("vault_role_id_file", "vault_secret_id_wrap_file", "audit_log")
            if getattr(self, name) is None
        ]
        if (
            missing
            or self.vault_role_id_file is None
            or self.vault_secret_id_wrap_file is None
            or self.audit_log is None
        ):
            raise ConfigurationError(f"missing settings: {', '.join(missing)}")
        return ServiceFiles(self.vault_role_id_file, self.vault_secret_id_wrap_file, self.audit_log)

    def approle_files(self) -> tuple[Path, Path]:
        """The service's AppRole role_id file and wrapped secret_id file, or ConfigurationError."""
        if self.vault_role_id_file is None or self.vault_secret_id_wrap_file is None:
            raise ConfigurationError(
                "missing settings: APPLIANCE_VAULT_ROLE_ID_FILE and "
                "APPLIANCE_VAULT_SECRET_ID_WRAP_FILE are both required"
            )
        return self.vault_role_id_file, self.vault_secret_id_wrap_file

    def redis_password(self) -> str | None:
        """Read the Redis password from its file, if one is configured."""
        if self.redis_password_file is None:
            return None
        return self.redis_password_file.read_text().strip()


#: Operator tuning read by every service of a stack: `APPLIANCE_*=value` lines in
#: `<state>/appliance.env` (the process environment wins over it).
SETTINGS_FILE = "appliance.env"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once: the environment, then `<state>/appliance.env`."""
    state = Path(os.environ.get("APPLIANCE_STATE", ".appliance"))
    return Settings(_env_file=state / SETTINGS_FILE)  # type: ignore[call-arg]
