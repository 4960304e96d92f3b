"""`UnsafeMemoryResultStore`: the result store in a dict, for unit tests only.

Unsafe because nothing is shared between processes, nothing survives a restart and nothing is
encrypted at rest: it exists so the API's and the worker's rules can be tested without Redis.
It is held to the same contract suite as `RedisResultStore` (`tests/unit/store/contract.py`),
TTLs included, against an injected clock.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _keys
from ._budget import StoredBytes
from ._results import (
    PENDING_TTL_SECONDS,
    Claim,
    Pending,
    Stored,
    revoke_record,
    revoked,
    stored_record,
)


class UnsafeMemoryResultStore:
    """A `ResultStore` in process memory with Redis's expiry semantics."""

    def __init__(
        self,
        prefix: str = _keys.RESULT,
        ttl_seconds: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._lock = threading.RLock()
        self._values: dict[str, Any] = {}
        self._expires: dict[str, float] = {}
        self._beats: dict[str, float] = {}

    # ---- a tiny keyspace with expiry ------------------------------------------------------

    def _get(self, name: str) -> Any:
        expires = self._expires.get(name)
        if expires is not None and self.clock() >= expires:
            self._values.pop(name, None)
            self._expires.pop(name, None)
        return self._values.get(name)

    def _set(self, name: str, value: Any, ttl: float | None, keepttl: bool = False) -> None:
        self._values[name] = value
        if not keepttl:
            self._expires.pop(name, None)
            if ttl is not None:
                self._expires[name] = self.clock() + ttl

    def _delete(self, *names: str) -> None:
        for name in names:
            self._values.pop(name, None)
            self._expires.pop(name, None)

    def keys(self) -> list[str]:
        """Every live key (what a SCAN of Redis would list, for the key-prefix test)."""
        with self._lock:
            return [k for k in list(self._values) if self._get(k) is not None]

    # ---- results ----------------------------------------------------------------------------

    def mark(self, key: str, client: str, state: str, task_id: str) -> None:
        record = {"client": client, "state": state, "task_id": task_id}
        with self._lock:
            self._set(_keys.pending(key), json.dumps(record), PENDING_TTL_SECONDS)

    def start(self, key: str, client: str, task_id: str) -> bool:
        with self._lock:
            if revoked(self._get(_keys.pending(key))):
                return False
            self.mark(key, client, "running", task_id)
        return True

    def put(self, key: str, client: str, sealed: str) -> None:
        with self._lock:
            self._put(key, client, sealed)

    def _put(self, key: str, client: str, sealed: str) -> None:
        record = json.dumps({"client": client, "sealed": sealed})
        self._set(self.prefix + key, record, self.ttl_seconds)
        self._delete(_keys.pending(key))
        sizes = dict(self._get(_keys.storage(client)) or {})
        sizes[key] = len(record.encode())
        self._set(_keys.storage(client), sizes, self.ttl_seconds)

    def put_many(
        self, results: dict[str, str], client: str, workflow_id: str | None = None
    ) -> None:
        with self._lock:
            for key, sealed in results.items():
                self._put(key, client, sealed)
            if workflow_id is not None:
                self._delete(_keys.workflow(workflow_id))

    def revoke(self, key: str, client: str) -> str | None:
        with self._lock:
            answer, revoked = revoke_record(self._get(_keys.pending(key)), client)
            if revoked is not None:
                self._set(_keys.pending(key), revoked, None, keepttl=True)
            return answer

    def state(self, key: str) -> str | None:
        with self._lock:
            raw = self._get(_keys.pending(key))
        return None if raw is None else Pending.parse(raw).state

    def delete(self, key: str) -> None:
        with self._lock:
            self._delete(self.prefix + key, _keys.pending(key))

    def storage_use(self, client: str) -> list[StoredBytes]:
        with self._lock:
            sizes: dict[str, int] = self._get(_keys.storage(client)) or {}
            live = {k: n for k, n in sizes.items() if self._get(self.prefix + k) is not None}
            if sizes and live != sizes:
                self._values[_keys.storage(client)] = live
            return [StoredBytes(n, self._ttl_ms(self.prefix + k)) for k, n in live.items()]

    def storage_over(self, client: str, budget: int) -> list[StoredBytes] | None:
        use = self.storage_use(client)
        return None if sum(item.size for item in use) <= budget else use

    def _ttl_ms(self, name: str) -> int:
        return max(0, int((self._expires[name] - self.clock()) * 1000))

    def has_result(self, key: str) -> bool:
        with self._lock:
            return self._get(self.prefix + key) is not None

    def get(self, key: str) -> Stored | None:
        with self._lock:
            raw = self._get(self.prefix + key)
            left = self._expires[self.prefix + key] - self.clock() if raw is not None else 0.0
            pending = self._get(_keys.pending(key))
        return stored_record(raw, int(left * 1000), pending)

    # ---- claims and heartbeats ----------------------------------------------------------------

    def claim(self, nonce: str, ttl_seconds: int, owner: str) -> Claim | None:
        with self._lock:
            raw = self._get(_keys.claim(nonce))
            if raw is not None:
                return Claim.parse(raw)
            record = {"state": "running", "owner": owner, "attempts": 1}
            self._set(_keys.claim(nonce), json.dumps(record), max(1, ttl_seconds))
        return None

    def take_over(
        self, nonce: str, ttl_seconds: int, owner: str, previous: Claim, count: bool = True
    ) -> bool:
        with self._lock:
            if Claim.parse(self._get(_keys.claim(nonce))) != previous:
                return False
            attempts = previous.attempts + int(count)
            record = {"state": "running", "owner": owner, "attempts": attempts}
            self._set(_keys.claim(nonce), json.dumps(record), max(1, ttl_seconds))
        return True

    def finish_claim(self, nonce: str, ttl_seconds: int) -> None:
        record = {"state": "done", "owner": "", "attempts": 0}
        with self._lock:
            self._set(_keys.claim(nonce), json.dumps(record), max(1, ttl_seconds))

    def beat(self, owner: str, now: float) -> None:
        with self._lock:
            self._beats[owner] = now
            self._set(_keys.HEARTBEAT_KEY, self._beats, None)

    def worker_alive(self, owner: str, fresh_seconds: float, now: float) -> bool:
        with self._lock:
            score = self._beats.get(owner)
        return score is not None and score >= now - fresh_seconds

    def live_workers(self, since: float) -> int:
        with self._lock:
            return sum(1 for score in self._beats.values() if score >= since)

    def ping(self) -> bool:
        return True

    # ---- workflows ------------------------------------------------------------------------

    def save_workflow(self, workflow_id: str, messages: dict[int, str], ttl_seconds: int) -> None:
        if not messages:
            return
        with self._lock:
            fields = dict(self._get(_keys.workflow(workflow_id)) or {})
            fields.update({str(i): m for i, m in messages.items()})
            self._set(_keys.workflow(workflow_id), fields, max(1, ttl_seconds))

    def workflow_messages(self, workflow_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._get(_keys.workflow(workflow_id)) or {})

    def put_and_stage(
        self, key: str, client: str, sealed: str, workflow_id: str, step: int, message: str
    ) -> None:
        with self._lock:
            self._put(key, client, sealed)
            name = _keys.workflow(workflow_id)
            fields = self._get(name)
            if fields is None:  # HSET on a missing key creates it, without a TTL.
                self._set(name, {f"ready:{step}": message}, None)
            else:
                fields[f"ready:{step}"] = message

    def unstage(self, workflow_id: str, step: int) -> None:
        with self._lock:
            name = _keys.workflow(workflow_id)
            fields = self._get(name)
            if fields is None:
                return
            fields.pop(f"ready:{step}", None)
            fields.pop(str(step), None)
            if not fields:  # Redis drops a hash with no field left.
                self._delete(name)
