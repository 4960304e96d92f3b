"""Idempotency records: a client's `Idempotency-Key` bound to its first acceptance (CONTRACT §5).

Design. A client that lost a response, or got a 503, retries with a new signature and a new
nonce, so the nonce cannot recognise the retry; the `Idempotency-Key` it sends again can. One
record per (client, Idempotency-Key) says what became of the first request with that key:

    idempotency:<keyid>:<sha256 of the key> ->
        {"v": 1, "state": "pending" | "accepted", "fingerprint": "vault:vN:…",
         "token": <random>, "acceptance": {"task_id", "result_key", …} | null,
         "acceptance_mac": "vault:vN:…" (accepted records only)}

- `reserve()` claims the record atomically (SET NX) as `pending`, or returns the record already
  there: an acceptance to answer again, a `pending` one (the first request is still in flight,
  or its process died before it could say), with the fingerprint of the request it was made for.
- `accept()` replaces our pending record by the acceptance once the job is published, and
  starts its TTL again. `abandon()` deletes our pending record (compared by its random token)
  when nothing was published, so that a retry runs the job; a record of another request with
  the same key is never deleted.
- Authenticated acceptance: the API's Redis user may write these keys, so the acceptance it
  answers again is only as good as its MAC, made by the caller (the API, `api/_idempotency`)
  over the client, the key, the fingerprint and the acceptance, and checked there. A record
  that does not parse as one we write is `RecordLost` (`idempotency_record_invalid`).
- Nothing plaintext: the fingerprint is a keyed MAC of the request made by the caller (OpenBao
  transit), so a reader of Redis cannot test a guess of a body against it; the acceptance holds
  identifiers and result keys, which Redis already holds as key names; the key is hashed.
- TTL: the caller passes at least the signature window (age plus future skew), as long as a
  signed request may still arrive; `tests/unit/store/idempotency_contract.py` holds the stub and
  Redis to the same rules.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import redis

from . import _keys, _records
from ._errors import redis_unavailable

FORMAT_VERSION = 1
PENDING = "pending"
ACCEPTED = "accepted"
#: The code of a record that does not parse (the API answers it as a 409).
INVALID = "idempotency_record_invalid"


@dataclass(frozen=True)
class Reservation:
    """One request's claim on (client, Idempotency-Key); `token` tells our claim from others'."""

    client: str
    key: str
    fingerprint: str
    token: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    @property
    def name(self) -> str:
        """The Redis key: the client's key id and a digest of its Idempotency-Key."""
        return _keys.idempotency(self.client, hashlib.sha256(self.key.encode()).hexdigest())

    def pending(self) -> str:
        return _encode(PENDING, self.fingerprint, self.token, None)

    def accepted(self, acceptance: Mapping[str, Any], acceptance_mac: str) -> str:
        return _encode(ACCEPTED, self.fingerprint, self.token, acceptance, acceptance_mac)


@dataclass(frozen=True)
class IdempotencyRecord:
    """What became of the first request with a key: `pending` or `accepted` (with its answer)."""

    state: str
    fingerprint: str
    acceptance: Mapping[str, Any] | None = None
    #: The caller's MAC of the acceptance, unverified here ("" when pending or absent).
    acceptance_mac: str = ""


class IdempotencyStore(Protocol):
    """Where the API keeps one record per (client, Idempotency-Key)."""

    def reserve(self, reservation: Reservation, ttl_seconds: int) -> IdempotencyRecord | None:
        """Claim the key as pending (None), or return the record that already holds it."""
        ...

    def accept(
        self,
        reservation: Reservation,
        acceptance: Mapping[str, Any],
        ttl_seconds: int,
        acceptance_mac: str = "",
    ) -> None:
        """Record the acceptance of the reserved request and its MAC, for `ttl_seconds`."""
        ...

    def abandon(self, reservation: Reservation) -> None:
        """Forget the reservation if it is still ours and pending (nothing was published)."""
        ...


