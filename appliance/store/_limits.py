"""Per-client rate limits: fixed windows of jobs per minute and per UTC day.

A refused request is not counted. Each step of a workflow counts as one job. The windows are
computed once (`_windows`); `RedisRateLimiter` counts them in Redis, `UnsafeMemoryRateLimiter`
in a dict against an injected clock (unit tests only: nothing is shared between processes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import redis

from ..errors import RateLimited
from . import _keys
from ._errors import redis_unavailable

#: (window suffix, limit, seconds left in the window)
_Window = tuple[str, int, int]


class Quota(Protocol):
    """What a limit is counted against (a registry `Client`)."""

    @property
    def keyid(self) -> str: ...
    @property
    def rate_per_minute(self) -> int: ...
    @property
    def daily_quota(self) -> int: ...


class RateLimiter(Protocol):
    """Counts jobs per client, or raises RateLimited (counting nothing)."""

    def hit(self, client: Quota, cost: int, now: float) -> None: ...


def _windows(client: Quota, now: float) -> list[_Window]:
    windows = [(f"m:{int(now // 60)}", client.rate_per_minute, 60 - int(now % 60))]
    if client.daily_quota:
        windows.append((f"d:{int(now // 86400)}", client.daily_quota, 86400 - int(now % 86400)))
    return windows


def _refuse(over: list[_Window]) -> None:
    if over:
        suffix, limit, left = over[0]
        what = "jobs per minute" if suffix.startswith("m:") else "jobs per day"
        raise RateLimited(f"over the client's limit of {limit} {what}", retry_after=left)


class RedisRateLimiter:
    """Fixed windows in Redis, counted and (when over) uncounted in transactions."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def hit(self, client: Quota, cost: int, now: float) -> None:
        """Count `cost` jobs for `client`, or raise RateLimited (counting nothing)."""
        windows = _windows(client, now)
        keys = [_keys.ratelimit(client.keyid, suffix) for suffix, _, _ in windows]
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
        _refuse(over)


class UnsafeMemoryRateLimiter:
    """The same windows in process memory, for unit tests."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, float]] = {}

    def hit(self, client: Quota, cost: int, now: float) -> None:
        """Count `cost` jobs for `client`, or raise RateLimited (counting nothing)."""
        windows = _windows(client, now)
        keys = [_keys.ratelimit(client.keyid, suffix) for suffix, _, _ in windows]
        with self._lock:
            counts = [self._count(key) + cost for key in keys]
            over = [w for w, count in zip(windows, counts, strict=True) if count > w[1]]
            if not over:
                for key, count, (_, _, left) in zip(keys, counts, windows, strict=True):
                    self._counts[key] = (count, self.clock() + left + 1)
        _refuse(over)

    def _count(self, key: str) -> int:
        count, expires = self._counts.get(key, (0, 0.0))
        return count if self.clock() < expires else 0
