"""A fixed pool of sandbox fork servers, one per worker thread, spawned before any login."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

from sandbox import Launcher, Sandbox


class SandboxPool:
    """`size` fork servers; each run borrows one. Thread-safe.

    With a `launcher`, every fork server (and every replacement of one) comes from it, so that
    this process may drop its privileges (`privileges.drop_to`) and still get new ones.
    """

    def __init__(self, size: int, launcher: Launcher | None = None) -> None:
        self._idle: queue.Queue[Sandbox] = queue.Queue()
        self.size = size
        self._launcher = launcher
        for _ in range(size):
            self._idle.put(Sandbox(launcher=launcher).start())

    @contextmanager
    def borrow(self) -> Iterator[Sandbox]:
        """Take a fork server for one run."""
        sb = self._idle.get()
        try:
            yield sb
        finally:
            self._idle.put(sb)

    def close(self) -> None:
        """Stop every fork server, and the launcher."""
        while not self._idle.empty():
            self._idle.get_nowait().close()
        if self._launcher is not None:
            self._launcher.close()
