"""Group commit: the threads of one process that appended to the log share one `fdatasync`.

A writer appends its line under the log's locks (`_writer`), releases them, and then waits for
a sync that began after its write completed: it joins the *next* batch, the one that has not
started yet. Whoever finds no sync running starts the next batch and syncs for every writer in
it; the others wait on a condition. An entry is therefore on disk before `record()` returns, as
it was when each writer synced alone, but N concurrent writers pay for about two syncs, not N.

`fdatasync` flushes every dirty page of the file, whoever wrote it: a batch covers the lines of
other processes too. Those processes still sync for their own writers (this module does not
reach across processes), but they no longer wait for each other's syncs under the log's lock.

A failed sync fails every writer of its batch (each raises); a later successful sync does not
vouch for a batch whose own sync failed (after an I/O error the kernel may have dropped the
dirty pages), so each batch keeps its own outcome.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Batch:
    """The writers that wait for one sync, and how that sync ended."""

    done: bool = False
    errno: int = 0
    strerror: str = ""

    def raise_if_failed(self) -> None:
        """Raise the sync's OSError (a new one for each writer) when it failed."""
        if self.errno or self.strerror:
            raise OSError(self.errno, self.strerror)


class GroupCommit:
    """Batches the syncs of one process's writers. `sync` makes every completed write durable
    (raises OSError when it cannot); it runs outside every lock but this object's."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition(threading.Lock())
        self._next = Batch()
        self._syncing = False

    def join(self) -> Batch:
        """The batch whose sync will cover a write that has just completed: one not started."""
        with self._cond:
            return self._next

    def wait(self, batch: Batch) -> None:
        """Return once `batch`'s sync completed, syncing it ourselves if nobody is; raise its
        OSError when it failed."""
        with self._cond:
            while not batch.done:
                if self._syncing:
                    self._cond.wait()
                    continue
                # Nothing is syncing, so `batch` has not started: it is `self._next`.
                self._run_next()
        batch.raise_if_failed()

    def _run_next(self) -> None:
        """Start the next batch and sync for it; called with the condition held, returns with
        it held again."""
        running, self._next = self._next, Batch()
        self._syncing = True
        self._cond.release()
        try:
            self._sync()
        except OSError as exc:
            running.errno, running.strerror = exc.errno or 0, exc.strerror or str(exc)
        except BaseException as exc:
            # Not an I/O error (an interrupt in this thread): the others must not take it for
            # a sync, and this thread goes on raising it.
            running.strerror = f"the sync was interrupted ({type(exc).__name__})"
            raise
        finally:
            self._cond.acquire()
            running.done = True
            self._syncing = False
            self._cond.notify_all()
