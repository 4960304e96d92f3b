"""Redis connections: TLS with a client certificate, an ACL user per role, and a password read
from its file at every connect, so a rotated credential is picked up by new connections."""

from __future__ import annotations

import ssl
from pathlib import Path

import redis

from ..settings import Settings
from ..vault import VaultSession
from ._leases import RedisLease, install


class FileCredentialProvider(redis.CredentialProvider):
    """Username fixed, password read from a file each time a connection is made."""

    def __init__(self, username: str, password_file: Path | None) -> None:
        self.username = username
        self.password_file = password_file

    def get_credentials(self) -> tuple[str, str] | tuple[str]:
        if self.password_file is None:
            return (self.username,)
        return (self.username, self.password_file.read_text().strip())


def ssl_options(settings: Settings) -> dict[str, object]:
    """TLS options shared by redis-py and kombu."""
    return {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(settings.redis_ca) if settings.redis_ca else None,
        "ssl_certfile": str(settings.redis_cert) if settings.redis_cert else None,
        "ssl_keyfile": str(settings.redis_key) if settings.redis_key else None,
    }


def connect(settings: Settings, vault: VaultSession | None = None) -> redis.Redis:
    """A redis-py client for this service's role.

    With `settings.redis_lease_role`, its user is a short-lived one from OpenBao (`vault` is the
    service's session): the lease is taken now, renewed in the background, and installed for
    this process's Celery connections too (see `broker_url`).
    """
    provider: redis.CredentialProvider
    lease: RedisLease | None = None
    if settings.redis_lease_role:
        if vault is None:
            raise ValueError("a Redis lease needs the service's OpenBao session")
        lease = RedisLease(vault, settings.redis_lease_role).start()
        install(lease)
        provider = lease
    else:
        provider = FileCredentialProvider(settings.redis_username, settings.redis_password_file)
    client = redis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        db=settings.redis_db,
        ssl=True,
        credential_provider=provider,
        socket_timeout=5,
        socket_connect_timeout=3,
        health_check_interval=30,
        **ssl_options(settings),  # type: ignore[arg-type]
    )
    if lease is not None:
        # Idle connections move to the new user at once; busy ones when they are next opened.
        lease.on_replace(lambda: client.connection_pool.disconnect(inuse_connections=False))
    return client


def broker_url(settings: Settings) -> str:
    """The Celery broker URL for this service's role (the password is never logged: Celery
    masks it, and our logs never print the URL).

    With a Redis lease the URL carries no credentials: kombu's Redis transport instantiates
    `ProcessRedisLease` (named in the query) for its connection pools, and it hands out the lease
    `connect` installed; every new broker connection thus logs in as the current user.
    """
    host = f"{settings.redis_host}:{settings.redis_port}/{settings.redis_db}"
    if settings.redis_lease_role:
        return f"rediss://{host}?credential_provider=appliance.store:ProcessRedisLease"
    password = settings.redis_password() or ""
    return f"rediss://{settings.redis_username}:{password}@{host}"
