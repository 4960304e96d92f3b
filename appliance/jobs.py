"""What travels through the broker: identifiers and ciphertext only.

The API seals the job (module source, arguments, limits, secret names) under a data key from
the transit key `jobs`, derived for the client; the worker opens it, runs it, and seals the
outcome under a data key from `results`, derived for the same client. The additional data binds
each envelope to its task, result key and client.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, replace
from typing import Any

from .envelope import Envelope, seal
from .errors import ApplianceError, SealBroken
from .keyservice import (
    EnvelopeKeys,
    KeyService,
    open_under,
    parse_versioned,
    seal_under,
)
from .specs import JobSpec, ResultBody

JOBS_KEY = "jobs"
RESULTS_KEY = "results"
#: Transit key of the HMACs of idempotency records, and of task messages signed before issue 16
#: (still verified through transit while such messages may be queued: `MESSAGE_TTL_SECONDS`).
SIGNING_KEY = "task-signing"
#: Transit key (Ed25519) that signs task messages: the API signs through transit, workers check
#: in-process against the public keys they pinned (`keyservice.PinnedSignatures`).
MESSAGE_KEY = "task-messages"
#: Transit key of the value carried from one workflow step to the next (worker to worker).
CARRY_KEY = "carry"
#: How long an enqueued message stays valid: a job not started by then is refused.
MESSAGE_TTL_SECONDS = 3600
_FIELDS = ("task_id", "result_key", "client", "sealed_job", "nonce", "expires", "signature")
#: Fields a message may carry besides those: the sealed result of the previous workflow step.
_OPTIONAL = ("carry",)


class MessageRejected(ApplianceError):
    """Raised when a task message is malformed, forged, expired or replayed; nothing runs."""

    code, title = "message_rejected", "Task message rejected"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class JobMessage:
    """The Celery task's only argument: identifiers and ciphertext, signed by the API."""

    task_id: str
    result_key: str
    client: str
    sealed_job: str
    nonce: str = ""
    expires: int = 0
    signature: str = ""
    #: Set by the worker on a workflow step after the first: the previous step's value, sealed
    #: under `carry` and bound to this step. Not covered by the API's signature (the API never
    #: sees it); its AES-GCM seal authenticates it instead.
    carry: str = ""

    def to_wire(self) -> dict[str, Any]:
        """As JSON for the broker."""
        wire = {f: getattr(self, f) for f in _FIELDS}
        if self.carry:
            wire["carry"] = self.carry
        return wire

    @classmethod
    def from_wire(cls, untrusted: Any) -> JobMessage:
        """Parse the broker's JSON; raise MessageRejected when malformed."""
        if not isinstance(untrusted, dict) or not set(_FIELDS) <= set(untrusted) <= {
            *_FIELDS,
            *_OPTIONAL,
        }:
            raise MessageRejected("malformed")
        fields = [f for f in (*_FIELDS, *_OPTIONAL) if f in untrusted]
        if not isinstance(untrusted["expires"], int) or not all(
            isinstance(untrusted[f], str) for f in fields if f != "expires"
        ):
            raise MessageRejected("malformed")
        return cls(**{f: untrusted[f] for f in fields})

    def digest(self) -> str:
        """SHA-256 of the message as the API signed it (every field but the worker's `carry`):
        what the previous step of a workflow names as its next step."""
        signed = {f: getattr(self, f) for f in _FIELDS}
        return hashlib.sha256(
            json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()

    def signed_bytes(self, task_name: str) -> bytes:
        """What the signature covers: task name, id, a digest of the arguments, nonce, expiry."""
        digest = hashlib.sha256(
            json.dumps([self.result_key, self.client, self.sealed_job]).encode()
        ).hexdigest()
        return json.dumps(
            {
                "task": task_name,
                "id": self.task_id,
                "args_sha256": digest,
                "nonce": self.nonce,
                "expires": self.expires,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


_ED25519_SIGNATURE_BYTES = 64


def sign_message(
    transit: KeyService, message: JobMessage, task_name: str, now: float
) -> JobMessage:
    """Give the message a nonce, an expiry and the API's signature (Ed25519, by transit)."""
    unsigned = replace(message, nonce=secrets.token_hex(16), expires=int(now) + MESSAGE_TTL_SECONDS)
    return replace(unsigned, signature=transit.sign(MESSAGE_KEY, unsigned.signed_bytes(task_name)))


def verify_message(transit: KeyService, message: JobMessage, task_name: str, now: float) -> None:
    """Raise MessageRejected unless the API signed this message and it has not expired.

    An Ed25519 signature (64 bytes) is checked in this process against `task-messages`' pinned
    public keys; any other `vault:` signature is taken for an HMAC of `task-signing` (messages
    signed before issue 16) and checked by transit, as before.
    """
    if message.expires < now:
        raise MessageRejected("expired")
    signed = message.signed_bytes(task_name)
    try:
        _, raw = parse_versioned(message.signature)
        if len(raw) == _ED25519_SIGNATURE_BYTES:
            transit.verify_signature(MESSAGE_KEY, signed, message.signature)
        elif not transit.verify_hmac(SIGNING_KEY, signed, message.signature):
            raise SealBroken("bad hmac")
    except SealBroken:
        raise MessageRejected("bad signature") from None


def _job_aad(task_id: str, result_key: str, client: str) -> bytes:
    return f"job|{task_id}|{result_key}|{client}".encode()


def _result_aad(result_key: str, client: str, owner_key: str) -> bytes:
    # The client's key as it was when the job was accepted (red team of issue 12, item 2): a key
    # put in its place later, by whoever writes the registry, cannot open the result.
    return f"result|{result_key}|{client}|{owner_key}".encode()


def seal_job(transit: KeyService, spec: JobSpec, task_id: str, result_key: str, client: str) -> str:
    """Seal a job specification for the broker."""
    aad = _job_aad(task_id, result_key, client)
    return seal_under(transit, JOBS_KEY, client, json.dumps(spec.to_json()).encode(), aad).to_json()


def open_job(transit: KeyService, message: JobMessage) -> JobSpec:
    """Open a sealed job; raise SealBroken if it was altered or moved."""
    envelope = Envelope.from_json(message.sealed_job)
    aad = _job_aad(message.task_id, message.result_key, message.client)
    plaintext = open_under(transit, JOBS_KEY, message.client, envelope, aad)
    return JobSpec.from_json(json.loads(plaintext))


def seal_result(
    transit: KeyService, body: ResultBody, result_key: str, client: str, owner_key: str = ""
) -> str:
    """Seal a result body for Redis, for `client` holding the key whose SHA-256 is `owner_key`
    (`JobSpec.owner_key_sha256`; empty for a job that could not be opened: nobody reads it)."""
    plaintext = json.dumps(body.to_json()).encode()
    aad = _result_aad(result_key, client, owner_key)
    return seal_under(transit, RESULTS_KEY, client, plaintext, aad).to_json()


def seal_results(
    transit: KeyService, bodies: dict[str, ResultBody], client: str, owner_key: str = ""
) -> dict[str, str]:
    """Seal several result bodies of one client (under one data key when the key service
    caches them; see `keyservice.DataKeyCache`)."""
    if not isinstance(transit, EnvelopeKeys):
        key, wrapped = transit.data_key(RESULTS_KEY, client)
        return {
            result_key: seal(
                key,
                wrapped,
                json.dumps(body.to_json()).encode(),
                _result_aad(result_key, client, owner_key),
            ).to_json()
            for result_key, body in bodies.items()
        }
    return {
        result_key: seal_under(
            transit,
            RESULTS_KEY,
            client,
            json.dumps(body.to_json()).encode(),
            _result_aad(result_key, client, owner_key),
        ).to_json()
        for result_key, body in bodies.items()
    }


def open_result(
    transit: KeyService, sealed: str, result_key: str, client: str, owner_key: str = ""
) -> ResultBody:
    """Open a stored result for its own client, holding the key it was accepted under; raise
    SealBroken otherwise."""
    envelope = Envelope.from_json(sealed)
    aad = _result_aad(result_key, client, owner_key)
    return ResultBody.from_json(json.loads(open_under(transit, RESULTS_KEY, client, envelope, aad)))


def open_client_result(
    transit: KeyService, sealed: str, result_key: str, client: str, owner_key: str
) -> ResultBody:
    """Open a result for `client` holding the key whose SHA-256 is `owner_key`; raise SealBroken.

    A job that never opened (forged, or OpenBao refused its data key) has no owner key: the
    worker sealed its result without one, and it holds nothing of the job, only a failure the
    worker wrote (`rejected`, `internal_error`). Such a result opens without the key, and only
    when it is such a failure.
    """
    try:
        return open_result(transit, sealed, result_key, client, owner_key)
    except SealBroken:
        if not owner_key:
            raise
    body = open_result(transit, sealed, result_key, client, "")
    if body.status != "failed" or body.result is not None or body.stdout:
        raise SealBroken("a result without an owner key is only ever a failure")
    return body


def _carry_aad(message: JobMessage) -> bytes:
    return f"carry|{message.task_id}|{message.result_key}|{message.client}".encode()


def attach_carry(transit: KeyService, message: JobMessage, value: Any) -> JobMessage:
    """The next workflow step's message, carrying `value` sealed to that step alone."""
    plaintext = json.dumps(value).encode()
    sealed = seal_under(transit, CARRY_KEY, message.client, plaintext, _carry_aad(message))
    return replace(message, carry=sealed.to_json())


def open_carry(transit: KeyService, message: JobMessage) -> Any:
    """The value carried into this step; raise SealBroken if absent, altered or moved."""
    if not message.carry:
        raise SealBroken("no carried value")
    envelope = Envelope.from_json(message.carry)
    return json.loads(open_under(transit, CARRY_KEY, message.client, envelope, _carry_aad(message)))
