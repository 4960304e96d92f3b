"""Redis connections: TLS with a client certificate, an ACL user per role, and a password read
from its file at every connect, so a rotated credential is picked up by new connections."""

from __future__ import annotations

import ssl
from pathlib import Path

import redis

from .settings import Settings


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


def connect(settings: Settings) -> redis.Redis:
    """A redis-py client for this service's role."""
    return redis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        db=settings.redis_db,
        ssl=True,
        credential_provider=FileCredentialProvider(
            settings.redis_username, settings.redis_password_file
        ),
        socket_timeout=5,
        socket_connect_timeout=3,
        health_check_interval=30,
        **ssl_options(settings),  # type: ignore[arg-type]
    )


def broker_url(settings: Settings) -> str:
    """The Celery broker URL for this service's role (the password is never logged: Celery
    masks it, and our logs never print the URL)."""
    password = settings.redis_password() or ""
    return (
        f"rediss://{settings.redis_username}:{password}@{settings.redis_host}:"
        f"{settings.redis_port}/{settings.redis_db}"
    )
