"""Safe retries: a submission with an `Idempotency-Key` is accepted at most once (CONTRACT §5).

A retry carries a new signature and a new nonce, so only the key the client sends again can
recognise it. `Idempotency.once()` runs an acceptance under the record of (client, key) kept by
`appliance.store` (see `_idempotency.py` there for the record itself):

- first request with the key: reserve the record, accept (audit, then publish), record the
  acceptance; when the acceptance fails (a 503) nothing was published and the reservation is
  dropped, so the client's retry runs the job, once;
- same key, same request (route and body), already accepted: the first acceptance again, and
  nothing is queued;
- same key, another request: `409 idempotency_conflict`; same key while the first is still in
  flight (or its process died before it could say whether it published): `409
  idempotency_in_progress`, until the record expires.

Which requests are "the same" is decided by a fingerprint: a MAC (OpenBao transit, under the
task-signing key with a domain prefix no task message can start with) of the client, the route
and a SHA-256 of the body. The record holds only that MAC, never the body nor a plain digest of
it that a reader of Redis could test a guess against. The API may make MACs but not verify
them, so fingerprints are compared as made: a retry that spans a rotation of the task-signing
key is answered `idempotency_conflict` (nothing runs twice; the client uses a new key).

The acceptance answered again is authenticated the same way (red team of issue 12, item 4: with
the API's Redis rights, rewriting `acceptance.result_key` made a retry answer another job's
result key). When it records an acceptance, the API MACs the client, the Idempotency-Key, the
fingerprint and the acceptance (another domain prefix); answering it again, it makes that MAC
anew and compares the two in constant time. A record that does not parse, or whose MAC differs,
is refused with `409 idempotency_record_invalid` (audited as the refusal of the client's
request; the reason is logged): nothing is queued, and the client learns its key is spoilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, Conflict, DependencyUnavailable, RecordLost
from ..jobs import SIGNING_KEY
from ..keyservice import KeyService
from ..store import IdempotencyRecord, IdempotencyStore, Reservation

#: CONTRACT §5: 1 to 64 URL-safe characters.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: The MAC's domain: task messages are signed as JSON objects, which never start with this.
_DOMAIN = b"appliance.idempotency.v1\x00"
#: The acceptance MAC's domain: neither a task message nor a fingerprint starts with it.
_ACCEPTANCE_DOMAIN = b"appliance.idempotency.acceptance.v1\x00"

log = logging.getLogger("appliance.api")

Acceptance = dict[str, Any]


@dataclass(frozen=True)
class Retryable:
    """A signed submission that carries an Idempotency-Key: the key, its route and its body."""

    key: str
    route: str
    body: bytes = b""

    @classmethod
    def from_header(cls, untrusted_key: str | None, route: str, body: bytes) -> Retryable | None:
        """None without a key; the request with its checked key; or raise BadRequest."""
        if untrusted_key is None:
            return None
        if not KEY_PATTERN.fullmatch(untrusted_key):
            raise BadRequest(
                "Idempotency-Key must be 1 to 64 characters of A-Z a-z 0-9 _ -",
                code="invalid_idempotency_key",
            )
        return cls(untrusted_key, route, body)


class Idempotency:
    """Runs an acceptance at most once per (client, Idempotency-Key) within `ttl_seconds`."""

    def __init__(self, transit: KeyService, records: IdempotencyStore, ttl_seconds: int) -> None:
        self.transit = transit
        self.records = records
        self.ttl_seconds = ttl_seconds

    def once(
        self, client: str, retry: Retryable | None, accept: Callable[[], Acceptance]
    ) -> Acceptance:
        """`accept()`'s answer, or the first answer to this client's request with the same key."""
        if retry is None:
            return accept()
        message = _fingerprinted(client, retry)
        reservation = Reservation(client, retry.key, self.transit.hmac(SIGNING_KEY, message))
        try:
            prior = self.records.reserve(reservation, self.ttl_seconds)
        except RecordLost as exc:
            raise _invalid("it does not parse") from exc
        if prior is not None:
            return self._answer_again(prior, reservation)
        try:
            acceptance = accept()
        except BaseException:
            # Nothing was published: the next request with this key may run the job. When
            # Redis cannot even forget the reservation, it expires with its TTL instead.
            with contextlib.suppress(DependencyUnavailable):
                self.records.abandon(reservation)
            raise
        # Published: a failure to record it leaves the reservation pending (a retry is told
        # `idempotency_in_progress`), never free for a second run.
        mac = self._acceptance_mac(reservation, acceptance)
        self.records.accept(reservation, acceptance, self.ttl_seconds, mac)
        return acceptance

    def _answer_again(self, prior: IdempotencyRecord, ours: Reservation) -> Acceptance:
        """The first acceptance, when `prior` was made for the same request and has one."""
        if prior.fingerprint != ours.fingerprint:
            raise Conflict(
                "this Idempotency-Key was used for another request", code="idempotency_conflict"
            )
        if prior.acceptance is None:
            raise Conflict(
                "the first request with this Idempotency-Key has not finished",
                code="idempotency_in_progress",
            )
        expected = self._acceptance_mac(ours, prior.acceptance)
        if not hmac.compare_digest(expected.encode(), prior.acceptance_mac.encode()):
            raise _invalid("its acceptance MAC does not verify")
        return dict(prior.acceptance)

    def _acceptance_mac(self, reservation: Reservation, acceptance: Mapping[str, Any]) -> str:
        """The MAC binding an acceptance to the client, key and request it answers."""
        bound = [reservation.client, reservation.key, reservation.fingerprint, acceptance]
        canonical = json.dumps(bound, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return self.transit.hmac(SIGNING_KEY, _ACCEPTANCE_DOMAIN + canonical.encode())


def _invalid(why: str) -> Conflict:
    """The refusal of a request whose stored idempotency record was altered in Redis."""
    log.warning("refused an idempotency record: %s", why)
    return Conflict(
        "the stored record of this Idempotency-Key is not valid; nothing was queued",
        code="idempotency_record_invalid",
    )


def _fingerprinted(client: str, retry: Retryable) -> bytes:
    """What the fingerprint MAC covers: the client, the route and a digest of the body."""
    body = hashlib.sha256(retry.body).hexdigest()
    return _DOMAIN + f"{client}\x00{retry.route}\x00{body}".encode()
