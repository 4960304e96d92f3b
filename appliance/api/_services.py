"""Composition of the API: every collaborator is built once here, at start-up, and handed to
the steps that need it. Nothing below this module reaches for a service it was not given."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

import sandbox

from ..audit import AuditLog, AuditSink, TransitSigner
from ..errors import RateLimited
from ..queue import HEARTBEAT_KEY, make_celery, publish
from ..registry import Client, RedisGeneration, Registry
from ..results import ResultStore, redis_unavailable
from ..settings import Settings
from ..vault import Transit, VaultSession
from ._jobs import Publish, Results, Submissions
from ._requests import Authenticator

#: A worker whose last heartbeat is older than this is not counted by /readyz.
WORKER_FRESH_SECONDS = 20


class RateLimiter:
    """Per-client fixed windows in Redis: jobs per minute and per UTC day.

    A refused request is not counted. Each step of a workflow counts as one job.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def hit(self, client: Client, cost: int, now: float) -> None:
        """Count `cost` jobs for `client`, or raise RateLimited (counting nothing)."""
        windows = [(f"m:{int(now // 60)}", client.rate_per_minute, 60 - int(now % 60))]
        if client.daily_quota:
            windows.append((f"d:{int(now // 86400)}", client.daily_quota, 86400 - int(now % 86400)))
        keys = [f"ratelimit:{client.keyid}:{suffix}" for suffix, _, _ in windows]
        with redis_unavailable():
            pipe = self.redis.pipeline(transaction=True)
            for key, (_, _, left) in zip(keys, windows, strict=True):
                pipe.incrby(key, cost)
                pipe.expire(key, left + 1)
            counts = pipe.execute()[::2]
            over = [w for w, count in zip(windows, counts, strict=True) if count > w[1]]
            if over:
                pipe = self.redis.pipeline(transaction=True)
                for key in keys:
                    pipe.decrby(key, cost)
                pipe.execute()
        if over:
            suffix, limit, left = over[0]
            what = "jobs per minute" if suffix.startswith("m:") else "jobs per day"
            raise RateLimited(f"over the client's limit of {limit} {what}", retry_after=left)


class RedisNonces:
    """Nonces per key id in Redis, kept for the signature window."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def claim(self, keyid: str, nonce: str, ttl_seconds: int) -> bool:
        digest = hashlib.sha256(nonce.encode()).hexdigest()
        with redis_unavailable():
            return bool(self.redis.set(f"nonce:{keyid}:{digest}", "1", nx=True, ex=ttl_seconds))


@dataclass
class Services:
    """What the API's routes talk to; built once at start-up."""

    settings: Settings
    registry: Registry
    transit: Transit
    store: ResultStore
    nonces: RedisNonces
    publish: Publish
    vault: VaultSession
    policy: sandbox.Policy
    audit: AuditSink
    limiter: RateLimiter
    metrics_token: bytes | None = None
    clock: Callable[[], float] = time.time
    authenticator: Authenticator = field(init=False)
    submissions: Submissions = field(init=False)
    results: Results = field(init=False)

    def __post_init__(self) -> None:
        self.authenticator = Authenticator(self.registry, self.nonces, self.clock)
        self.submissions = Submissions(
            self.transit, self.store, self.publish, self.audit, self.clock
        )
        self.results = Results(self.transit, self.store, self.audit, self.clock)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Log in with the API's AppRole and connect to Redis as the `api` user."""
        from ..observability import read_token
        from ..redis_conn import connect

        files = settings.service_files()
        session = VaultSession.from_approle(
            settings.vault_addr, files.role_id_file, files.secret_id_wrap_file
        )
        client = connect(settings, session)
        transit = Transit(session, settings.transit_mount)
        audit = AuditLog.open(files.audit_log, TransitSigner(transit), source="api")
        audit.start_checkpoint_timer()
        celery = make_celery(settings, "appliance-api")
        return cls(
            settings=settings,
            registry=Registry(session, settings.kv_mount, generation=RedisGeneration(client)),
            transit=transit,
            store=ResultStore(client, settings.result_prefix, settings.result_ttl_seconds),
            nonces=RedisNonces(client),
            publish=functools.partial(publish, celery, settings),
            vault=session,
            policy=sandbox.Policy.load(),
            audit=audit,
            limiter=RateLimiter(client),
            metrics_token=read_token(settings.metrics_token_file),
        )

    def readiness(self) -> dict[str, bool]:
        """Redis, OpenBao and at least one live worker."""
        checks = {"redis": False, "vault": self.vault.healthy(), "worker": False}
        try:
            checks["redis"] = bool(self.store.redis.ping())
            fresh = self.store.redis.zcount(
                HEARTBEAT_KEY, self.clock() - WORKER_FRESH_SECONDS, "+inf"
            )
            checks["worker"] = int(fresh) > 0
        except redis.RedisError:
            pass
        return checks
