"""Inside the isolated child: compile, run the entry function, write one JSON reply, be killed.

Nothing here is trusted by the parent: the reply is parsed there as untrusted JSON, and usage is
read there from the kernel. Once the reply is written the child closes its channel and waits;
the parent kills it (see `_deliver`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import _isolation, _reply, _restricted
from ._framing import read_frame
from ._limits import Limits
from ._outcome import error
from ._request import PreparedRun

# The first byte a child writes on its reply channel, before any user code can run: every layer
# is in place (then the reply follows), or one failed (then a JSON report, and the child exits).
# User code runs only after the first, so nothing it writes or exits with can pass for the second.
ISOLATED = b"+"
ISOLATION_FAILED = b"!"
EXIT_ISOLATION_FAILED = 71


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _deliver(data: bytes) -> NoReturn:
    """Write the whole reply, close the channel, and wait to be killed.

    The closed channel tells the parent that the reply is whole. It then reads this process's
    CPU time and peak memory while the process still exists and kills it. Exiting instead would
    make the parent wait for the kernel to tear down the address space (over a millisecond)
    before it saw the end of the reply.
    """
    try:
        _write_all(_isolation.REPLY_FD, data)
        os.close(_isolation.REPLY_FD)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def _error_of(exc: BaseException) -> dict[str, str]:
    try:
        message = str(exc)
        # An exact copy: never a method of a str subclass user code may have made.
        message = str.__str__(message) if isinstance(message, str) else "<unprintable>"
    except BaseException:  # noqa: BLE001 - user code in __str__ may raise anything at all
        message = "<unprintable>"
    name = type.__dict__["__name__"].__get__(type(exc))
    return error(name if type(name) is str else "Exception", message)


def _status_body(status: str, err: dict[str, str], state: _restricted.RunState) -> bytes:
    return _reply.encode(status, err, "", state.stdout())


def execute(run: PreparedRun, state: _restricted.RunState) -> bytes:
    """Run the user function and return the reply (see `_reply`)."""
    try:
        code = _restricted.compile_module(run.source)
    except _restricted.CompileRejected as exc:
        return _status_body("compile_error", error("CompileError", str(exc)), state)
    except MemoryError:
        # CPython's parser also raises MemoryError for source nested too deeply to parse, and
        # the two cannot be told apart: either way the source was rejected before running.
        return _status_body(
            "compile_error",
            error("MemoryError", "source too large or too deeply nested to compile"),
            state,
        )
    except (SyntaxError, ValueError, RecursionError) as exc:
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


def _finish(value: Any, state: _restricted.RunState) -> bytes:
    # Serializing may run user code (a dict subclass's items(), say), which may be denied,
    # print, or raise anything: so the value is encoded first and the verdict taken after.
    encoded: str | None = None
    failure: dict[str, str] | None = None
    status = "runtime_error"
    if state.denial is None:
        try:
            encoded = json.dumps(value, allow_nan=False)
        except MemoryError:
            status, failure = "memory_limit", error("MemoryError", "serializing the value")
        except BaseException as exc:  # noqa: BLE001 - see above
            failure = error(
                "TypeError", f"return value is not JSON-serializable: {_error_of(exc)['message']}"
            )
    if state.denial is not None:
        return _status_body("denied", error("PolicyViolation", state.denial), state)
    if state.output_exceeded:
        return _status_body("output_limit", error("OutputLimit", "stdout exceeded its cap"), state)
    if encoded is None:
        return _status_body(status, failure or error("TypeError", "not serializable"), state)
    if len(encoded.encode("utf-8", "surrogatepass")) > state.output_cap:
        return _status_body(
            "output_limit", error("OutputLimit", "return value exceeded its cap"), state
        )
    return _reply.encode("ok", None, encoded, state.stdout())


#: How the child turns a request into a reply body once isolated (see `execute`).
Executor = Callable[[PreparedRun, _restricted.RunState], bytes]

# Sent when even the reply cannot be built for lack of memory; encoded before the limits apply.
_MEMORY_REPLY = _reply.encode("memory_limit", error("MemoryError", "memory limit reached"), "", "")


def _fail_layer(exc: _isolation.LayerFailed, reply_fd: int) -> NoReturn:
    # Before the fds layer has run, the reply pipe is still at its original number (and fd 3
    # may be one of the parent's descriptors); from then on it is REPLY_FD.
    fd = reply_fd if exc.layer in ("session", "fds") else _isolation.REPLY_FD
    try:
        report = json.dumps({"layer": exc.layer, "reason": exc.reason[:400]})
        _write_all(fd, ISOLATION_FAILED + report.encode())
    finally:
        os._exit(EXIT_ISOLATION_FAILED)


#: How long an isolated child waits for its request before it warms up (seconds).
WARM_UP_AFTER = 0.002

# Compiled and run by every child while it waits for its request: the pages a run touches first
# (RestrictedPython's transformer, the guards, the JSON codec) are copied from the parent then,
# off the caller's clock. A constant, trusted source; nothing it leaves behind is shared.
_WARM_UP_SOURCE = """
def warm_up(items, scale=2):
    total = 0
    for item in items:
        total += item * scale
    return {"total": total, "items": [str(i) for i in items]}
