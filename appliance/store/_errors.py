"""The one translation of Redis errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from ..errors import DependencyUnavailable


@contextmanager
def redis_unavailable() -> Iterator[None]:
    """Translate Redis errors at the seam: the request or job waits for Redis (503, retry)."""
    try:
        yield
    except redis.RedisError as exc:
        raise DependencyUnavailable("Redis is unreachable") from exc
