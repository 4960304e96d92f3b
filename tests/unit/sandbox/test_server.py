"""The fork server's framing and request handling: garbage in, a structured error out."""

from __future__ import annotations

import os
import struct

import pytest

from sandbox import Policy
from sandbox._framing import MAX_FRAME, read_frame, write_frame
from sandbox._server import _handle


class _NoRuns:
    """Stands in for a Supervisor: any request that gets this far would be a test failure."""

    policy = Policy.load()
    layers: dict[str, str] = {}

    def run(self, run):  # pragma: no cover - must not be reached
        raise AssertionError("a malformed request reached the supervisor")


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
    ],
)
def test_malformed_requests_get_a_structured_error(frame):
    reply = _handle(_NoRuns(), frame)  # type: ignore[arg-type]
    assert set(reply) == {"error"}
    assert reply["error"]["code"] in {"invalid_request", "import_not_allowed", "limit_not_allowed"}


def test_frames_round_trip_and_oversized_frames_are_refused():
    read_fd, write_fd = os.pipe()
    try:
        write_frame(write_fd, b"hello")
        assert read_frame(read_fd) == b"hello"
        os.write(write_fd, struct.pack(">I", MAX_FRAME + 1))
        with pytest.raises(ValueError, match="too large"):
            read_frame(read_fd)
        os.write(write_fd, struct.pack(">I", 10) + b"abc")
        os.close(write_fd)
        write_fd = -1
        with pytest.raises(EOFError):
            read_frame(read_fd)
        assert read_frame(read_fd) is None
    finally:
        os.close(read_fd)
        if write_fd != -1:
            os.close(write_fd)
