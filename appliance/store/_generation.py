"""Generation tokens in Redis: the client registry's (see `appliance.registry`) and the transit
keys' (see `appliance.keyservice.DataKeyCache`)."""

from __future__ import annotations

from secrets import token_hex

import redis

from . import _keys
from ._errors import redis_unavailable


class RedisGeneration:
    """The generation in Redis: the API reads it (read-only ACL), the operator renews it."""

    def __init__(self, client: redis.Redis, key: str = _keys.REGISTRY_GENERATION_KEY) -> None:
        self.redis = client
        self.key = key

    def current(self) -> str | None:
        """The current generation, or None when none was ever set."""
        with redis_unavailable():
            raw = self.redis.get(self.key)
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def renew(self) -> None:
        """Replace the generation with a fresh one."""
        with redis_unavailable():
            self.redis.set(self.key, token_hex(16))
