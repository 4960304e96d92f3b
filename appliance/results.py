"""Result keys and the result store in Redis: ciphertext under `result:<key>` with a TTL, and a
small `pending:<key>` record (client and state, no payload) while the job is queued or running."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import redis

from .errors import BadRequest, DependencyUnavailable

RESULT_KEY_PATTERN = re.compile(
    r"(?P<function>[A-Za-z][A-Za-z0-9_]{0,99})_(?P<ms>\d{1,16})_(?P<rand>[0-9a-f]{32})"
)
PENDING_TTL_SECONDS = 24 * 3600


def new_result_key(function: str, now_ms: int) -> str:
    """`{function}_{unix_time_ms}_{128 random bits, hex}`."""
    return f"{function}_{now_ms}_{secrets.token_hex(16)}"


def check_result_key(untrusted_key: str) -> str:
    """Return the key if it has the contract's shape, else raise BadRequest."""
    if not isinstance(untrusted_key, str) or not RESULT_KEY_PATTERN.fullmatch(untrusted_key):
        raise BadRequest("key is not a result key", code="invalid_key")
    return untrusted_key


@dataclass(frozen=True)
class Stored:
    """What Redis holds for a key: a sealed result, or a pending record."""

    client: str
    state: str  # "queued", "running" or "done"
    sealed: str | None = None
    ttl_ms: int = 0


class ResultStore:
    """Reads and writes result records; translates Redis errors at this seam."""

    def __init__(self, client: redis.Redis, prefix: str = "result:", ttl_seconds: int = 300):
        self.redis = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds

    def _pending(self, key: str) -> str:
        return f"pending:{key}"

    def mark(self, key: str, client: str, state: str, task_id: str) -> None:
        """Record that the job for `key` is queued or running."""
        record = json.dumps({"client": client, "state": state, "task_id": task_id})
        try:
            self.redis.set(self._pending(key), record, ex=PENDING_TTL_SECONDS)
        except redis.RedisError as exc:
            raise DependencyUnavailable("Redis is unreachable") from exc

    def put(self, key: str, client: str, sealed: str) -> None:
        """Store the sealed result with the TTL and drop the pending record, atomically."""
        value = json.dumps({"client": client, "sealed": sealed})
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.prefix + key, value, ex=self.ttl_seconds)
            pipe.delete(self._pending(key))
            pipe.execute()
        except redis.RedisError as exc:
            raise DependencyUnavailable("Redis is unreachable") from exc

    def claim(self, nonce: str, ttl_seconds: int) -> str | None:
        """Mark a message's nonce as running; return its previous state ("running", "done")
        or None for a first delivery. Kept until the message expires, so a replay is known."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(f"claim:{nonce}", "running", nx=True, ex=max(1, ttl_seconds))
            pipe.get(f"claim:{nonce}")
            created, state = pipe.execute()
        except redis.RedisError as exc:
            raise DependencyUnavailable("Redis is unreachable") from exc
        return None if created else (state.decode() if state else None)

    def finish_claim(self, nonce: str, ttl_seconds: int) -> None:
        """Mark a message's nonce as done: any later delivery of it is a replay."""
        try:
            self.redis.set(f"claim:{nonce}", "done", ex=max(1, ttl_seconds))
        except redis.RedisError as exc:
            raise DependencyUnavailable("Redis is unreachable") from exc

    def has_result(self, key: str) -> bool:
        """Whether a sealed result already exists (a job never runs twice for one key)."""
        try:
            return bool(self.redis.exists(self.prefix + key))
        except redis.RedisError as exc:
            raise DependencyUnavailable("Redis is unreachable") from exc

    def get(self, key: str) -> Stored | None:
        """The record for `key`, or None when unknown or expired."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.prefix + key)
            pipe.pttl(self.prefix + key)
            pipe.get(self._pending(key))
            raw, ttl_ms, pending = pipe.execute()
        except redis.RedisError as exc:
            raise DependencyUnavailable("Redis is unreachable") from exc
        if raw is not None:
            body: dict[str, Any] = json.loads(raw)
            return Stored(body["client"], "done", body["sealed"], max(0, int(ttl_ms)))
        if pending is not None:
            record: dict[str, Any] = json.loads(pending)
            return Stored(record["client"], record["state"])
        return None
