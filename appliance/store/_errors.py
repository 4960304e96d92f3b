"""The one translation of Redis errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from ..errors import DependencyUnavailable


@contextmanager
def redis_unavailable() -> Iterator[None]:
    """Translate Redis errors at the seam: the request or job waits for Redis (503, retry).

    Redis at its `maxmemory` refuses writes (`noeviction`): that is `storage_full`, so that an
    operator tells a full Redis from a down one; the worker retries the job all the same.
    """
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        raise DependencyUnavailable(
            "Redis is at its memory limit and refuses writes", code="storage_full"
        ) from exc
    except redis.RedisError as exc:
        raise DependencyUnavailable("Redis is unreachable") from exc
