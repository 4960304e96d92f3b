"""The one seam to Redis: results, claims, heartbeats, workflow records, nonces, rate limits,
idempotency records, per-client stored bytes and the registry's generation, each key named once
in `_keys`. No other module of the appliance builds a Redis key or translates a Redis error."""

from . import _keys as keys
from ._budget import Budgeted, StoredBytes, check_storage_budget
from ._bundle import RedisStores
from ._connection import broker_url, connect, ssl_options
from ._errors import redis_unavailable
from ._generation import RedisGeneration
from ._idempotency import (
    IdempotencyRecord,
    IdempotencyStore,
    RedisIdempotency,
    Reservation,
    UnsafeMemoryIdempotency,
)
from ._leases import ProcessRedisLease, RedisLease, install
from ._limits import Quota, RateLimiter, RedisRateLimiter, UnsafeMemoryRateLimiter
from ._memory import UnsafeMemoryResultStore
from ._nonces import RedisNonces
from ._results import PENDING_TTL_SECONDS, Claim, RedisResultStore, ResultStore, Stored

__all__ = [
    "PENDING_TTL_SECONDS",
    "Budgeted",
    "Claim",
    "IdempotencyRecord",
    "IdempotencyStore",
    "ProcessRedisLease",
    "Quota",
    "RateLimiter",
    "RedisGeneration",
    "RedisIdempotency",
    "RedisLease",
    "RedisNonces",
    "RedisRateLimiter",
    "RedisResultStore",
    "RedisStores",
    "Reservation",
    "ResultStore",
    "Stored",
    "StoredBytes",
    "UnsafeMemoryIdempotency",
    "UnsafeMemoryRateLimiter",
    "UnsafeMemoryResultStore",
    "broker_url",
    "check_storage_budget",
    "connect",
    "install",
    "keys",
    "redis_unavailable",
    "ssl_options",
]
