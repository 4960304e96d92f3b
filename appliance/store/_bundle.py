"""Every Redis-backed store of a service, on one connection."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import Settings
from ..vault import VaultSession
from . import _keys
from ._connection import connect
from ._generation import RedisGeneration
from ._idempotency import RedisIdempotency
from ._limits import RedisRateLimiter
from ._nonces import RedisNonces
from ._results import RedisResultStore


@dataclass(frozen=True)
class RedisStores:
    """The result store, nonces, rate limits, idempotency records and registry generation of
    one service."""

    results: RedisResultStore
    nonces: RedisNonces
    limiter: RedisRateLimiter
    generation: RedisGeneration
    idempotency: RedisIdempotency
    #: The transit keys' generation (`registry:keys`), renewed by `appliance keys rotate`.
    key_generation: RedisGeneration

    @classmethod
    def connect(cls, settings: Settings, session: VaultSession) -> RedisStores:
        """Connect as this service's Redis user (leased through `session` when configured)."""
        client = connect(settings, session)
        return cls(
            RedisResultStore(client, settings.result_prefix, settings.result_ttl_seconds),
            RedisNonces(client),
            RedisRateLimiter(client),
            RedisGeneration(client),
            RedisIdempotency(client),
            RedisGeneration(client, _keys.KEYS_GENERATION_KEY),
        )
