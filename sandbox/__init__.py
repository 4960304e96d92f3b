"""A standalone sandbox for untrusted Python functions.

RestrictedPython compiles the code; a fresh, credential-free child process runs it behind
namespaces, rlimits, an unprivileged uid, no_new_privs and a seccomp filter. Usable on its own:

    >>> import sandbox
    >>> sandbox.run("def f(x):\\n    return x * 2", "f", [21]).value
    42
"""

from __future__ import annotations

import _thread
from collections.abc import Iterable, Mapping
from typing import Any

from ._client import Sandbox
from ._errors import (
    ImportNotAllowed,
    InvalidRequest,
    IsolationUnavailable,
    LimitNotAllowed,
    PolicyError,
    SandboxError,
)
from ._launcher import Launcher
from ._limits import Limits
from ._outcome import Outcome, Usage
from ._policy import LAYERS, Policy
from ._request import ENTRY_PATTERN

__all__ = [
    "ENTRY_PATTERN",
    "LAYERS",
    "ImportNotAllowed",
    "InvalidRequest",
    "IsolationUnavailable",
    "Launcher",
    "LimitNotAllowed",
    "Limits",
    "Outcome",
    "Policy",
    "PolicyError",
    "Sandbox",
    "SandboxError",
    "Usage",
    "run",
]

_default: Sandbox | None = None
_default_lock = _thread.allocate_lock()  # not threading: see _client.py


def _default_sandbox() -> Sandbox:
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox().start()
        return _default


def run(
    source: str,
    entry: str,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | Limits | None = None,
    allow_imports: Iterable[str] = (),
) -> Outcome:
    """Run `entry(*args, **kwargs)` from `source` in the process-wide sandbox."""
    return _default_sandbox().run(source, entry, args, kwargs, limits, allow_imports)
