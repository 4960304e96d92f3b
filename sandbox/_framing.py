"""Length-prefixed frames: the fork server's protocol with its caller, and a child's request.

A frame is a 4-byte big-endian length, then that many bytes. Its end never depends on the
sender closing the channel (a copy of the write end held by a forked process would keep that
from happening), and the reader allocates exactly what it reads.
"""

from __future__ import annotations

import os
import struct

MAX_FRAME = 32 * 1024 * 1024
_HEADER = struct.Struct(">I")


def read_frame(fd: int, limit: int | None = MAX_FRAME) -> bytes | None:
    """Read one length-prefixed frame; None at end of stream; ValueError above `limit` bytes."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if limit is not None and size > limit:
        raise ValueError("frame too large")
    body = _read_exact(fd, size)
    if body is None:
        raise EOFError("stream ended inside a frame")
    return body


def write_frame(fd: int, body: bytes) -> None:
    """Write one length-prefixed frame."""
    data = memoryview(_HEADER.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data) :]


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