"""


# The warm-up goes through the same steps as a request: decoding it, then `execute`.
_WARM_UP_REQUEST = json.dumps(
    PreparedRun(_WARM_UP_SOURCE, "warm_up", [[1, 2, 3]], {"scale": 3}).to_wire()
).encode()


def warm_up() -> None:
    """Decode and run a constant, trusted request (no reply): see the comment above."""
    run = trusted_from_wire(json.loads(_WARM_UP_REQUEST))
    execute(run, _restricted.RunState(run.limits.output_bytes))


def _request_arrives(within: float) -> bool:
    # A request that comes at once (back-to-back runs) is served cold: warming up would only
    # delay it. A child left idle for longer warms up while it waits.
    return bool(select.select([_isolation.REQUEST_FD], [], [], within)[0])


def _receive_request() -> PreparedRun:
    """Block until the (already validated) request has arrived whole, then close its channel.

    It comes as one frame (see `_framing`): a child forked by the supervisor itself holds copies
    of the other spares' write ends until its descriptors layer closes them.
    """
    try:
        body = read_frame(_isolation.REQUEST_FD, limit=None)
    except EOFError:
        body = None
    if body is None:
        os._exit(0)  # Closed before a whole request came: nothing to run.
    os.close(_isolation.REQUEST_FD)
    return trusted_from_wire(json.loads(body))


def trusted_from_wire(wire: dict[str, Any]) -> PreparedRun:
    """Rebuild a request the parent validated (see `PreparedRun.to_wire`); no checks here."""
    return PreparedRun(
        source=wire["source"],
        entry=wire["entry"],
        args=wire["args"],
        kwargs=wire["kwargs"],
        limits=Limits(**wire["limits"]),
        imports=tuple(wire["imports"]),
    )


def main(
    setup: _isolation.ChildSetup,
    reply_fd: int,
    request_fd: int | None,
    executor: Executor = execute,
) -> NoReturn:
    """The child's whole life: isolate, wait for the request, run it, reply, exit.

    With no `request_fd` this is the probe of `doctor`: it verifies the layers instead.
    """
    try:
        _isolation.enter(setup, reply_fd, request_fd, tolerant=request_fd is None)
    except _isolation.LayerFailed as exc:
        _fail_layer(exc, reply_fd)
    if request_fd is None:
        _probe(setup)
    _write_all(_isolation.REPLY_FD, ISOLATED)
    if not _request_arrives(within=WARM_UP_AFTER):
        warm_up()
    run = _receive_request()
    try:
        _isolation.apply_run_limits(setup, run.limits)
    except _isolation.LayerFailed:
        os._exit(EXIT_ISOLATION_FAILED)  # after the marker: the parent reports it crashed
    _run(run, executor)


def _probe(setup: _isolation.ChildSetup) -> NoReturn:
    report = _isolation.verify(setup)
    _write_all(_isolation.REPLY_FD, json.dumps({"probe": report}).encode())
    os.close(_isolation.REPLY_FD)
    # Stay alive briefly so the parent can read /proc/<pid> (namespaces, seccomp mode).
    time.sleep(2)
    os._exit(0)


def _run(run: PreparedRun, executor: Executor) -> NoReturn:
    sys.setrecursionlimit(1000)
    state: _restricted.RunState

    def abort(status: str, err: dict[str, str]) -> NoReturn:
        _deliver(_status_body(status, err, state))

    try:
        state = _restricted.RunState(run.limits.output_bytes, abort)
        body = executor(run, state)
    except MemoryError:
        _deliver(_MEMORY_REPLY)
    _deliver(body)
