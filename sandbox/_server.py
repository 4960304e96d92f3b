"""The fork server: a fresh interpreter, started with an empty environment, that forks children.

It is spawned by `Sandbox` (see `_client.py`) from whatever process wants to run code, so that
the process that forks user code has never held a credential, even when its caller has. Its
command line names no host path: where the package lives and which policy to load arrive as the
first line on stdin (see `_client._BOOT`), and the strings the kernel put on its initial stack
(arguments, environment, the interpreter's path) are wiped before any child exists, since
every child inherits that stack. It then reads length-prefixed JSON requests on stdin and
answers on stdout, one at a time.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

from ._errors import SandboxError, ZygoteLost
from ._framing import MAX_FRAME, read_frame, write_frame
from ._outcome import Outcome, error
from ._policy import Policy
from ._request import from_wire
from ._supervisor import Supervisor

_AT_EXECFN = 31  # getauxval(): the path the interpreter was executed by, on the initial stack
#: What `ps` shows for a fork server once its command line is wiped.
TITLE = b"sandbox-fork-server"


def _handle(supervisor: Supervisor, frame: bytes) -> dict[str, Any]:
    """One request's answer. Nothing a request or a child does may end this process, except a
    lost zygote (ZygoteLost), which the caller answers and then exits on."""
    try:
        wire = json.loads(frame)
        if isinstance(wire, dict) and wire.get("op") == "doctor":
            return {"layers": supervisor.layers, "details": supervisor.details()}
        outcome = supervisor.run(from_wire(supervisor.policy, wire))
        return {"outcome": outcome.to_dict()}
    except ZygoteLost:
        raise
    except SandboxError as exc:
        return {"error": {"code": exc.code, "message": str(exc)}}
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        return {"error": {"code": "invalid_request", "message": f"bad request: {exc}"}}
    except OSError as exc:
        # fork or pipe failed (process or descriptor limits): this run failed, the server lives.
        return {"error": {"code": "sandbox_error", "message": f"cannot start a child: {exc}"}}
    except Exception as exc:  # noqa: BLE001 - this run failed; the server must live on
        return {"error": {"code": "sandbox_error", "message": f"run failed: {type(exc).__name__}"}}


def encode_answer(answer: dict[str, Any]) -> bytes:
    """The answer as one frame's body; an outcome too large for a frame becomes output_limit."""
    body = json.dumps(answer).encode()
    if len(body) <= MAX_FRAME:
        return body
    usage = answer.get("outcome", {}).get("usage", {})
    limited = Outcome("output_limit", error=error("OutputLimit", "reply exceeded its cap"))
    return json.dumps({"outcome": {**limited.to_dict(), "usage": usage}}).encode()


def wipe_initial_stack() -> None:
    """Zero the argument and environment strings on this process's initial stack.

    Every child is a fork of this process and inherits its stack: the strings there (the
    command line, the environment the process was started with, the interpreter's path) are
    readable by code that has beaten the compile layer, even after os.environ is cleared. The
    command line is left reading `TITLE`, for `ps`.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        # After the command name: field 48 of proc(5) is arg_start, 51 env_end (1-based).
        arg_start, env_end = int(fields[45]), int(fields[48])
        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        execfn = int(libc.getauxval(_AT_EXECFN))
    except (OSError, ValueError, IndexError, AttributeError):
        return
    end = env_end
    if execfn >= env_end:
        end = execfn + len(ctypes.string_at(execfn)) + 1
    if not 0 < arg_start < end or end - arg_start > 1 << 20:
        return
    ctypes.memset(arg_start, 0, end - arg_start)
    ctypes.memmove(arg_start, TITLE, min(len(TITLE), env_end - arg_start - 1))


def main(policy_path: str | None = None, supervisor_class: type[Supervisor] = Supervisor) -> None:
    """Serve requests until stdin closes (or, after answering, when the zygote is lost)."""
    wipe_initial_stack()
    policy = Policy.load(Path(policy_path) if policy_path else None)
    # Keep the protocol on private descriptors so nothing else can write into it.
    req_fd, resp_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    supervisor = supervisor_class(policy)
    try:
        hello = {"ready": True, "layers": supervisor.layers, "details": supervisor.details()}
        write_frame(resp_fd, json.dumps(hello).encode())
        supervisor.prepare_next()
        while True:
            frame = read_frame(req_fd)
            if frame is None:
                return
            try:
                answer = _handle(supervisor, frame)
            except ZygoteLost as exc:
                write_frame(
                    resp_fd, json.dumps({"error": {"code": exc.code, "message": str(exc)}}).encode()
                )
                return
            write_frame(resp_fd, encode_answer(answer))
            supervisor.prepare_next()
    finally:
        supervisor.close()
