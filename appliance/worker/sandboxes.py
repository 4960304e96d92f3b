"""A fixed pool of sandbox fork servers, one per worker thread, spawned before any login."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

from sandbox import Sandbox


class SandboxPool:
    """`size` fork servers; each run borrows one. Thread-safe."""

    def __init__(self, size: int) -> None:
        self._idle: queue.Queue[Sandbox] = queue.Queue()
        self.size = size
        for _ in range(size):
            self._idle.put(Sandbox().start())

    @contextmanager
    def borrow(self) -> Iterator[Sandbox]:
        """Take a fork server for one run."""
        sb = self._idle.get()
        try:
            yield sb
        finally:
            self._idle.put(sb)

    def close(self) -> None:
        """Stop every fork server."""
        while not self._idle.empty():
            self._idle.get_nowait().close()
