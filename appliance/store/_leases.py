"""Short-lived Redis users from OpenBao's database engine, for redis-py and kombu alike.

A `RedisLease` holds one role's current user (`database/creds/<role>`: a `V_…` ACL user whose
rules come from `policies/redis-acl.json`) and hands it to every new Redis connection through
redis-py's `CredentialProvider` interface. A background thread renews the lease at half-life
and replaces it, ahead of its end, when renewal fails or the max TTL is near; listeners (a
redis-py pool) are told so that idle connections move to the new user before the old one is
deleted.

A revoked lease deletes the user in Redis, which closes its connections. The reconnect asks for
credentials again, and `get_credentials` first renews the lease it holds (one OpenBao call per
new connection, and connections are pooled): a lease that is gone is replaced at once. Only
when OpenBao is unreachable are the held credentials handed out unchecked.

kombu's Redis transport takes a credential provider only as a class to instantiate without
arguments (`?credential_provider=module:Class` on the broker URL): `ProcessRedisLease` is that
class, a view of the lease this process installed with `install`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from ..errors import ApplianceError, DependencyUnavailable
from ..vault import VaultSession

log = logging.getLogger("appliance.redis_leases")

#: Replace a lease when less than this share of its TTL would remain after renewal.
_REPLACE_BELOW = 1 / 3


@dataclass(frozen=True)
class Lease:
    """One issued Redis user and its lease."""

    lease_id: str = field(repr=False)
    username: str
    password: str = field(repr=False)
    ttl: float
    renew_at: float


class RedisLease(redis.CredentialProvider):
    """The current Redis user of one role, renewed and replaced before it ends."""

    def __init__(
        self,
        session: VaultSession,
        role: str,
        *,
        mount: str = "database",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.role = role
        self.mount = mount
        self._clock = clock
        self._lock = threading.Lock()
        self._current: Lease | None = None
        self._listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- redis-py -------------------------------------------------------------------------

    def get_credentials(self) -> tuple[str, str]:
        """Credentials for a new connection: the held user if its lease still renews, else a
        new one."""
        try:
            with self._lock:
                lease = self._current
                if lease is None:
                    lease = self._issue()
                else:
                    lease = self._renew_or_replace(lease)
        except ApplianceError as exc:
            # To redis-py (and kombu) this is a connection that cannot be made yet: they retry.
            raise redis.ConnectionError(f"no Redis user for {self.role}: {exc}") from exc
        return lease.username, lease.password

    # ---- lifecycle ------------------------------------------------------------------------

    def on_replace(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each replacement (e.g. to drop a pool's idle connections)."""
        self._listeners.append(listener)

    def start(self) -> RedisLease:
        """Take a first lease now (fail fast) and renew it in the background."""
        self.get_credentials()
        self._thread = threading.Thread(
            target=self._run, name=f"redis-lease-{self.role}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (the lease then ends at its TTL)."""
        self._stop.set()

    @property
    def username(self) -> str | None:
        """The current user's name (for logs and tests; never the password)."""
        return self._current.username if self._current else None

    def _run(self) -> None:
        while not self._stop.wait(self._seconds_to_renewal()):
            try:
                with self._lock:
                    if self._current is not None:
                        self._renew_or_replace(self._current)
            except ApplianceError:
                log.warning("Redis lease of %s not renewed; retrying", self.role)
                self._stop.wait(2.0)

    def _seconds_to_renewal(self) -> float:
        lease = self._current
        return 1.0 if lease is None else max(0.5, lease.renew_at - self._clock())

    # ---- OpenBao --------------------------------------------------------------------------

    def _issue(self) -> Lease:
        response = self.session.call(lambda c: c.adapter.get(f"/v1/{self.mount}/creds/{self.role}"))
        ttl = float(response["lease_duration"])
        lease = Lease(
            str(response["lease_id"]),
            str(response["data"]["username"]),
            str(response["data"]["password"]),
            ttl,
            self._clock() + ttl / 2,
        )
        replaced = self._current is not None
        self._current = lease
        if replaced:
            log.info("Redis user of %s replaced", self.role)
            for listener in self._listeners:
                listener()
        return lease

    def _renew_or_replace(self, lease: Lease) -> Lease:
        try:
            response = self.session.call(
                lambda c: c.adapter.put("/v1/sys/leases/renew", json={"lease_id": lease.lease_id})
            )
        except DependencyUnavailable:
            return lease  # OpenBao is down: the lease may well be alive; retry later.
        except ApplianceError:
            return self._issue()  # Revoked, expired or unknown: a new user.
        ttl = float(response["lease_duration"])
        if ttl < lease.ttl * _REPLACE_BELOW:
            return self._issue()  # Near the max TTL: move to a new user before this one ends.
        renewed = Lease(
            lease.lease_id, lease.username, lease.password, lease.ttl, self._clock() + ttl / 2
        )
        self._current = renewed
        return renewed


_process_lease: RedisLease | None = None


def install(lease: RedisLease) -> None:
    """Make `lease` the one `ProcessRedisLease` hands out in this process."""
    global _process_lease
    _process_lease = lease


class ProcessRedisLease(redis.CredentialProvider):
    """The process's installed lease, for kombu (which instantiates the provider itself)."""

    def get_credentials(self) -> tuple[str, str]:
        if _process_lease is None:
            raise redis.AuthenticationError("no Redis lease installed in this process yet")
        return _process_lease.get_credentials()
