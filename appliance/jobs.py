"""What travels through the broker: identifiers and ciphertext only.

The API seals the job (module source, arguments, limits, secret names) under a data key from
the transit key `jobs`, derived for the client; the worker opens it, runs it, and seals the
outcome under a data key from `results`, derived for the same client. The additional data binds
each envelope to its task, result key and client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .envelope import Envelope, open_envelope, seal
from .vault import Transit

JOBS_KEY = "jobs"
RESULTS_KEY = "results"


@dataclass(frozen=True)
class JobMessage:
    """The Celery task's only argument: no plaintext in it."""

    task_id: str
    result_key: str
    client: str
    sealed_job: str

    def to_wire(self) -> dict[str, str]:
        """As JSON for the broker."""
        return {
            "task_id": self.task_id,
            "result_key": self.result_key,
            "client": self.client,
            "sealed_job": self.sealed_job,
        }

    @classmethod
    def from_wire(cls, untrusted: Any) -> JobMessage:
        """Parse the broker's JSON; raise ValueError when malformed."""
        if not isinstance(untrusted, dict):
            raise ValueError("job message must be an object")
        fields = ("task_id", "result_key", "client", "sealed_job")
        if not all(isinstance(untrusted.get(f), str) for f in fields):
            raise ValueError("job message lacks a field")
        return cls(*(untrusted[f] for f in fields))


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
