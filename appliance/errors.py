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


class UnsupportedMediaType(ApplianceError):
    """Raised when a body is not JSON."""

    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class RateLimited(ApplianceError):
    """Raised when a client is over its rate limit or quota."""

    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class DependencyUnavailable(ApplianceError):
    """Raised when Redis, OpenBao or the broker cannot be reached; the request is not accepted."""

    status, code, title = 503, "dependency_unavailable", "Service unavailable"
    retry_after = 5


class SealBroken(ApplianceError):
    """Raised when a sealed envelope cannot be opened: wrong key, context or tampered bytes.

    Carries no detail for clients; the reason goes to the audit log.
    """

    status, code, title = 500, "seal_broken", "Result cannot be opened"
