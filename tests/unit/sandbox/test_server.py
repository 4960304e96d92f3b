"""The fork server's framing and request handling: garbage in, a structured error out."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest

from sandbox import Policy
from sandbox._server import MAX_FRAME, _handle, read_frame, recv_frame, send_frame


class _NoRuns:
    """Stands in for a Supervisor: any request that gets this far would be a test failure."""

    policy = Policy.load()
    layers: dict[str, str] = {}

    def run(self, run):  # pragma: no cover - must not be reached
        raise AssertionError("a malformed request reached the supervisor")

    def run_dispatched(self, limits):  # pragma: no cover - must not be reached
        raise AssertionError("malformed limits reached the supervisor")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xff",
        b"[1, 2]",
        b'"text"',
        b'{"source": 1, "entry": "f"}',
        b'{"source": "", "entry": "__init__"}',
        b'{"source": "", "entry": "f", "args": {}}',
        b'{"source": "", "entry": "f", "limits": {"cpu_seconds": "fast"}}',
        b'{"source": "", "entry": "f", "imports": "os"}',
        b'{"source": "", "entry": "f", "imports": ["os"]}',
        b'{"source": "", "entry": "f", "args": [NaN]}',
        b'{"op": "dispatched", "limits": [1]}',
        b'{"op": "dispatched", "limits": {"cpu_seconds": "fast"}}',
        b'{"op": "dispatched", "limits": {"cpu_seconds": 1e9}}',
        b'{"op": "dispatched", "limits": {"wall": 1}}',
    ],
)
def test_malformed_requests_get_a_structured_error(frame):
    reply = _handle(_NoRuns(), frame)  # type: ignore[arg-type]
    assert set(reply) == {"error"}
    assert reply["error"]["code"] in {"invalid_request", "import_not_allowed",
                                      "limit_not_allowed"}


def test_frames_round_trip_and_oversized_frames_are_refused():
    ours, theirs = socket.socketpair()
    try:
        send_frame(ours, b"hello")
        assert read_frame(theirs.fileno()) == b"hello"
        ours.send(struct.pack(">I", MAX_FRAME + 1))
        with pytest.raises(ValueError, match="too large"):
            read_frame(theirs.fileno())
        ours.send(struct.pack(">I", 10) + b"abc")
        ours.close()
        with pytest.raises(EOFError):
            read_frame(theirs.fileno())
        assert read_frame(theirs.fileno()) is None
    finally:
        ours.close()
        theirs.close()


def test_a_descriptor_travels_with_its_frame_and_is_closed_on_exec():
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        send_frame(ours, b"with a spare", write_end)
        send_frame(ours, b"without")
        body, fd = recv_frame(theirs)
        assert body == b"with a spare" and fd is not None
        assert os.get_inheritable(fd) is False
        os.write(fd, b"x")  # the very pipe that was sent
        os.close(fd)
        assert os.read(read_end, 1) == b"x"
        assert recv_frame(theirs) == (b"without", None)
    finally:
        for end in (ours, theirs):
            end.close()
        os.close(read_end)
        os.close(write_end)


def test_a_refused_frame_does_not_leak_the_descriptor_sent_with_it():
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        ours.sendmsg(
            [struct.pack(">I", MAX_FRAME + 1)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end]))],
        )
        os.close(write_end)
        write_end = -1
        with pytest.raises(ValueError, match="too large"):
            recv_frame(theirs)
        # Every write end is closed again: the reader sees the end of the pipe.
        assert os.read(read_end, 1) == b""
    finally:
        ours.close()
        theirs.close()
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)
