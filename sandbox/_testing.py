"""UNSAFE, test-only: run plain Python, without RestrictedPython, in a fully isolated child.

The security suite uses this to prove that the OS layer holds on its own: code here gets the real
builtins and every module the fork server has loaded (`os`, `socket`, `ctypes`, `subprocess`,
...), exactly what an attacker would have after a RestrictedPython escape. Every other layer
(session, descriptors, environment, namespaces, chroot, rlimits, uid, no_new_privs, seccomp) is
applied as in production, by the same fork server code.

Never import this outside the test suite: it is importable only under pytest or when
`SANDBOX_UNSAFE_TESTING=1` (set only for the test fork server it spawns).
"""

from __future__ import annotations

import builtins
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

if "pytest" not in sys.modules and os.environ.get("SANDBOX_UNSAFE_TESTING") != "1":
    raise ImportError(
        "sandbox._testing runs code without RestrictedPython; it is for the test suite only"
    )

from . import _child, _restricted  # noqa: E402 - only after the gate above
from ._client import _BOOT, Sandbox  # noqa: E402
from ._limits import Limits  # noqa: E402
from ._outcome import Outcome, error  # noqa: E402
from ._request import PreparedRun  # noqa: E402
from ._server import main as _serve  # noqa: E402
from ._supervisor import Supervisor  # noqa: E402

__all__ = ["UnsafeRawCodeRun", "UnsafeRawSupervisor"]

# What raw code may use: loaded in the fork server before any child exists, because a chrooted
# child cannot import anything new from the file system.
_ATTACK_MODULES = (
    "ctypes",
    "errno",
    "mmap",
    "os",
    "resource",
    "signal",
    "socket",
    "subprocess",
    "time",
)


class _Capture:
    """sys.stdout for raw code: printed text goes to the run's capped buffer."""

    def __init__(self, state: _restricted.RunState) -> None:
        self._state = state

    def write(self, text: str) -> int:
        self._state.write(text)
        return len(text)

    def flush(self) -> None:
        pass


def _execute_unrestricted(run: PreparedRun, state: _restricted.RunState) -> bytes:
    """UNSAFE executor: plain `compile` and `exec` with the real builtins, then the normal reply."""
    try:
        code = compile(run.source, "<unsafe-raw>", "exec")
    except (SyntaxError, ValueError) as exc:
        return _child._status_body("compile_error", _child._error_of(exc), state)
    sys.stdout = _Capture(state)  # type: ignore[assignment,unused-ignore]
    namespace: dict[str, Any] = {"__name__": "unsafe_raw", "__builtins__": builtins}
    value: Any = None
    try:
        exec(code, namespace)  # noqa: S102 - the point of this test-only executor
        value = namespace[run.entry](*run.args, **run.kwargs)
    except MemoryError as exc:
        return _child._status_body("memory_limit", error("MemoryError", str(exc)), state)
    except BaseException as exc:  # noqa: BLE001 - report whatever the raw code raised
        return _child._status_body("runtime_error", _child._error_of(exc), state)
    return _child._finish(value, state)


class UnsafeRawSupervisor(Supervisor):
    """UNSAFE: a Supervisor whose children skip RestrictedPython (every OS layer still applies)."""

    executor = staticmethod(_execute_unrestricted)


def _serve_unsafe(policy_path: str | None = None) -> None:
    """Entry point of the test fork server."""
    for name in _ATTACK_MODULES:
        __import__(name)
    _serve(policy_path, UnsafeRawSupervisor)


class UnsafeRawCodeRun(Sandbox):
    """UNSAFE: a fork server that runs plain Python in isolated children; tests only.

    `run()` takes the same arguments as `Sandbox.run` (imports are ignored: raw code can import
    whatever the server has loaded) and returns the same `Outcome`.
    """

    _boot = _BOOT + "from sandbox._testing import _serve_unsafe; _serve_unsafe(policy)"
    _server_env = {"SANDBOX_UNSAFE_TESTING": "1"}

    def run(
        self,
        source: str,
        entry: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        limits: Mapping[str, Any] | Limits | None = None,
        allow_imports: Iterable[str] = (),
    ) -> Outcome:
        """Run `entry(*args, **kwargs)` from raw, unrestricted `source` in an isolated child.

        Imports are never allowed here: raw code reaches the interpreter's own import anyway.
        """
        return super().run(source, entry, args, kwargs, limits, ())
