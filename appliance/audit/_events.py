"""The audit vocabulary: event types, the whitelist of fields each may carry, and their shapes.

Default deny: a field that is not in an event type's whitelist is refused, and so is a value of the
wrong shape. Plaintext has no field to go to: a module's source, a job's arguments and a result
are accepted only as `module_source=`, `args=`/`kwargs=` and `result=`, which never reach the log:
the module is stored as its SHA-256, arguments and result as keyed digests (`*_hmac`) that only
the holder of the log's digest key can test a guess against.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ._errors import AuditFieldError


class EventType(StrEnum):
    """What happened. The value is the entry's `type`."""

    SUBMISSION_ACCEPTED = "submission.accepted"
    SUBMISSION_REJECTED = "submission.rejected"
    # An accepted submission whose job could not be published after all (the broker or Redis
    # failed once the acceptance was audited): the client got the error, the job never runs.
    SUBMISSION_WITHDRAWN = "submission.withdrawn"
    AUTH_FAILED = "auth.failed"
    # The unauthenticated failures of one source in one window after its first (which has its
    # own `auth.failed` entry): counted, not written one by one (issue 12, finding 10).
    AUTH_FAILURES = "auth.failures"
    POLICY_DENIED = "policy.denied"
    EXECUTION_STARTED = "execution.started"
    EXECUTION_FINISHED = "execution.finished"
    TASK_REJECTED = "task.rejected"
    RESULT_READ = "result.read"
    TASK_REVOKED = "task.revoked"
    KEY_ROTATED = "key.rotated"
    # A write to the client registry by the operator's CLI (add, key rotation, enable, disable),
    # with the key fingerprints and globs before and after: never a secret value.
    CLIENT_CHANGED = "client.changed"
    CREDENTIAL_ROTATED = "credential.rotated"
    # `appliance restore` (issue 15, red-team finding M1): the backup put in place (its
    # manifest's SHA-256 and time), the replaced log's head and where it is kept, and who ran it.
    APPLIANCE_RESTORED = "appliance.restored"
    # Written by the audit log itself, never by callers.
    CHECKPOINT = "checkpoint"
    CHECKPOINT_FAILED = "checkpoint.failed"
    LOG_RECOVERED = "audit.recovered"
    TRUNCATION_DETECTED = "audit.truncation_detected"


#: Types only the writer itself may append.
INTERNAL_TYPES = frozenset(
    {
        EventType.CHECKPOINT,
        EventType.CHECKPOINT_FAILED,
        EventType.LOG_RECOVERED,
        EventType.TRUNCATION_DETECTED,
    }
)

# Identifiers: key ids, function names, task ids, result keys, request ids, remote addresses.
# No whitespace, quotes, brackets of code or newlines: a line of source cannot pass for one.
_IDENT = re.compile(r"[A-Za-z0-9_.:@/+=\[\]-]{1,200}")
# A route template of the API (`/v1/results/{key}`), or `unmatched`.
_ROUTE = re.compile(r"[A-Za-z0-9_./{}-]{1,100}")
# Machine-readable words: status, code, reason.
_SLUG = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# A function or secret glob of the registry (`team-a/**`, `report_*`).
_GLOB = re.compile(r"[A-Za-z0-9_.:@/+=\[\]!*?-]{1,256}")
_MAX_GLOBS = 256
_SIGNATURE = re.compile(r"vault:v[1-9][0-9]{0,8}:[A-Za-z0-9+/]{1,200}={0,2}")
_MAX_USAGE_KEYS = 16


def _ident(name: str, value: Any) -> str:
    """An identifier as given, or `sha256:<hex>` of it when it does not look like one.

    Identifiers can come from an unauthenticated request (a claimed key id, a function name in a
    rejected body): whatever an attacker sent is never written verbatim, only recognisably.
    """
    if not isinstance(value, str):
        raise AuditFieldError(f"{name} must be a string")
    if _IDENT.fullmatch(value):
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def identifier(name: str, value: Any) -> str:
    """An identifier field's stored form (itself, or `sha256:<hex>` when it is not one)."""
    return _ident(name, value)


