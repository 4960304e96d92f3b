"""Every Redis key the appliance writes, named once.

`policies/redis-acl.json` grants each role a set of key patterns; a test checks that the
patterns are exactly the prefixes below, and after the integration run another scans the real
Redis and checks every key against them. Code outside `appliance/store/` never builds a key.
"""

from __future__ import annotations

#: Sealed results: `result:<result key>` -> {"client", "sealed"}, with the result TTL.
RESULT = "result:"
#: A queued, running or revoked job: `pending:<result key>` -> {"client", "state", "task_id"}.
PENDING = "pending:"
#: Who runs a signed message: `claim:<nonce>` -> {"state", "owner", "attempts"} (worker only).
CLAIM = "claim:"
#: A workflow's later steps: `workflow:<id>` hash of step -> signed message, `ready:<n>` staged.
WORKFLOW = "workflow:"
#: Request nonces seen per key id: `nonce:<keyid>:<sha256>` (api only).
NONCE = "nonce:"
#: Rate-limit windows: `ratelimit:<keyid>:m:<minute>` and `:d:<day>` (api only).
RATELIMIT = "ratelimit:"
#: A client's first acceptance per Idempotency-Key: `idempotency:<keyid>:<sha256>` (api only).
IDEMPOTENCY = "idempotency:"
#: Each client's stored result bytes: `storage:<keyid>` hash of result key -> size, written with
#: each result (worker); the API reads it and drops the entries whose result is gone.
STORAGE = "storage:"
#: Live workers: the sorted set `heartbeat:workers` (member host:pid, score unix time).
HEARTBEAT = "heartbeat:"
#: The registry's generation token `registry:generation`, and the transit keys' generation
#: `registry:keys` (issue 16: renewed by `appliance keys rotate`; the API's data-key cache is
#: cleared when it changes). Both written by the operator as admin, read by the API.
REGISTRY = "registry:"
#: Celery's broker keys, all under kombu's `global_keyprefix`.
BROKER = "celery:"

#: Every prefix, in the order of the ACL file's notes.
PREFIXES = (
    RESULT,
    PENDING,
    CLAIM,
    WORKFLOW,
    NONCE,
    RATELIMIT,
    IDEMPOTENCY,
    STORAGE,
    HEARTBEAT,
    REGISTRY,
    BROKER,
)

HEARTBEAT_KEY = HEARTBEAT + "workers"
REGISTRY_GENERATION_KEY = REGISTRY + "generation"
KEYS_GENERATION_KEY = REGISTRY + "keys"


def storage(keyid: str) -> str:
    return STORAGE + keyid


def pending(result_key: str) -> str:
    return PENDING + result_key


def claim(nonce: str) -> str:
    return CLAIM + nonce


def workflow(workflow_id: str) -> str:
    return WORKFLOW + workflow_id


def nonce(keyid: str, digest: str) -> str:
    return f"{NONCE}{keyid}:{digest}"


def ratelimit(keyid: str, window: str) -> str:
    return f"{RATELIMIT}{keyid}:{window}"


def idempotency(keyid: str, digest: str) -> str:
    return f"{IDEMPOTENCY}{keyid}:{digest}"


def prefix_of(key: str) -> str | None:
    """The prefix `key` was built with, or None when it is none of ours."""
    return next((p for p in PREFIXES if key.startswith(p)), None)
