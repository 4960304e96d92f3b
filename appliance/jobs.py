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

from .envelope import Envelope, open_envelope, seal
from .vault import Transit

JOBS_KEY = "jobs"
RESULTS_KEY = "results"
SIGNING_KEY = "task-signing"
#: How long an enqueued message stays valid: a job not started by then is refused.
MESSAGE_TTL_SECONDS = 3600
_FIELDS = ("task_id", "result_key", "client", "sealed_job", "nonce", "expires", "signature")


class MessageRejected(Exception):
    """Raised when a task message is malformed, forged, expired or replayed; nothing runs."""

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

    def to_wire(self) -> dict[str, Any]:
        """As JSON for the broker."""
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_wire(cls, untrusted: Any) -> JobMessage:
        """Parse the broker's JSON; raise MessageRejected when malformed."""
        if not isinstance(untrusted, dict) or set(untrusted) != set(_FIELDS):
            raise MessageRejected("malformed")
        if not isinstance(untrusted["expires"], int) or not all(
            isinstance(untrusted[f], str) for f in _FIELDS if f != "expires"
        ):
            raise MessageRejected("malformed")
        return cls(**{f: untrusted[f] for f in _FIELDS})

    def signed_bytes(self, task_name: str) -> bytes:
        """What the signature covers: task name, id, a digest of the arguments, nonce, expiry."""
        digest = hashlib.sha256(
            json.dumps([self.result_key, self.client, self.sealed_job]).encode()
        ).hexdigest()
        return json.dumps(
            {"task": task_name, "id": self.task_id, "args_sha256": digest, "nonce": self.nonce,
             "expires": self.expires},
            sort_keys=True, separators=(",", ":"),
        ).encode()


def sign_message(transit: Transit, message: JobMessage, task_name: str, now: float) -> JobMessage:
    """Give the message a nonce, an expiry and the API's signature (an OpenBao HMAC)."""
    unsigned = replace(message, nonce=secrets.token_hex(16),
                       expires=int(now) + MESSAGE_TTL_SECONDS)
    return replace(unsigned, signature=transit.hmac(SIGNING_KEY, unsigned.signed_bytes(task_name)))


def verify_message(transit: Transit, message: JobMessage, task_name: str, now: float) -> None:
    """Raise MessageRejected unless the API signed this message and it has not expired."""
    if message.expires < now:
        raise MessageRejected("expired")
    if not message.signature.startswith("vault:") or not transit.verify_hmac(
        SIGNING_KEY, message.signed_bytes(task_name), message.signature
    ):
        raise MessageRejected("bad signature")


def _job_aad(task_id: str, result_key: str, client: str) -> bytes:
    return f"job|{task_id}|{result_key}|{client}".encode()


def _result_aad(result_key: str, client: str) -> bytes:
    return f"result|{result_key}|{client}".encode()


def seal_job(transit: Transit, spec: dict[str, Any], task_id: str, result_key: str,
             client: str) -> str:
    """Seal a job specification for the broker."""
    key, wrapped = transit.data_key(JOBS_KEY, client)
    aad = _job_aad(task_id, result_key, client)
    return seal(key, wrapped, json.dumps(spec).encode(), aad).to_json()


def open_job(transit: Transit, message: JobMessage) -> dict[str, Any]:
    """Open a sealed job; raise SealBroken if it was altered or moved."""
    envelope = Envelope.from_json(message.sealed_job)
    key = transit.unwrap_key(JOBS_KEY, envelope.wrapped_key, message.client)
    aad = _job_aad(message.task_id, message.result_key, message.client)
    spec: dict[str, Any] = json.loads(open_envelope(key, envelope, aad))
    return spec


def seal_result(transit: Transit, body: dict[str, Any], result_key: str, client: str) -> str:
    """Seal a result body for Redis."""
    key, wrapped = transit.data_key(RESULTS_KEY, client)
    return seal(key, wrapped, json.dumps(body).encode(), _result_aad(result_key, client)).to_json()


def open_result(transit: Transit, sealed: str, result_key: str, client: str) -> dict[str, Any]:
    """Open a stored result for its own client; raise SealBroken otherwise."""
    envelope = Envelope.from_json(sealed)
    key = transit.unwrap_key(RESULTS_KEY, envelope.wrapped_key, client)
    body: dict[str, Any] = json.loads(open_envelope(key, envelope, _result_aad(result_key, client)))
    return body
