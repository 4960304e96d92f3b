"""The one boot of a long-running service (API, worker, Flower): log in to OpenBao with the
service's AppRole, then connect to Redis and open the audit log.

`login` is all Flower needs; `connect` is the API's and the worker's. The worker calls it only
after spawning its sandbox fork servers, so no process that forks user code ever held a token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .audit import AuditLog, TransitSigner
from .keyservice import CacheBounds, DataKeyCache
from .settings import Settings
from .store import RedisStores
from .vault import Transit, VaultSession


def login(settings: Settings) -> VaultSession:
    """An OpenBao session from the service's AppRole (role_id file and wrapped secret_id)."""
    role_id, wrap = settings.approle_files()
    return VaultSession.from_approle(settings.vault_addr, role_id, wrap)


@dataclass(frozen=True)
class Connected:
    """A service's session, key service, stores and audit log."""

    session: VaultSession
    transit: Transit
    stores: RedisStores
    audit: AuditLog


def connect(settings: Settings, source: str) -> Connected:
    """Log in, connect to Redis as this service's user, and open the audit log as `source`
    (its checkpoint timer started)."""
    files = settings.service_files()
    session = login(settings)
    stores = RedisStores.connect(settings, session)
    transit = Transit(
        session,
        settings.transit_mount,
        cache=DataKeyCache(
            CacheBounds(
                settings.data_key_max_age_seconds,
                settings.data_key_max_messages,
                settings.data_key_max_bytes,
                settings.data_key_max_keys,
            )
        ),
        signing_refresh_seconds=settings.signing_key_refresh_seconds,
        # The API reads the keys' generation from Redis (`registry:*` is readable to it only);
        # workers take it from each sealed job.
        generation=stores.key_generation.current if source == "api" else None,
    )
    audit = AuditLog.open(files.audit_log, TransitSigner(transit), source=source)
    audit.start_checkpoint_timer()
    return Connected(session, transit, stores, audit)