def _encode(
    state: str,
    fingerprint: str,
    token: str,
    acceptance: Mapping[str, Any] | None,
    acceptance_mac: str = "",
) -> str:
    record: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "state": state,
        "fingerprint": fingerprint,
        "token": token,
        "acceptance": dict(acceptance) if acceptance is not None else None,
    }
    if acceptance is not None:
        record["acceptance_mac"] = acceptance_mac
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _decode(raw: str | bytes) -> IdempotencyRecord:
    """The record as we write it; RecordLost (`idempotency_record_invalid`) otherwise."""
    kind = "idempotency"
    record = _records.load(raw, kind, INVALID)
    if record.get("v") != FORMAT_VERSION or type(record.get("v")) is not int:
        raise _records.lost(kind, "an unknown format version", INVALID)
    state = _records.text(record, "state", kind, INVALID, one_of=(PENDING, ACCEPTED))
    fingerprint = _records.text(record, "fingerprint", kind, INVALID)
    acceptance = record.get("acceptance")
    if state == PENDING:
        if acceptance is not None:
            raise _records.lost(kind, "a pending record with an acceptance", INVALID)
        return IdempotencyRecord(state, fingerprint)
    if type(acceptance) is not dict:
        raise _records.lost(kind, "an accepted record without an acceptance", INVALID)
    mac = _records.text(record, "acceptance_mac", kind, INVALID, default="")
    return IdempotencyRecord(state, fingerprint, acceptance, mac)


class RedisIdempotency:
    """Idempotency records in Redis (the `api` user's `idempotency:` keys)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def reserve(self, reservation: Reservation, ttl_seconds: int) -> IdempotencyRecord | None:
        with redis_unavailable(code=INVALID):
            # SET NX GET: one round trip claims the key or returns what holds it (Redis >= 7).
            prior = self.redis.set(
                reservation.name, reservation.pending(), nx=True, get=True, ex=ttl_seconds
            )
        return None if prior is None else _decode(cast(bytes, prior))

    def accept(
        self,
        reservation: Reservation,
        acceptance: Mapping[str, Any],
        ttl_seconds: int,
        acceptance_mac: str = "",
    ) -> None:
        value = reservation.accepted(acceptance, acceptance_mac)
        with redis_unavailable():
            self.redis.set(reservation.name, value, ex=ttl_seconds)

    def abandon(self, reservation: Reservation) -> None:
        with redis_unavailable(), self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(reservation.name)  # type: ignore[no-untyped-call]
                if pipe.get(reservation.name) != reservation.pending().encode():
                    return
                pipe.multi()
                pipe.delete(reservation.name)
                pipe.execute()
            except redis.WatchError:
                return  # Changed meanwhile: it is no longer our pending claim.


class UnsafeMemoryIdempotency:
    """An `IdempotencyStore` in process memory, with Redis's expiry, for unit tests only (nothing
    is shared between processes or survives a restart)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, tuple[str, float]] = {}

    def _live(self, name: str) -> str | None:
        held = self._records.get(name)
        if held is not None and self.clock() >= held[1]:
            del self._records[name]
            return None
        return None if held is None else held[0]

    def reserve(self, reservation: Reservation, ttl_seconds: int) -> IdempotencyRecord | None:
        with self._lock:
            prior = self._live(reservation.name)
            if prior is not None:
                return _decode(prior)
            self._records[reservation.name] = (reservation.pending(), self.clock() + ttl_seconds)
        return None

    def accept(
        self,
        reservation: Reservation,
        acceptance: Mapping[str, Any],
        ttl_seconds: int,
        acceptance_mac: str = "",
    ) -> None:
        value = reservation.accepted(acceptance, acceptance_mac)
        with self._lock:
            self._records[reservation.name] = (value, self.clock() + ttl_seconds)

    def abandon(self, reservation: Reservation) -> None:
        with self._lock:
            if self._live(reservation.name) == reservation.pending():
                del self._records[reservation.name]

    def keys(self) -> list[str]:
        """Every live key (what a SCAN of Redis would list)."""
        with self._lock:
            return [name for name in list(self._records) if self._live(name) is not None]
