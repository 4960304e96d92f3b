"""The one translation of Redis errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from ..errors import DependencyUnavailable
from ._records import lost


@contextmanager
def redis_unavailable(code: str = "record_lost") -> Iterator[None]:
    """Translate Redis errors at the seam: the request or job waits for Redis (503, retry).

    Redis at its `maxmemory` refuses writes (`noeviction`): that is `storage_full`, so that an
    operator tells a full Redis from a down one; the worker retries the job all the same. A key
    of another type than the one we write (WRONGTYPE: junk put there) is no outage: it is
    `RecordLost` with `code`, as a value that does not parse is (`_records`).
    """
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        raise DependencyUnavailable(
            "Redis is at its memory limit and refuses writes", code="storage_full"
        ) from exc
    except redis.exceptions.ResponseError as exc:
        if "WRONGTYPE" in str(exc):  # Alone, or "Command # N (…) of pipeline caused error: …".
            raise lost("Redis", "a key of another type", code) from exc
        raise DependencyUnavailable("Redis is unreachable") from exc
    except redis.RedisError as exc:
        raise DependencyUnavailable("Redis is unreachable") from exc
