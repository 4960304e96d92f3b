"""Request nonces per key id, kept for the signature window (a replay is refused)."""

from __future__ import annotations

import hashlib

import redis

from . import _keys
from ._errors import redis_unavailable


class RedisNonces:
    """Nonces per key id in Redis; only a digest of the nonce is stored."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def claim(self, keyid: str, nonce: str, ttl_seconds: int) -> bool:
        """True the first time `nonce` is seen for `keyid` within `ttl_seconds`."""
        digest = hashlib.sha256(nonce.encode()).hexdigest()
        with redis_unavailable():
            return bool(self.redis.set(_keys.nonce(keyid, digest), "1", nx=True, ex=ttl_seconds))
