"""The sandbox's exception tree: every error a caller can see, each with a machine-readable code."""

from __future__ import annotations


class SandboxError(Exception):
    """Raised when the sandbox refuses a request or cannot run it; base of all sandbox errors."""

    code = "sandbox_error"


class InvalidRequest(SandboxError):
    """Raised when a request is malformed: bad entry name, arguments or limits."""

    code = "invalid_request"


class ImportNotAllowed(InvalidRequest):
    """Raised when a run asks to allow a module the policy never allows or does not list."""

    code = "import_not_allowed"

    def __init__(self, modules: list[str], never: bool) -> None:
        self.modules = modules
        self.never = never
        why = (
            "breaks isolation and is never allowed"
            if never
            else "is not in the policy's importable list"
        )
        super().__init__(f"module {', '.join(modules)} {why}")


class LimitNotAllowed(InvalidRequest):
    """Raised when a requested limit is above the policy's maximum."""

    code = "limit_not_allowed"


class PolicyError(SandboxError):
    """Raised when the policy file is missing or malformed."""

    code = "policy_error"


class IsolationUnavailable(SandboxError):
    """Raised when a required isolation layer cannot be applied on this host; nothing was run."""

    code = "isolation_unavailable"


class ZygoteLost(SandboxError):
    """Raised when a fork server has lost its zygote after serving requests; nothing was run.

    The server then exits and its caller starts a fresh one (see `Sandbox._call`): a new zygote
    forked from a server that has held requests would carry them into every later child.
    """

    code = "zygote_lost"
