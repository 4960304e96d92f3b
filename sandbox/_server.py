"""The fork server: a fresh interpreter, started with an empty environment, that forks children.

It is spawned by `Sandbox` (see `_client.py`) from whatever process wants to run code, so that
the process that forks user code has never held a credential, even when its caller has. It reads
length-prefixed JSON requests on a Unix socket (its stdin and stdout) and answers each in turn.

An answer may carry a descriptor: the request channel of the next spare child (see
`Supervisor.hand_out`). The caller then writes its next request straight to that child and sends
here only `{"op": "dispatched", "limits": ...}`; a full request is still accepted at any time.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from ._errors import SandboxError
from ._policy import Policy
from ._request import from_wire
from ._supervisor import Supervisor

MAX_FRAME = 32 * 1024 * 1024
_HEADER = struct.Struct(">I")


def read_frame(fd: int) -> bytes | None:
    """Read one length-prefixed frame; None at end of stream."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError("frame too large")
    body = _read_exact(fd, size)
    if body is None:
        raise EOFError("stream ended inside a frame")
    return body


def send_frame(sock: socket.socket, body: bytes, fd: int | None = None) -> None:
    """Write one length-prefixed frame, with `fd` attached to its first byte if given."""
    data = memoryview(_HEADER.pack(len(body)) + body)
    if fd is not None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        data = data[sock.sendmsg([data], rights):]
    while data:
        data = data[sock.send(data):]


def recv_frame(sock: socket.socket) -> tuple[bytes | None, int | None]:
    """Read one frame and the descriptor sent with it, if any (received close-on-exec)."""
    header, ancillary, _, _ = sock.recvmsg(
        _HEADER.size, socket.CMSG_SPACE(array.array("i").itemsize), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    fd = fds[0] if fds else None
    for extra in fds[1:]:
        os.close(extra)
    try:
        if not header:
            return None, fd
        if len(header) < _HEADER.size:
            rest = _read_exact(sock.fileno(), _HEADER.size - len(header))
            if rest is None:
                raise EOFError("stream ended inside a frame")
            header += rest
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ValueError("frame too large")
        body = _read_exact(sock.fileno(), size) if size else b""
        if body is None:
            raise EOFError("stream ended inside a frame")
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return body, fd


def _read_exact(fd: int, size: int) -> bytes | None:
    """Exactly `size` bytes; None at a clean end of stream, EOFError if it ends part-way."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            if remaining == size:
                return None
            raise EOFError("stream ended inside a frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _handle(supervisor: Supervisor, frame: bytes) -> dict[str, Any]:
    try:
        wire = json.loads(frame)
        if wire.get("op") == "doctor":
            return {"layers": supervisor.layers}
        if wire.get("op") == "dispatched":
            outcome = supervisor.run_dispatched(supervisor.policy.limits(wire.get("limits")))
        else:
            outcome = supervisor.run(from_wire(supervisor.policy, wire))
        return {"outcome": outcome.to_dict()}
    except SandboxError as exc:
        return {"error": {"code": exc.code, "message": str(exc)}}
    except (ValueError, TypeError, AttributeError) as exc:
        return {"error": {"code": "invalid_request", "message": f"bad request: {exc}"}}
    except OSError as exc:
        # fork or pipe failed (process or descriptor limits): this run failed, the server lives.
        return {"error": {"code": "sandbox_error", "message": f"cannot start a child: {exc}"}}


def main(supervisor_class: type[Supervisor] = Supervisor) -> None:
    """Serve requests until stdin closes."""
    policy = Policy.load(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    # Keep the protocol on a private descriptor so nothing else can write into it.
    channel = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    supervisor = supervisor_class(policy)
    try:
        supervisor.prepare_next()
        _answer(channel, supervisor, {"ready": True, "layers": supervisor.layers})
        while True:
            frame = read_frame(channel.fileno())
            if frame is None:
                return
            _answer(channel, supervisor, _handle(supervisor, frame))
            supervisor.prepare_next()
    finally:
        supervisor.close()


def _answer(channel: socket.socket, supervisor: Supervisor, reply: dict[str, Any]) -> None:
    spare = supervisor.hand_out()
    try:
        send_frame(channel, json.dumps(reply).encode(), spare)
    finally:
        if spare is not None:
            os.close(spare)

if __name__ == "__main__":
    main()