def _slug(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _SLUG.fullmatch(value):
        # The value itself is not echoed: it may be exactly what must not reach a log.
        raise AuditFieldError(f"{name} must be a lower-case machine-readable word (a slug)")
    return value


def _route(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _ROUTE.fullmatch(value):
        raise AuditFieldError(f"{name} must be a route template")
    return value


def _hex64(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise AuditFieldError(f"{name} must be 64 lower-case hex digits")
    return value


def _globs(name: str, value: Any) -> list[str]:
    """A registry's list of globs: each as given, or `sha256:<hex>` of it when it is odd."""
    if not isinstance(value, list | tuple) or len(value) > _MAX_GLOBS:
        raise AuditFieldError(f"{name} must be a list of at most {_MAX_GLOBS} globs")
    globs = []
    for glob in value:
        if not isinstance(glob, str):
            raise AuditFieldError(f"{name} must hold strings")
        text = glob.encode("utf-8", "surrogatepass")
        globs.append(
            glob if _GLOB.fullmatch(glob) else "sha256:" + hashlib.sha256(text).hexdigest()
        )
    return globs


def _int_between(low: int, high: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise AuditFieldError(f"{name} must be an integer in [{low}, {high}]")
        return value

    return check


def _usage(name: str, value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping) or len(value) > _MAX_USAGE_KEYS:
        raise AuditFieldError(f"{name} must be a mapping of at most {_MAX_USAGE_KEYS} counters")
    counters = {}
    for key, count in value.items():
        counters[_slug(f"{name} key", key)] = _int_between(0, 2**62)(f"{name}.{key}", count)
    return counters


def _signature(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _SIGNATURE.fullmatch(value):
        raise AuditFieldError(f"{name} must be a `vault:vN:<base64>` signature")
    return value


def _timestamp(name: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", value
    ):
        raise AuditFieldError(f"{name} must be an audit timestamp")
    return value


_NONNEG = _int_between(0, 2**62)

#: Every field an entry may carry besides the envelope (`v`, `seq`, `time`, `type`, `source`,
#: `pid`, `prev_hash`, `hash`), with the check its value must pass.
FIELDS: Mapping[str, Callable[[str, Any], Any]] = {
    "client": _ident,
    "function": _ident,
    "task_id": _ident,
    "workflow_id": _ident,
    "result_key": _ident,
    "request_id": _ident,
    "remote_addr": _ident,
    "key_name": _ident,
    "credential": _ident,
    "actor": _ident,
    # A key id as an unauthenticated request named it: never taken for the client's identity.
    "claimed_keyid": _ident,
    "route": _route,
    "status": _slug,
    "code": _slug,
    "reason": _slug,
    "http_status": _int_between(100, 599),
    "step": _int_between(0, 10_000),
    "key_version": _int_between(1, 10**9),
    "module_sha256": _hex64,
    "args_hmac": _hex64,
    "result_hmac": _hex64,
    "usage": _usage,
    # An aggregate of refusals (`auth.failures`): how many, of which code, over which window.
    "count": _int_between(1, 2**62),
    "codes": _usage,
    "from_time": _timestamp,
    "to_time": _timestamp,
    # Checkpoints and recovery (written by the log itself).
    "from_seq": _int_between(1, 2**62),
    "to_seq": _int_between(1, 2**62),
    "head_hash": _hex64,
    "merkle_root": _hex64,
    "signed_at": _timestamp,
    "signature": _signature,
    "fragment_sha256": _hex64,
    "fragment_bytes": _NONNEG,
    "lost_from_seq": _int_between(1, 2**62),
    "lost_to_seq": _int_between(1, 2**62),
    "anchor": _int_between(1, 2**62),
    "anchored_head": _hex64,
    # Registry changes (`client.changed`): what changed, and the key and globs before and after.
    "change": _slug,
    "key_sha256": _hex64,
    "previous_key_sha256": _hex64,
    "function_globs": _globs,
    "previous_function_globs": _globs,
    "secret_globs": _globs,
    "previous_secret_globs": _globs,
    # A restore (`appliance.restored`).
    "manifest_sha256": _hex64,
    "backup_created": _timestamp,
    "replaced_to_seq": _NONNEG,
    "replaced_head_hash": _hex64,
    "replaced_log": _ident,
}

#: Names of the plaintext-taking keywords: consumed, never stored.
_SENSITIVE = ("module_source", "args", "kwargs", "result")


@dataclass(frozen=True)
class _Rule:
    required: frozenset[str]
    optional: frozenset[str]
    status: str | None = None  # a fixed status, set by the event type itself
    sensitive: frozenset[str] = frozenset()


def _rule(
    required: str, optional: str = "", status: str | None = None, sensitive: str = ""
) -> _Rule:
    return _Rule(
        frozenset(required.split()),
        frozenset(optional.split()),
        status,
        frozenset(sensitive.split()),
    )


_REQUEST = "request_id remote_addr"

RULES: Mapping[EventType, _Rule] = {
    EventType.SUBMISSION_ACCEPTED: _rule(
        "client function task_id result_key",
        f"module_sha256 workflow_id step {_REQUEST}",
        "accepted",
        "module_source args kwargs",
    ),
    EventType.SUBMISSION_REJECTED: _rule(
        "code",
        f"client function http_status reason module_sha256 workflow_id {_REQUEST}",
        "rejected",
        "module_source",
    ),
    EventType.SUBMISSION_WITHDRAWN: _rule(
        "client task_id result_key code",
        "function workflow_id step request_id",
        "withdrawn",
    ),
    EventType.AUTH_FAILED: _rule(
        "code", f"client claimed_keyid route http_status reason {_REQUEST}", "denied"
    ),
    EventType.AUTH_FAILURES: _rule(
        "remote_addr count codes from_time to_time", "claimed_keyid", "denied"
    ),
    EventType.POLICY_DENIED: _rule(
        "client code", f"function task_id http_status reason {_REQUEST}", "denied"
    ),
    EventType.EXECUTION_STARTED: _rule(
        "task_id function",
        "client result_key module_sha256 workflow_id step request_id",
        "running",
        "module_source args kwargs",
    ),
    EventType.EXECUTION_FINISHED: _rule(
        "task_id status",
        "function client result_key module_sha256 usage workflow_id step code reason request_id",
        None,
        "module_source result",
    ),
    EventType.TASK_REJECTED: _rule(
        "code", "task_id function client reason workflow_id step request_id", "rejected"
    ),
    EventType.RESULT_READ: _rule(
        "client result_key status", f"task_id http_status {_REQUEST}", None, "result"
    ),
    EventType.TASK_REVOKED: _rule("client result_key status", f"task_id {_REQUEST}"),
    EventType.KEY_ROTATED: _rule("key_name", "key_version actor code"),
    EventType.CLIENT_CHANGED: _rule(
        "client change actor",
        "status key_sha256 previous_key_sha256 function_globs previous_function_globs "
        "secret_globs previous_secret_globs",
    ),
    EventType.CREDENTIAL_ROTATED: _rule("credential", "actor code key_version"),
    EventType.APPLIANCE_RESTORED: _rule(
        "actor manifest_sha256 backup_created replaced_to_seq replaced_log", "replaced_head_hash"
    ),
    EventType.CHECKPOINT: _rule(
        "from_seq to_seq head_hash merkle_root signed_at signature key_version"
    ),
    EventType.CHECKPOINT_FAILED: _rule("code", "from_seq to_seq"),
    EventType.LOG_RECOVERED: _rule("code fragment_sha256 fragment_bytes"),
    EventType.TRUNCATION_DETECTED: _rule("code lost_from_seq lost_to_seq anchor anchored_head"),
}


@dataclass(frozen=True)
class AuditEvent:
    """A validated event, ready for the writer: its type, whitelisted fields and blind digests.

    `blind` holds SHA-256 digests of arguments and results (never the values); the writer turns
    each into a keyed digest before anything reaches the disk.
    """

    type: EventType
    fields: Mapping[str, Any]
    blind: Mapping[str, bytes] = field(default_factory=dict, repr=False)


def _json_digest(value: Any) -> bytes:
    # Arguments and results arrived as JSON; `default=repr` keeps an odd value from costing the
    # entry (the digest is then of its repr).
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
    )
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _module_sha256(source: str | bytes) -> str:
    data = source if isinstance(source, bytes) else source.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def make_event(event_type: EventType | str, *, internal: bool = False, **given: Any) -> AuditEvent:
    """Validate `given` against the whitelist of `event_type`; raise AuditFieldError otherwise.

    `module_source=` (str or bytes) becomes `module_sha256`; `args=` and `kwargs=` together become
    `args_hmac`, `result=` becomes `result_hmac` (keyed by the writer). Other None values are
    dropped.
    """
    try:
        kind = EventType(event_type)
    except ValueError:
        raise AuditFieldError(f"unknown audit event type {str(event_type)[:60]!r}") from None
    if kind in INTERNAL_TYPES and not internal:
        raise AuditFieldError(f"{kind} entries are written by the audit log itself")
    rule = RULES[kind]
    # `result=None` is a result (the function returned None); any other None means "absent".
    values = {k: v for k, v in given.items() if v is not None or k == "result"}
    blind = _take_sensitive(kind, rule, values)
    unknown = sorted(set(values) - rule.required - rule.optional)
    if unknown:
        raise AuditFieldError(f"{kind} does not take field(s) {', '.join(unknown)}")
    if rule.status is not None:
        values["status"] = rule.status
    missing = sorted(rule.required - set(values))
    if missing:
        raise AuditFieldError(f"{kind} requires field(s) {', '.join(missing)}")
    fields = {name: FIELDS[name](name, value) for name, value in values.items()}
    return AuditEvent(kind, fields, blind)


def _take_sensitive(kind: EventType, rule: _Rule, values: dict[str, Any]) -> dict[str, bytes]:
    """Remove the plaintext-taking keywords from `values`, leaving only their digests."""
    offered = [name for name in _SENSITIVE if name in values]
    refused = [name for name in offered if name not in rule.sensitive]
    if refused:
        raise AuditFieldError(f"{kind} does not take {', '.join(n + '=' for n in refused)}")
    blind: dict[str, bytes] = {}
    if "module_source" in values:
        source = values.pop("module_source")
        if not isinstance(source, str | bytes):
            raise AuditFieldError("module_source must be str or bytes")
        digest = _module_sha256(source)
        if values.get("module_sha256", digest) != digest:
            raise AuditFieldError("module_source and module_sha256 disagree")
        values["module_sha256"] = digest
    if "args" in values or "kwargs" in values:
        args, kwargs = values.pop("args", ()), values.pop("kwargs", {})
        if not isinstance(args, list | tuple) or not isinstance(kwargs, Mapping):
            raise AuditFieldError("args must be a list and kwargs a mapping")
        blind["args_hmac"] = _json_digest({"args": list(args), "kwargs": dict(kwargs)})
    if "result" in values:
        blind["result_hmac"] = _json_digest(values.pop("result"))
    return blind
