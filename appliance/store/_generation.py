"""The client registry's generation token in Redis (see `appliance.registry`)."""

from __future__ import annotations

from secrets import token_hex

import redis

from . import _keys
from ._errors import redis_unavailable


class RedisGeneration:
    """The generation in Redis: the API reads it (read-only ACL), the operator renews it."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def current(self) -> str | None:
        """The current generation, or None when none was ever set."""
        with redis_unavailable():
            raw = self.redis.get(_keys.REGISTRY_GENERATION_KEY)
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def renew(self) -> None:
        """Replace the generation with a fresh one."""
        with redis_unavailable():
            self.redis.set(_keys.REGISTRY_GENERATION_KEY, token_hex(16))
