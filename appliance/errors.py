"""The appliance's exception tree. Each error carries an HTTP status and a machine-readable code;
one handler in the API turns them into RFC 9457 problem+json responses."""

from __future__ import annotations


class ApplianceError(Exception):
    """Raised when a request or an operation fails; base of every appliance error."""

    status = 500
    code = "internal_error"
    title = "Internal error"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class BadRequest(ApplianceError):
    """Raised when a body or field is malformed."""

    status, code, title = 400, "bad_request", "Bad request"


class Unauthorized(ApplianceError):
    """Raised when a signature is missing, invalid, expired or replayed, or its key unknown."""

    status, code, title = 401, "unauthorized", "Unauthorized"

    def __init__(
        self,
        detail: str,
        code: str | None = None,
        *,
        reason: str | None = None,
        claimed_keyid: str | None = None,
        verified: bool = False,
    ) -> None:
        super().__init__(detail, code)
        #: For the audit log only: a finer cause than the client is told (`unknown_key`).
        self.reason = reason
        #: The key id the request named, unverified (None when it named none).
        self.claimed_keyid = claimed_keyid
        #: The signature verified (a replay): someone holds the key, so it is never aggregated.
        self.verified = verified


class Forbidden(ApplianceError):
    """Raised when the client's policy forbids what it asked for."""

    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(ApplianceError):
    """Raised when a result is unknown or expired."""

    status, code, title = 404, "not_found", "Not found"


class Conflict(ApplianceError):
    """Raised when the resource is in a state that forbids the operation (a running job)."""

    status, code, title = 409, "conflict", "Conflict"


class PayloadTooLarge(ApplianceError):
    """Raised when a body is larger than the configured maximum."""

    status, code, title = 413, "body_too_large", "Payload too large"


class RequestTimeout(ApplianceError):
    """Raised when a request's body does not arrive within the API's body deadline."""

    status, code, title = 408, "body_timeout", "Request timeout"


class UnsupportedMediaType(ApplianceError):
    """Raised when a body is not JSON."""

    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class RateLimited(ApplianceError):
    """Raised when a client is over its rate limit or quota."""

    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class StorageQuotaExceeded(RateLimited):
    """Raised when a client's stored results are over its byte budget."""

    code, title = "storage_quota", "Storage quota exceeded"


class RecordLost(ApplianceError):
    """Raised when a record read from Redis is not one the appliance writes (junk put there by
    hand or by someone with Redis rights): it is lost, not retried.

    Carries no detail for clients; which record and why goes to the log and the audit log.
    """

    status, code, title = 410, "record_lost", "Gone"


class DependencyUnavailable(ApplianceError):
    """Raised when Redis, OpenBao or the broker cannot be reached; the request is not accepted."""

    status, code, title = 503, "dependency_unavailable", "Service unavailable"
    retry_after = 5


class SealBroken(ApplianceError):
    """Raised when a sealed envelope cannot be opened: wrong key, context or tampered bytes.

    Carries no detail for clients; the reason goes to the audit log.
    """

    status, code, title = 500, "seal_broken", "Result cannot be opened"


