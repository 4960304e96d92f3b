"""The result store: ciphertext under `result:<key>` with a TTL, and a small `pending:<key>`
record (client and state, no payload) while the job is queued or running.

Each stored result's size is recorded in its client's `storage:<keyid>` hash in the same
transaction (`_budget` says how the bytes are counted and released).

Also kept here, since they change together with results: `claim:<nonce>` (which worker runs a
signed message, how many times it was attempted, and whether it is done), `workflow:<id>` (the
signed, sealed messages of a workflow's later steps until each is enqueued) and the workers'
heartbeats. `ResultStore` is the protocol; `RedisResultStore` the real one and
`UnsafeMemoryResultStore` (in `_memory`) the stub, both held to `tests/unit/store/contract.py`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis

from ..errors import RecordLost
from . import _keys, _records
from ._budget import StoredBytes
from ._errors import redis_unavailable

PENDING_TTL_SECONDS = 24 * 3600
#: A stored-bytes hash is swept of gone results when it holds this many more entries than twice
#: what was live at the last sweep (`RedisResultStore.storage_over`).
_SWEEP_SLACK = 32
_MAX_SWEEP_CLIENTS = 4096
#: The states of a pending record, and of a claim, as the appliance writes them.
PENDING_STATES = ("queued", "running", "revoked")
CLAIM_STATES = ("running", "done")


class ResultStore(Protocol):
    """What the API and the worker need of the store; every method may raise
    DependencyUnavailable."""

    def mark(self, key: str, client: str, state: str, task_id: str) -> None: ...
    def start(self, key: str, client: str, task_id: str) -> bool: ...
    def put(self, key: str, client: str, sealed: str) -> None: ...
    def claim(self, nonce: str, ttl_seconds: int, owner: str) -> Claim | None: ...
    def take_over(
        self, nonce: str, ttl_seconds: int, owner: str, previous: Claim, count: bool = True
    ) -> bool: ...
    def finish_claim(self, nonce: str, ttl_seconds: int) -> None: ...
    def beat(self, owner: str, now: float) -> None: ...
    def worker_alive(self, owner: str, fresh_seconds: float, now: float) -> bool: ...
    def live_workers(self, since: float) -> int: ...
    def ping(self) -> bool: ...
    def save_workflow(
        self, workflow_id: str, messages: dict[int, str], ttl_seconds: int
    ) -> None: ...
    def workflow_messages(self, workflow_id: str) -> dict[str, str]: ...
    def put_and_stage(
        self, key: str, client: str, sealed: str, workflow_id: str, step: int, message: str
    ) -> None: ...
    def unstage(self, workflow_id: str, step: int) -> None: ...
    def put_many(
        self, results: dict[str, str], client: str, workflow_id: str | None = None
    ) -> None: ...
    def revoke(self, key: str, client: str) -> str | None: ...
    def state(self, key: str) -> str | None: ...
    def delete(self, key: str) -> None: ...
    def has_result(self, key: str) -> bool: ...
    def get(self, key: str) -> Stored | None: ...
    def storage_use(self, client: str) -> list[StoredBytes]: ...
    def storage_over(self, client: str, budget: int) -> list[StoredBytes] | None: ...


@dataclass(frozen=True)
class Claim:
    """Who runs a signed message: `running` by `owner` (host:pid) on its `attempts`th try, or
    `done`."""

    state: str
    owner: str = ""
    attempts: int = 0

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Claim | None:
        """From the stored JSON; None when absent; RecordLost when it is not a claim the
        appliance writes."""
        if raw is None:
            return None
        record = _records.load(raw, "claim")
        return cls(
            _records.text(record, "state", "claim", one_of=CLAIM_STATES),
            _records.text(record, "owner", "claim", default=""),
            _records.count(record, "attempts", "claim"),
        )


@dataclass(frozen=True)
class Stored:
    """What Redis holds for a key: a sealed result, or a pending record."""

    client: str
    state: str  # "queued", "running" or "done"
    sealed: str | None = None
    ttl_ms: int = 0


class RedisResultStore:
    """The result store in Redis; translates Redis errors at this seam."""

    def __init__(
        self, client: redis.Redis, prefix: str = _keys.RESULT, ttl_seconds: int = 300
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        # Per client: the entries live at this process's last sweep of its stored-bytes hash.
        self._sweeps: dict[str, int] = {}
        self._sweeps_lock = threading.Lock()

    def _pending(self, key: str) -> str:
        return _keys.pending(key)

    def mark(self, key: str, client: str, state: str, task_id: str) -> None:
        """Record that the job for `key` is queued or running."""
        record = json.dumps({"client": client, "state": state, "task_id": task_id})
        with redis_unavailable():
            self.redis.set(self._pending(key), record, ex=PENDING_TTL_SECONDS)

    def start(self, key: str, client: str, task_id: str) -> bool:
        """Mark the job for `key` as running, unless it was revoked (then False)."""
        name = self._pending(key)
        record = json.dumps({"client": client, "state": "running", "task_id": task_id})
        with redis_unavailable(), self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(name)  # type: ignore[no-untyped-call]
                if revoked(_string_or_none(pipe, name)):
                    return False
                pipe.multi()
                pipe.set(name, record, ex=PENDING_TTL_SECONDS)
                pipe.execute()
            except redis.WatchError:
                return self.start(key, client, task_id)
        return True

    def put(self, key: str, client: str, sealed: str) -> None:
        """Store the sealed result with the TTL and drop the pending record, atomically."""
        with redis_unavailable():
            pipe = self.redis.pipeline(transaction=True)
            self._put(pipe, key, client, sealed)
            pipe.execute()

    def _put(self, pipe: Any, key: str, client: str, sealed: str) -> None:
        record = json.dumps({"client": client, "sealed": sealed})
        pipe.set(self.prefix + key, record, ex=self.ttl_seconds)
        pipe.delete(self._pending(key))
        # The client's stored bytes, in the same transaction; the hash lives as long as the
        # newest result it counts.
        pipe.hset(_keys.storage(client), key, len(record.encode()))
        pipe.expire(_keys.storage(client), self.ttl_seconds)

    def claim(self, nonce: str, ttl_seconds: int, owner: str) -> Claim | None:
        """Claim a message's nonce for `owner`; return None when this is the first delivery,
        else the existing claim (running elsewhere, or done). Kept until the message expires,
        so a replay is known."""
        record = json.dumps({"state": "running", "owner": owner, "attempts": 1})
        with redis_unavailable():
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(_keys.claim(nonce), record, nx=True, ex=max(1, ttl_seconds))
            pipe.get(_keys.claim(nonce))
            created, raw = pipe.execute()
        return None if created else Claim.parse(raw)

    def take_over(
        self, nonce: str, ttl_seconds: int, owner: str, previous: Claim, count: bool = True
    ) -> bool:
        """Take a claim whose owner died (`count`: one more attempt) or that we left to retry;
        False if someone else changed it first."""
        name = _keys.claim(nonce)
        record = json.dumps(
            {"state": "running", "owner": owner, "attempts": previous.attempts + int(count)}
        )
        with redis_unavailable(), self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(name)  # type: ignore[no-untyped-call]
                if Claim.parse(pipe.get(name)) != previous:
                    return False
                pipe.multi()
                pipe.set(name, record, ex=max(1, ttl_seconds))
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def finish_claim(self, nonce: str, ttl_seconds: int) -> None:
        """Mark a message's nonce as done: any later delivery of it is a replay."""
        record = json.dumps({"state": "done", "owner": "", "attempts": 0})
        with redis_unavailable():
            self.redis.set(_keys.claim(nonce), record, ex=max(1, ttl_seconds))

    def beat(self, owner: str, now: float) -> None:
        """Record that `owner` (host:pid) is alive at `now`."""
        with redis_unavailable():
            self.redis.zadd(_keys.HEARTBEAT_KEY, {owner: now})

    def worker_alive(self, owner: str, fresh_seconds: float, now: float) -> bool:
        """Whether `owner` (host:pid) sent a heartbeat within `fresh_seconds`."""
        with redis_unavailable():
            score = self.redis.zscore(_keys.HEARTBEAT_KEY, owner)
        return score is not None and float(score) >= now - fresh_seconds

    def live_workers(self, since: float) -> int:
        """How many workers sent a heartbeat at or after `since`."""
        with redis_unavailable():
            return int(self.redis.zcount(_keys.HEARTBEAT_KEY, since, "+inf"))

    def ping(self) -> bool:
        """Whether Redis answers (False, not an error, when it does not)."""
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    # ---- workflows ---------------------------------------------------------------------

    def save_workflow(self, workflow_id: str, messages: dict[int, str], ttl_seconds: int) -> None:
        """Keep the wire messages of steps 1.. until the worker enqueues each."""
        if not messages:
            return
        with redis_unavailable():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(_keys.workflow(workflow_id), mapping={str(i): m for i, m in messages.items()})
            pipe.expire(_keys.workflow(workflow_id), max(1, ttl_seconds))
            pipe.execute()

    def workflow_messages(self, workflow_id: str) -> dict[str, str]:
        """Every field of the workflow record: step number -> message, `ready:<n>` -> staged."""
        with redis_unavailable():
            raw = self.redis.hgetall(_keys.workflow(workflow_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    def put_and_stage(
        self, key: str, client: str, sealed: str, workflow_id: str, step: int, message: str
    ) -> None:
        """Store a step's result and stage the next step's message, atomically: if the worker
        dies before enqueuing it, the redelivered step finds it here and enqueues it."""
        with redis_unavailable():
            pipe = self.redis.pipeline(transaction=True)
            self._put(pipe, key, client, sealed)
            pipe.hset(_keys.workflow(workflow_id), f"ready:{step}", message)
            pipe.execute()

    def unstage(self, workflow_id: str, step: int) -> None:
        """The staged message of `step` was enqueued: forget it and the step's own copy."""
        with redis_unavailable():
            self.redis.hdel(_keys.workflow(workflow_id), f"ready:{step}", str(step))

    def put_many(
        self, results: dict[str, str], client: str, workflow_id: str | None = None
    ) -> None:
        """Store several sealed results at once (a failed step and the steps it skips), and drop
        the workflow record: nothing after them will run."""
        with redis_unavailable():
            pipe = self.redis.pipeline(transaction=True)
            for key, sealed in results.items():
                self._put(pipe, key, client, sealed)
            if workflow_id is not None:
                pipe.delete(_keys.workflow(workflow_id))
            pipe.execute()

    def revoke(self, key: str, client: str) -> str | None:
        """Mark a queued job as revoked; return the state it was in (None if unknown).

        "queued" means this call revoked it; "revoked", that another revocation already had.
        """
        name = self._pending(key)
        with redis_unavailable(code="result_lost"), self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(name)  # type: ignore[no-untyped-call]
                    answer, revoked = revoke_record(pipe.get(name), client)
                    if revoked is None:
                        return answer
                    pipe.multi()
                    pipe.set(name, revoked, keepttl=True)
                    pipe.execute()
                    return answer
                except redis.WatchError:
                    # The record changed under us (a worker started the job, or another
                    # revocation won): read it again and answer from what it is now.
                    continue

    def state(self, key: str) -> str | None:
        """The pending state of `key` ("queued", "running", "revoked"), or None."""
        with redis_unavailable(code="result_lost"):
            raw = self.redis.get(self._pending(key))
        return None if raw is None else Pending.parse(raw).state

    def delete(self, key: str) -> None:
        """Forget a stored result before its TTL."""
        with redis_unavailable():
            self.redis.delete(self.prefix + key, self._pending(key))

    def has_result(self, key: str) -> bool:
        """Whether a sealed result already exists (a job never runs twice for one key)."""
        with redis_unavailable():
            return bool(self.redis.exists(self.prefix + key))

    def storage_use(self, client: str) -> list[StoredBytes]:
        """The size and time left of each of `client`'s stored results. Entries whose result
        expired or was deleted are dropped here: a result's bytes count while its key exists."""
        name = _keys.storage(client)
        with redis_unavailable():
            sizes = _sizes(self._size_hash(name))
            return self._live_use(client, name, sizes)

    def storage_over(self, client: str, budget: int) -> list[StoredBytes] | None:
        """None when the sizes recorded for `client` add up to at most `budget`, else its live
        use (`storage_use`).

        The recorded sizes include results gone since the last sweep, so their sum is an upper
        bound: within the budget, one HGETALL decides, without a PTTL per result (issue 16:
        one round trip less per submission, and none of the O(n) PTTLs). The gone entries are
        swept when the budget is exceeded, and whenever the hash has grown to twice what was
        live at this process's last sweep (plus `_SWEEP_SLACK`), so it stays bounded."""
        name = _keys.storage(client)
        with redis_unavailable():
            sizes = _sizes(self._size_hash(name))
            if sum(sizes.values()) <= budget and not self._sweep_due(client, len(sizes)):
                return None
            return self._live_use(client, name, sizes)

    def _live_use(self, client: str, name: str, sizes: dict[str, int]) -> list[StoredBytes]:
        """PTTL each recorded result, drop the gone ones from the hash; the caller translates
        Redis errors."""
        pipe = self.redis.pipeline(transaction=False)
        for key in sizes:
            pipe.pttl(self.prefix + key)
        left = dict(zip(sizes, pipe.execute(), strict=True))
        gone = [key for key, ms in left.items() if ms == -2]
        if gone:
            self.redis.hdel(name, *gone)
        self._swept(client, len(sizes) - len(gone))
        return [StoredBytes(sizes[k], max(0, int(ms))) for k, ms in left.items() if ms != -2]

    def _sweep_due(self, client: str, entries: int) -> bool:
        with self._sweeps_lock:
            return entries >= 2 * self._sweeps.get(client, 0) + _SWEEP_SLACK

    def _swept(self, client: str, live: int) -> None:
        with self._sweeps_lock:
            if len(self._sweeps) >= _MAX_SWEEP_CLIENTS and client not in self._sweeps:
                self._sweeps.clear()  # forgetting only makes the next sweeps come sooner
            self._sweeps[client] = live

    def _size_hash(self, name: str) -> dict[Any, Any]:
        """The `storage:<keyid>` hash. A key of another type there (junk) is deleted and read
        as empty: it must not refuse every submission of the client, and whoever could write
        it could as well have deleted it."""
        try:
            return cast(dict[Any, Any], self.redis.hgetall(name))
        except redis.exceptions.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
        _records.log.warning("deleted a stored-bytes record of another Redis type")
        self.redis.delete(name)
        return {}

    def get(self, key: str) -> Stored | None:
        """The record for `key`, or None when unknown or expired."""
        with redis_unavailable(code="result_lost"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.prefix + key)
            pipe.pttl(self.prefix + key)
            pipe.get(self._pending(key))
            raw, ttl_ms, pending = pipe.execute()
        return stored_record(raw, int(ttl_ms), pending)


def revoke_record(raw: bytes | str | None, client: str) -> tuple[str | None, str | None]:
    """The revocation rule on a pending record, for both stores: (answer, record to write).

    None when there is no record or it is another client's; the record's state when the job is
    no longer queued (nothing to write); "queued" with the record marked revoked otherwise.
    """
    if raw is None:
        return None, None
    record = Pending.parse(raw)
    if record.client != client:
        return None, None
    if record.state != "queued":
        return record.state, None
    return "queued", json.dumps({"client": client, "state": "revoked", "task_id": record.task_id})


#: The code of a result or pending record that does not parse: the client is told its result
#: is lost (410), never a 500.
_RESULT_LOST = "result_lost"


@dataclass(frozen=True)
class Pending:
    """A pending record as the appliance writes it: whose job, in which state, which task."""

    client: str
    state: str
    task_id: str

    @classmethod
    def parse(cls, raw: bytes | str) -> Pending:
        """From the stored JSON; RecordLost (`result_lost`) when it is not one we write."""
        record = _records.load(raw, "pending", _RESULT_LOST)
        return cls(
            _records.text(record, "client", "pending", _RESULT_LOST),
            _records.text(record, "state", "pending", _RESULT_LOST, one_of=PENDING_STATES),
            _records.text(record, "task_id", "pending", _RESULT_LOST, default=""),
        )


def stored_record(
    raw: bytes | str | None, ttl_ms: int, pending: bytes | str | None
) -> Stored | None:
    """What `get()` answers for a result record, its time left and a pending record, for both
    stores; RecordLost (`result_lost`) when the one that counts is not one we write."""
    if raw is not None:
        body = _records.load(raw, "result", _RESULT_LOST)
        client = _records.text(body, "client", "result", _RESULT_LOST)
        sealed = _records.text(body, "sealed", "result", _RESULT_LOST)
        return Stored(client, "done", sealed, max(0, ttl_ms))
    if pending is not None:
        record = Pending.parse(pending)
        return Stored(record.client, record.state)
    return None


def revoked(raw: bytes | str | None) -> bool:
    """Whether a pending record, read by the worker before it starts the job, says revoked.

    A record that does not parse is no revocation: the worker overwrites it with its own
    `running` record (whoever could write junk there could as well have written `queued`).
    """
    if raw is None:
        return False
    try:
        return Pending.parse(raw).state == "revoked"
    except RecordLost:
        return False


def _string_or_none(pipe: Any, name: str) -> bytes | None:
    """GET `name`, a key of another type (junk put there) read as no record."""
    try:
        return cast(bytes | None, pipe.get(name))
    except redis.exceptions.ResponseError as exc:
        if "WRONGTYPE" in str(exc):  # Alone, or "Command # N (…) of pipeline caused error: …".
            return None
        raise


def _sizes(raw: dict[Any, Any]) -> dict[str, int]:
    """The stored bytes per result key of a `storage:<keyid>` hash. A size that is not a
    non-negative integer is skipped (and logged): junk in the hash must not fail every
    submission of the client; at worst it forgets that one result's bytes, as deleting the
    field would."""
    sizes: dict[str, int] = {}
    for key, value in raw.items():
        size = _text(value)
        if size.isascii() and size.isdigit():
            sizes[_text(key)] = int(size)
        else:
            _records.log.warning("skipped a stored size that is not a non-negative integer")
    return sizes


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
