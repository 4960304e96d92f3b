"""The audit package's exceptions: one small tree under `AuditError`, each with a `code`."""

from __future__ import annotations

from ..errors import ApplianceError, DependencyUnavailable


class AuditError(ApplianceError):
    """Raised when an audit-log operation fails; base of every audit error."""

    code = "audit_error"
    title = "Audit log error"


class AuditUnavailable(AuditError, DependencyUnavailable):
    """Raised when an entry cannot be made durable; the caller must not go on (fail closed: 503)."""

    code = "audit_unavailable"
    title = "Service unavailable"


class AuditLogCorrupt(AuditUnavailable):
    """Raised when a writer finds the log inconsistent (truncated, replaced, a foreign line).

    Writers refuse to append to a log they cannot chain to: the operator runs `appliance audit
    verify` to find out what happened.
    """

    code = "audit_log_corrupt"


class AuditFieldError(AuditError, ValueError):
    """Raised when an event carries a field outside its whitelist or a value of the wrong shape."""

    code = "audit_field_refused"


class PublicKeyError(AuditError):
    """Raised when the public keys needed to check checkpoints are missing or malformed."""

    code = "audit_public_keys"


class VerificationFailed(AuditError):
    """Raised when the chain or a checkpoint does not verify; names the first bad entry.

    `kind` is one of `altered`, `removed`, `inserted`, `reordered`, `truncated`, `forged`;
    `seq` and `line` locate the entry when they are known (`line` is 1-based in the log file).
    """

    code = "audit_verification_failed"
    title = "Audit log verification failed"

    def __init__(
        self, kind: str, message: str, *, seq: int | None = None, line: int | None = None
    ) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.seq = seq
        self.line = line
