"""Inside the isolated child: compile, run the entry function, write one JSON reply, exit.

Nothing here is trusted by the parent: the reply is parsed there as untrusted JSON, and usage is
measured there too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from . import _isolation, _restricted
from ._outcome import error
from ._request import PreparedRun

# Exit codes the parent recognises before any user code has run.
EXIT_ISOLATION_FAILED = 71


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _reply(body: str) -> NoReturn:
    try:
        _write_all(_isolation.REPLY_FD, body.encode("utf-8", "surrogatepass"))
    finally:
        os._exit(0)


def _error_of(exc: BaseException) -> dict[str, str]:
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a user exception whose str() fails still gets reported
        message = "<unprintable>"
    return error(type(exc).__name__, message)


def _status_body(status: str, err: dict[str, str], state: _restricted.RunState) -> str:
    return json.dumps(
        {"status": status, "value": None, "stdout": state.stdout(), "error": err},
    )


def execute(run: PreparedRun, state: _restricted.RunState) -> str:
    """Run the user function and return the reply body (a JSON object as text)."""
    try:
        code = _restricted.compile_module(run.source)
    except _restricted.CompileRejected as exc:
        return _status_body("compile_error", error("CompileError", str(exc)), state)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return _status_body("compile_error", _error_of(exc), state)
    value: Any = None
    try:
        namespace = _restricted.build_globals(state, run.imports)
        exec(code, namespace)  # noqa: S102 - RestrictedPython bytecode in an isolated child
        entry = namespace.get(run.entry)
        if not callable(entry):
            raise NameError(f"module defines no function {run.entry!r}")
        value = entry(*run.args, **run.kwargs)
    except MemoryError as exc:
        if state.denial is None:
            return _status_body("memory_limit", error("MemoryError", str(exc)), state)
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything at all
        if state.denial is None:
            return _status_body("runtime_error", _error_of(exc), state)
    return _finish(value, state)


def _finish(value: Any, state: _restricted.RunState) -> str:
    if state.denial is not None:
        return _status_body("denied", error("PolicyViolation", state.denial), state)
    if state.output_exceeded:
        return _status_body(
            "output_limit", error("OutputLimit", "stdout exceeded its cap"), state
        )
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return _status_body(
            "runtime_error",
            error("TypeError", f"return value is not JSON-serializable: {exc}"),
            state,
        )
    except MemoryError:
        return _status_body("memory_limit", error("MemoryError", "serializing the value"), state)
    if len(encoded.encode("utf-8", "surrogatepass")) > state.output_cap:
        return _status_body(
            "output_limit", error("OutputLimit", "return value exceeded its cap"), state
        )
    return (
        '{"status": "ok", "value": ' + encoded + ', "stdout": ' + json.dumps(state.stdout())
        + ', "error": null}'
    )


#: How the child turns a request into a reply body once isolated (see `execute`).
Executor = Callable[[PreparedRun, _restricted.RunState], str]


def main(
    run: PreparedRun,
    setup: _isolation.ChildSetup,
    reply_fd: int,
    probe: bool,
    executor: Executor = execute,
) -> NoReturn:
    """The child's whole life: isolate, then run (or, for `doctor`, verify the layers)."""
    try:
        _isolation.enter(setup, reply_fd, tolerant=probe)
    except _isolation.LayerFailed as exc:
        try:
            os.write(reply_fd, json.dumps({"layer": exc.layer, "reason": exc.reason}).encode())
        finally:
            os._exit(EXIT_ISOLATION_FAILED)
    if probe:
        report = _isolation.verify(setup)
        _write_all(_isolation.REPLY_FD, json.dumps({"probe": report}).encode())
        os.close(_isolation.REPLY_FD)
        # Stay alive briefly so the parent can read /proc/<pid> (namespaces, seccomp mode).
        import time

        time.sleep(2)
        os._exit(0)
    sys.setrecursionlimit(1000)
    state = _restricted.RunState(setup.limits.output_bytes)
    _reply(executor(run, state))
