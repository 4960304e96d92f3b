"""Composition of the API: every collaborator is built once here, at start-up, and handed to
the steps that need it. Nothing below this module reaches for a service it was not given."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import sandbox

from ..audit import AuditSink
from ..errors import DependencyUnavailable
from ..queue import make_celery, publish
from ..registry import Registry
from ..services import connect
from ..settings import Settings
from ..signatures import NonceStore, Window
from ..store import (
    IdempotencyStore,
    RateLimiter,
    ResultStore,
)
from ..vault import Transit, VaultSession
from ._auth_failures import AuthFailures
from ._idempotency import Idempotency
from ._jobs import Publish, Results, Submissions
from ._requests import Authenticator

#: A worker whose last heartbeat is older than this is not counted by /readyz.
WORKER_FRESH_SECONDS = 20


@dataclass
class Services:
    """What the API's routes talk to; built once at start-up."""

    settings: Settings
    registry: Registry
    transit: Transit
    store: ResultStore
    nonces: NonceStore
    publish: Publish
    vault: VaultSession
    policy: sandbox.Policy
    audit: AuditSink
    limiter: RateLimiter
    idempotency: IdempotencyStore
    metrics_token: bytes | None = None
    clock: Callable[[], float] = time.time
    authenticator: Authenticator = field(init=False)
    auth_failures: AuthFailures = field(init=False)
    submissions: Submissions = field(init=False)
    results: Results = field(init=False)

    def __post_init__(self) -> None:
        window = Window(
            self.settings.signature_window_seconds, self.settings.signature_future_skew_seconds
        )
        self.authenticator = Authenticator(
            self.registry, self.nonces, self.clock, window, self.settings.api_authorities
        )
        self.auth_failures = AuthFailures(
            self.audit, self.clock, self.settings.auth_failure_window_seconds
        )
        # A retry may arrive as long as a signature made after the first request is accepted.
        retries = Idempotency(self.transit, self.idempotency, window.max_age + window.future_skew)
        self.submissions = Submissions(
            self.transit, self.store, self.publish, self.audit, self.clock, retries
        )
        self.results = Results(self.transit, self.store, self.audit, self.clock)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Log in with the API's AppRole and connect to Redis as the `api` user."""
        from ..observability import read_token

        connected = connect(settings, "api")
        stores = connected.stores
        celery = make_celery(settings, "appliance-api")
        return cls(
            settings=settings,
            registry=Registry(connected.session, settings.kv_mount, generation=stores.generation),
            transit=connected.transit,
            store=stores.results,
            nonces=stores.nonces,
            publish=functools.partial(publish, celery, settings),
            vault=connected.session,
            policy=sandbox.Policy.load(),
            audit=connected.audit,
            limiter=stores.limiter,
            idempotency=stores.idempotency,
            metrics_token=read_token(settings.metrics_token_file),
        )

    def readiness(self) -> dict[str, bool]:
        """Redis, OpenBao and at least one live worker."""
        checks = {"redis": self.store.ping(), "vault": self.vault.healthy(), "worker": False}
        if checks["redis"]:
            try:
                fresh = self.store.live_workers(self.clock() - WORKER_FRESH_SECONDS)
            except DependencyUnavailable:
                fresh = 0
            checks["worker"] = fresh > 0
        return checks