#: Every machine-readable `code` an `ApplianceError` may carry, declared once: the `code` of a
#: problem+json response, of an audit entry's refusal, or of an operator error. A raise site
#: names one of these; tests/unit/test_error_codes.py holds every raise site to this list.
CODES: dict[str, str] = {
    # Generic codes of the classes above.
    "internal_error": "an unexpected failure",
    "bad_request": "a malformed body or field",
    "unauthorized": "a missing or invalid signature",
    "forbidden": "the client's policy forbids the request",
    "not_found": "no such resource",
    "conflict": "the resource's state forbids the operation",
    "body_too_large": "the body is over the configured maximum",
    "unsupported_media_type": "the body is not JSON",
    "rate_limited": "over the client's rate limit or daily quota",
    "dependency_unavailable": "Redis, OpenBao or the broker is unreachable",
    "storage_quota": "the client's stored results are over its byte budget",
    "storage_full": "Redis refused a write: it is at its memory limit",
    "enrolment_lost": "OpenBao refused the service's own secret_id: it needs `appliance up`",
    "seal_broken": "a sealed envelope does not open",
    "record_lost": "a record in Redis that is not one the appliance writes (altered in Redis)",
    # Request parsing (api).
    "bad_content_length": "Content-Length is not a number",
    "malformed_json": "the body is not a JSON object",
    "invalid_field": "a field fails validation",
    "too_many_steps": "a workflow over the configured number of steps",
    "metrics_unauthorized": "/metrics without its bearer token",
    "body_timeout": "the body did not arrive within the API's body deadline",
    "over_capacity": "the API has as many requests in progress as it may take",
    "client_disconnected": "the client closed the connection before its body arrived",
    "invalid_idempotency_key": "an Idempotency-Key that is not 1 to 64 URL-safe characters",
    "idempotency_conflict": "an Idempotency-Key already used for another request",
    "idempotency_in_progress": "the first request with that Idempotency-Key has not finished",
    "idempotency_record_invalid": "the stored record of that Idempotency-Key does not parse, or "
    "its MAC does not verify (altered in Redis); the request is not accepted",
    # Signatures (RFC 9421 profile).
    "missing_signature": "the request is not signed",
    "invalid_signature": "the signature or its input does not verify, or its key id is unknown",
    "missing_tag": 'no signature carries tag="appliance"',
    "stale_signature": "created too old or too far ahead, or expired",
    "replayed_nonce": "a nonce already seen for that key in the window",
    "unknown_key": "an unknown or disabled key id (the audit log's reason; clients are told "
    "invalid_signature)",
    "wrong_key": "a signature that the key of the enabled client it names does not verify (the "
    "audit log's reason; clients are told invalid_signature)",
    "invalid_registry_entry": "the key id's registry entry does not parse (edited by hand); "
    "refused as an unknown key id (the audit log's reason; clients are told invalid_signature)",
    "wrong_authority": "the signed authority is not one this server answers for",
    # Authorization of a task.
    "invalid_function": "the function is not a plain name",
    "function_not_allowed": "the client may not call the function",
    "limits_not_allowed": "limits above the policy's or the client's maxima",
    "invalid_limits": "limits that are not valid",
    "import_not_allowed": "an import the policy or the client does not allow",
    "secret_not_allowed": "a secret the client may not read",
    "invalid_secret_name": "a malformed secret name",
    "invalid_secret_glob": "a malformed secret glob in a client's policy",
    # Results.
    "invalid_key": "not a result key",
    "result_not_found": "an unknown or expired result",
    "not_your_result": "a result of another client",
    "result_unavailable": "a stored result that does not open",
    "result_lost": "the stored record of a result or of its pending job is not one the "
    "appliance writes (altered in Redis)",
    "already_running": "a running job cannot be revoked",
    # The worker.
    "message_rejected": "a task message malformed, forged, expired or replayed",
    "in_flight": "a message running on a live worker (a duplicate delivery)",
    "bad_workflow": "a workflow step's next message is not the one signed at submission",
    "secret_not_found": "a named secret that does not exist",
    # The registry and OpenBao.
    "bad_keyid": "a malformed key id",
    "unknown_client": "no such client in the registry",
    "generation_not_renewed": "the registry changed but its generation could not be renewed",
    "vault_forbidden": "OpenBao refused the operation",
    "vault_not_found": "no such path in OpenBao",
    # The audit log.
    "audit_error": "the audit log failed",
    "audit_field_refused": "an audit event field that may not be recorded",
    "audit_log_corrupt": "the audit log cannot be appended to as it is",
    "audit_public_keys": "the audit key's public keys are missing or malformed",
    "audit_unavailable": "the audit log cannot be written",
    "audit_verification_failed": "the audit log does not verify",
    "signing_failed": "a checkpoint could not be signed",
    "audit_anchor_conflict": "an audit anchor of that number already exists",
    # Operating the stack.
    "configuration_error": "a service started without a setting its role requires",
    "stack_error": "a service of the local stack cannot be started, reached or stopped",
    "relay_refused": "the Redis relay refused a connection",
    # The operator-held seal and the day-2 commands (unseal, backup, restore, upgrade).
    "openbao_sealed": "OpenBao is sealed and the command holds no shares to unseal it",
    "shares_malformed": "unseal shares given by the operator do not parse (nothing submitted)",
    "shares_refused": "OpenBao refused the unseal shares given, or they are too few",
    "age_error": "an age recipient or identity does not parse, or age cannot encrypt or decrypt",
    "backup_invalid": "a backup archive does not decrypt, or its manifest or a member does not "
    "verify",
    "backup_refused": "OpenBao refused a step of a backup or a restore",
    "downgrade_refused": "the state was written by a newer appliance than this one",
}
