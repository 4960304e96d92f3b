"""The audit-log writer: one hash chain in one file, appended by many processes at once.

Design. The log file is the only source of truth and every writer process follows it:

- Mutual exclusion: `flock(LOCK_EX)` on the log's own file descriptor (one open file description
  per process, reopened after a fork) plus a thread lock inside the process. A writer holds the
  lock from reading the head to the end of its fsync, so every `seq` is taken exactly once.
- The head (last seq and hash) is not kept in a sidecar that could disagree with the log: under
  the lock each writer `fstat`s the log and reads whatever other processes appended since its own
  last look (usually one or two lines), checking that each chains on. Nothing else is read on the
  hot path, and a writer that finds the log shrunk, replaced or not chaining refuses to write
  (`AuditLogCorrupt`): the service fails closed rather than appending to a log it cannot vouch for.
- One `write()` of one line on an `O_APPEND` descriptor under the lock, then `fdatasync` after
  it is released, shared by the process's concurrent writers (group commit, `_commit.py`): each
  waits for a sync that began after its write completed, so an entry that `record()` returned is
  on disk, and the lock is held for a write, not for a sync (issue 16: N writers paid N syncs in
  turn). Until that sync, other writers may chain onto the entry; a crash can lose a suffix of
  entries that no `record()` returned, never one that did (`fdatasync` flushes the whole file,
  so a synced entry's predecessors are synced with it). The entries the log writes itself
  (checkpoints, `checkpoint.failed`, `audit.recovered`, `audit.truncation_detected`) are still
  synced under the lock, before anything is built on them. A line torn by a crash (no newline at
  the end) is cut off by the next writer, which records the cut (`audit.recovered`, with the
  fragment's SHA-256) so that the repair itself is on the record.
- Checkpoints: when `checkpoint_every` entries or `checkpoint_interval` seconds are pending, one
  process (whoever takes a non-blocking lock on `audit.checkpoint.lock`) snapshots the range under
  the log lock, syncs it, asks the signer (OpenBao transit) for a signature *outside* the lock,
  and appends the checkpoint entry under the lock again. Writers never wait for OpenBao: in a
  process whose checkpoint timer runs (the services'), the writer that finds a checkpoint due
  wakes the timer's thread to sign it instead of signing on its caller's request. When signing
  fails, the entries stay written, a `checkpoint.failed` entry says so once, and the checkpoint
  is retried with backoff.
- Anchors (issue 12): before a checkpoint is signed, the signing process checks that the log
  still holds the head of the last anchored checkpoint (`_anchors.py`); after it is signed, the
  checkpoint is anchored as a new, numbered entry of a create-only store (OpenBao KV), and only
  then appended to the log. A writer that finds the last anchored head missing from its log (cut,
  or replaced by another history) records `audit.truncation_detected` with the lost range before
  it writes anything else, and its next anchor is marked `recovers`; `verify_log` reports both.
  A signer that OpenBao refuses outright (the operator's token) writes entries but no
  checkpoints: the services sign them with their next checkpoint.
- Every checkpoint is also appended to `audit.checkpoints.jsonl`, whose last line doubles as the
  start-up hint (the byte offset of the first entry not yet signed) so that opening a long log
  reads only its unsigned tail.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Forbidden
from ._anchors import Anchor, AnchorConflict, AnchorStore
from ._commit import Batch, GroupCommit
from ._errors import AuditError, AuditFieldError, AuditLogCorrupt, AuditUnavailable
from ._events import INTERNAL_TYPES, AuditEvent, EventType, identifier, make_event
from ._format import (
    CHECKPOINT_TYPE,
    FORMAT_VERSION,
    GENESIS_HASH,
    AuditPaths,
    CheckpointBody,
    canonical,
    encode_entry,
    entry_hash,
    format_time,
    merkle_root,
    parse_time,
)
from ._signing import Signer, key_version

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_CHECKPOINT_INTERVAL = 60.0
_READ_CHUNK = 1 << 20
_MAX_RETRY_DELAY = 60.0


@dataclass(frozen=True)
class AuditRecord:
    """What `record()` wrote: the entry's sequence number, hash and time."""

    seq: int
    hash: str
    time: str


@dataclass
class _Pending:
    """An entry not yet covered by a checkpoint."""

    seq: int
    hash: str
    offset: int
    counts: bool  # checkpoint entries alone never make another checkpoint due
    epoch: float


@dataclass
class _Tail:
    """This process's view of the end of the log, refreshed under the lock."""

    ino: tuple[int, int]
    size: int = 0
    seq: int = 0
    head: str = GENESIS_HASH
    checkpointed_to: int = 0
    pending: list[_Pending] = field(default_factory=list)
    counting: int = 0
    first_counting: float | None = None
    checkpoint_head: str = GENESIS_HASH  # the hash of entry `checkpointed_to`
    truncation_for: int | None = None  # the anchor of the last `audit.truncation_detected`

    def add(self, item: _Pending) -> None:
        self.pending.append(item)
        if item.counts:
            self.counting += 1
            if self.first_counting is None:
                self.first_counting = item.epoch

    def covered(self, to_seq: int) -> None:
        """Entries up to `to_seq` are now in a checkpoint."""
        self.checkpointed_to = to_seq
        self.pending = [p for p in self.pending if p.seq > to_seq]
        counting = [p for p in self.pending if p.counts]
        self.counting = len(counting)
        self.first_counting = counting[0].epoch if counting else None


class AuditLog:
    """The tamper-evident audit log, safe to share between threads and processes on one host.

    Open it once per process with `AuditLog.open(path, signer, source="api")`, then call
    `record(EventType.X, **fields)` for every event. `record` returns only once the entry is on
    disk, and raises `AuditUnavailable` (a 503) when it cannot be; it raises `AuditFieldError` for
    a field outside the event's whitelist.
    """

    def __init__(
        self,
        paths: AuditPaths,
        signer: Signer | None,
        *,
        source: str,
        anchors: AnchorStore | None = None,
        checkpoint_every: int,
        checkpoint_interval: float,
        clock: Callable[[], float],
        durable: bool,
        auto_checkpoint: bool,
        group_commit: bool = True,
        sync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        if checkpoint_every < 1 or checkpoint_interval <= 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_interval > 0")
        self.paths = paths
        self._signer = signer
        self._anchors = anchors
        self._anchor: Anchor | None = None
        self._anchor_loaded = False
        self._source = identifier("source", source)
        self._every = checkpoint_every
        self._interval = checkpoint_interval
        self._clock = clock
        self._durable = durable
        self._auto = auto_checkpoint
        self._group_commit = group_commit
        self._fdatasync = sync
        self._closed = False
        self._retry_at = 0.0
        self._retry_delay = 1.0
        self._signing_down = False
        self._side_last_seq: int | None = None
        self._timer: _Timer | None = None
        self._reset_process_state()
        self._open_files()
        ref = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: _call_if_alive(ref))

    @classmethod
    def open(
        cls,
        path: Path | str,
        signer: Signer | None = None,
        *,
        source: str = "appliance",
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        clock: Callable[[], float] = time.time,
        durable: bool = True,
        auto_checkpoint: bool = True,
        anchors: AnchorStore | None | str = "signer",
        group_commit: bool = True,
        sync: Callable[[int], None] = os.fdatasync,
    ) -> AuditLog:
        """Open (creating if needed) the log at `path` and check that its tail chains.

        `signer` signs checkpoints (`TransitSigner` in services); without one, entries are
        written but never checkpointed. `source` names the writing service in each entry.
        `auto_checkpoint=False` leaves checkpoints to `maybe_checkpoint()` (e.g. from a timer
        thread), so that `record()` never waits for the signer. `anchors` is where checkpoints
        are anchored: by default the signer's own store (`TransitSigner.anchors`: OpenBao KV),
        None for none. `group_commit=False` syncs each entry under the lock, as before issue 16
        (for comparison: `bench/audit_append.py`); `sync` is how a descriptor is synced
        (`os.fdatasync`; a test may wrap it to see which entries each sync covered).
        """
        if isinstance(anchors, str):
            found = getattr(signer, "anchors", None)
            anchors = found if isinstance(found, AnchorStore) else None
        log = cls(
            AuditPaths(Path(path)),
            signer,
            source=source,
            anchors=anchors,
            checkpoint_every=checkpoint_every,
            checkpoint_interval=checkpoint_interval,
            clock=clock,
            durable=durable,
            auto_checkpoint=auto_checkpoint,
            group_commit=group_commit,
            sync=sync,
        )
        try:
            with log._guard():
                pass
            log._reconcile_at_open()
        except BaseException:
            log._close_files()
            raise
        return log

    # ---- public operations -------------------------------------------------------------------

    def record(self, event_type: EventType | str, /, **fields: Any) -> AuditRecord:
        """Validate and append one event; see `make_event` for the plaintext-taking keywords."""
        return self.append(make_event(event_type, **fields))

    def append(self, event: AuditEvent) -> AuditRecord:
        """Append an already validated event; return once it is on disk."""
        if event.type in INTERNAL_TYPES:
            raise AuditFieldError(f"{event.type} entries are written by the audit log itself")
        fields = dict(event.fields)
        for name, digest in event.blind.items():
            fields[name] = self._keyed_digest(name, digest)
        shared = self._durable and self._group_commit
        with self._guard():
            written = self._append_locked(event.type, fields, sync=not shared)
            batch = self._commit.join() if shared else None
            due = self._due(self._clock())
        if batch is not None:
            self._await_sync(batch)
        if due and self._auto:
            self._checkpoint_due()
        return written

    def maybe_checkpoint(self, *, force: bool = False) -> AuditRecord | None:
        """Write a checkpoint if one is due (or, with `force`, if any entry is unsigned).

        Returns the checkpoint entry, or None when none was due, another process is signing a
        due one (without `force`; with it, this waits its turn), or the signer failed (the
        entries stay written; the checkpoint is retried later).
        """
        return self._try_checkpoint(force=force)

    def start_checkpoint_timer(self, period: float = 10.0) -> threading.Thread:
        """Check every `period` seconds, in a daemon thread, whether a checkpoint is due by time.

        Without it, the interval is only checked when an event is recorded, so the last events
        before a quiet spell stay unsigned until the next one. `close()` stops the thread. Start
        it in the process that records (after any fork: threads do not survive one).
        """
        timer = _Timer(threading.Event(), threading.Event())

        def run() -> None:
            while True:
                timer.wake.wait(period)
                timer.wake.clear()
                if timer.stop.is_set():
                    return
                try:
                    self.maybe_checkpoint()
                except AuditError as exc:
                    logger.warning("audit checkpoint timer: %s", exc)

        timer.thread = threading.Thread(target=run, name="audit-checkpoints", daemon=True)
        self._timer = timer
        timer.thread.start()
        return timer.thread

    def close(self, *, final_checkpoint: bool = True) -> None:
        """Sign what is pending (best effort) and close the files."""
        if self._closed:
            return
        if self._timer is not None:
            self._timer.stop.set()
            self._timer.wake.set()
            thread = self._timer.thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=30)
        if final_checkpoint:
            try:
                self._try_checkpoint(force=True)
            except AuditError as exc:
                logger.warning("final audit checkpoint failed: %s", exc)
        self._closed = True
        self._close_files()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- files, locks and forks --------------------------------------------------------------

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._thread_lock = threading.Lock()
        self._checkpoint_thread_lock = threading.Lock()
        self._commit = GroupCommit(lambda: self._fdatasync(self._fd))
        self._tail: _Tail | None = None
        self._stale = False

    def _open_files(self) -> None:
        directory = self.paths.log.parent
        created = not directory.exists()
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            shared = _shared_by_group(directory)
            self._fd = _open_private(self.paths.log, flags, shared)
            self._side_fd = _open_private(self.paths.checkpoints, flags, shared)
            self._lock_fd = _open_private(self.paths.checkpoint_lock, flags, shared)
            self._digest_key = _digest_key(self.paths.digest_key, shared)
            if created:
                _fsync_dir(directory.parent)
            _fsync_dir(directory)
        except OSError as exc:
            raise AuditUnavailable(f"cannot open the audit log {self.paths.log}: {exc}") from exc

    def _close_files(self) -> None:
        for name in ("_fd", "_side_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass  # Already closed: nothing left to release.
                setattr(self, name, None)

    def _after_fork_in_child(self) -> None:
        # The child shares the parent's open file descriptions, and flock() locks belong to the
        # description: without new ones, parent and child would both "hold" the lock. Locks that
        # another thread held at the fork would never be released in the child either.
        self._reset_process_state()
        self._timer = None  # threads do not survive a fork
        self._pid = -1  # reopen lazily, outside the fork handler

    @contextmanager
    def _guard(self) -> Iterator[_Tail]:
        """Thread lock, then the log's flock, then a fresh tail: the critical section."""
        with self._thread_lock:
            if self._closed:
                raise AuditError("the audit log is closed")
            if self._pid != os.getpid():
                # First use in a forked child: new open file descriptions, tail read afresh.
                self._close_files()
                self._pid, self._tail, self._stale = os.getpid(), None, False
                self._open_files()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise AuditUnavailable(f"cannot lock the audit log: {exc}") from exc
            try:
                tail = self._sync()
                yield tail
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ---- reading the tail ----------------------------------------------------------------------

    def _sync(self) -> _Tail:
        """Bring this process's tail up to date with what others appended; raise if it breaks."""
        try:
            fd_stat = os.fstat(self._fd)
            try:
                path_stat = os.stat(self.paths.log)
            except FileNotFoundError:
                raise AuditLogCorrupt(f"the audit log {self.paths.log} was removed") from None
            ino = (fd_stat.st_dev, fd_stat.st_ino)
            if (path_stat.st_dev, path_stat.st_ino) != ino:
                raise AuditLogCorrupt(f"the audit log {self.paths.log} was replaced")
            size, fragment = self._cut_torn_tail(self._fd, fd_stat.st_size)
            self._cut_torn_tail(self._side_fd, os.fstat(self._side_fd).st_size)
            if self._tail is None or self._stale or self._tail.ino != ino:
                self._stale = False
                self._tail = self._load(ino, size)
            tail = self._tail
            if size < tail.size:
                raise AuditLogCorrupt(
                    f"the audit log {self.paths.log} shrank from {tail.size} to {size} bytes"
                )
            if size > tail.size:
                self._absorb(tail, tail.size, size)
            if fragment is not None:
                self._append_locked(
                    EventType.LOG_RECOVERED,
                    {
                        "code": "torn_tail",
                        "fragment_sha256": hashlib.sha256(fragment).hexdigest(),
                        "fragment_bytes": len(fragment),
                    },
                )
            return tail
        except OSError as exc:
            self._tail = None
            raise AuditUnavailable(f"cannot read the audit log {self.paths.log}: {exc}") from exc
        except AuditError:
            self._tail = None
            raise

    def _cut_torn_tail(self, fd: int, size: int) -> tuple[int, bytes | None]:
        """Cut a last line without its newline (a crash mid-write); return (size, fragment).

        Every cooperating writer appends whole lines under the lock, so a fragment seen under the
        lock is never a write in progress.
        """
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size, None
        start = size
        while start > 0:
            begin = max(0, start - 4096)
            newline = os.pread(fd, start - begin, begin).rfind(b"\n")
            if newline >= 0:
                start = begin + newline + 1
                break
            start = begin
        fragment = os.pread(fd, size - start, start)
        os.ftruncate(fd, start)
        self._fdatasync(fd)
        logger.warning("audit: cut a torn last line of %d bytes (a crash mid-write)", len(fragment))
        return start, fragment

    def _load(self, ino: tuple[int, int], size: int) -> _Tail:
        """The tail of the whole log: from the last checkpoint's hint, else from the start."""
        hint = self._last_side_line()
        if hint is not None:
            try:
                tail = _Tail(
                    ino,
                    size=int(hint["resume_offset"]),
                    seq=int(hint["to_seq"]),
                    head=str(hint["head_hash"]),
                    checkpointed_to=int(hint["to_seq"]),
                    checkpoint_head=str(hint["head_hash"]),
                )
                if tail.size <= size:
                    self._absorb(tail, tail.size, size)
                    if tail.seq >= int(hint["seq"]):
                        return tail
            except (AuditLogCorrupt, KeyError, TypeError, ValueError):
                pass  # A stale or bad hint: read the whole log instead.
        tail = _Tail(ino)
        self._absorb(tail, 0, size)
        if hint is not None and tail.seq < int(hint.get("seq", 0)):
            raise AuditLogCorrupt(
                f"the audit log ends at seq {tail.seq} but a checkpoint was written at seq "
                f"{hint.get('seq')}: it was truncated"
            )
        return tail

    def _absorb(self, tail: _Tail, start: int, end: int) -> None:
        """Read the complete lines in [start, end) and chain them onto `tail`."""
        offset, carry = start, b""
        while offset < end:
            chunk = os.pread(self._fd, min(_READ_CHUNK, end - offset), offset)
            if not chunk:
                raise AuditLogCorrupt(f"the audit log {self.paths.log} shrank while reading")
            line_start = offset - len(carry)
            offset += len(chunk)
            *lines, carry = (carry + chunk).split(b"\n")
            for raw in lines:
                self._absorb_line(tail, raw, line_start)
                line_start += len(raw) + 1
        if carry:
            raise AuditLogCorrupt(f"the audit log {self.paths.log} ends mid-line")
        tail.size = end

    def _absorb_line(self, tail: _Tail, raw: bytes, offset: int) -> None:
        try:
            entry = json.loads(raw)
            seq, prev, claimed = entry["seq"], entry["prev_hash"], entry["hash"]
            epoch = parse_time(entry["time"]).timestamp()
        except (ValueError, KeyError, TypeError):
            raise AuditLogCorrupt(
                f"the line at byte {offset} of {self.paths.log} is not an audit entry"
            ) from None
        if seq != tail.seq + 1 or prev != tail.head or claimed != entry_hash(entry):
            raise AuditLogCorrupt(
                f"the entry at byte {offset} of {self.paths.log} does not chain to seq "
                f"{tail.seq}: run `appliance audit verify`"
            )
        tail.seq, tail.head = seq, claimed
        is_checkpoint = entry.get("type") == CHECKPOINT_TYPE
        tail.add(_Pending(seq, claimed, offset, not is_checkpoint, epoch))
        tail.size = offset + len(raw) + 1
        if entry.get("type") == EventType.TRUNCATION_DETECTED:
            tail.truncation_for = entry.get("anchor")
        if is_checkpoint:
            self._on_checkpoint_entry(tail, entry, offset)

    # ---- appending ---------------------------------------------------------------------------

    def _append_locked(
        self, kind: EventType, fields: dict[str, Any], *, sync: bool = True
    ) -> AuditRecord:
        """Append one entry; the caller holds the lock and has synced the tail. Without `sync`
        the caller waits for a group commit (`append`) once it has released the lock."""
        tail = self._tail
        assert tail is not None  # noqa: S101 - narrows a type; an invariant, not a check
        now = self._clock()
        entry: dict[str, Any] = {
            **fields,
            "v": FORMAT_VERSION,
            "seq": tail.seq + 1,
            "time": format_time(now),
            "type": str(kind),
            "source": self._source,
            "pid": os.getpid(),
            "prev_hash": tail.head,
        }
        entry["hash"] = entry_hash(entry)
        line = encode_entry(entry)
        offset = tail.size
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.EIO, f"short write ({written} of {len(line)} bytes)")
            if self._durable and sync:
                self._fdatasync(self._fd)
        except OSError as exc:
            self._tail = None  # read everything again before the next append
            raise AuditUnavailable(
                f"cannot write the audit log {self.paths.log}: {exc.strerror or exc}"
            ) from exc
        tail.seq, tail.head, tail.size = entry["seq"], entry["hash"], offset + written
        is_checkpoint = kind == EventType.CHECKPOINT
        tail.add(_Pending(tail.seq, tail.head, offset, not is_checkpoint, now))
        if kind == EventType.TRUNCATION_DETECTED:
            tail.truncation_for = int(fields["anchor"])
        if is_checkpoint:
            self._on_checkpoint_entry(tail, entry, offset)
        return AuditRecord(entry["seq"], entry["hash"], entry["time"])

    def _keyed_digest(self, name: str, digest: bytes) -> str:
        # Keyed, so that a reader of the log cannot confirm a guessed argument or result.
        keyed = hmac.new(self._digest_key, name.encode() + b"\0" + digest, hashlib.sha256)
        return keyed.hexdigest()

    def _await_sync(self, batch: Batch) -> None:
        """Wait for the group commit that covers an entry just written; raise when it failed."""
        try:
            self._commit.wait(batch)
        except OSError as exc:
            self._stale = True  # read everything again before the next append
            raise AuditUnavailable(
                f"cannot write the audit log {self.paths.log}: {exc.strerror or exc}"
            ) from exc

    # ---- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_due(self) -> None:
        """A checkpoint is due after an append: the timer's thread signs it when it runs (off
        the caller's request), else this thread does."""
        timer = self._timer
        if timer is not None and timer.thread is not None and timer.thread.is_alive():
            timer.wake.set()
            return
        try:
            self._try_checkpoint(force=False)
        except AuditError as exc:
            # The entry is written; the next record() meets the same error, if it lasts.
            logger.warning("audit checkpoint skipped: %s", exc)

    def _due(self, now: float) -> bool:
        tail = self._tail
        if tail is None or tail.counting == 0:
            return False
        assert tail.first_counting is not None  # noqa: S101 - narrows a type; an invariant, not a check
        return tail.counting >= self._every or now - tail.first_counting >= self._interval

    def _try_checkpoint(self, *, force: bool) -> AuditRecord | None:
        if self._signer is None or self._closed:
            return None
        if not force and self._clock() < self._retry_at:
            return None
        # A due checkpoint is skipped while another thread or process signs (it will sign what
        # is due). A forced one (close, an explicit call) waits its turn, so that nothing
        # written before it stays unsigned.
        if not self._checkpoint_thread_lock.acquire(blocking=force):
            return None
        try:
            return self._checkpoint_once(force)
        finally:
            self._checkpoint_thread_lock.release()

    def _checkpoint_once(self, force: bool) -> AuditRecord | None:
        assert self._signer is not None  # noqa: S101 - narrows a type; an invariant, not a check
        with self._guard() as tail:
            if not (self._due(self._clock()) or (force and tail.counting > 0)):
                return None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX if force else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # another process is signing this range
        try:
            return self._checkpoint_locked(force)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _checkpoint_locked(self, force: bool) -> AuditRecord | None:
        """Check continuity, sign, anchor, append: under the checkpoint lock."""
        assert self._signer is not None  # noqa: S101 - narrows a type; an invariant, not a check
        try:
            self._refresh_anchor()
        except Exception as exc:  # noqa: BLE001 - any store failure must cost no entry
            with self._guard() as tail:
                pending = (tail.checkpointed_to + 1, tail.seq)
            self._checkpoint_failed(pending, exc)
            return None
        with self._guard() as tail:
            if not (self._due(self._clock()) or (force and tail.counting > 0)):
                return None  # it was signed while we waited for the lock
            recovers = self._continuity(tail)
            body = CheckpointBody(
                from_seq=tail.checkpointed_to + 1,
                to_seq=tail.seq,
                head_hash=tail.head,
                merkle_root=merkle_root([p.hash for p in tail.pending]),
                signed_at=format_time(self._clock()),
            )
        # Outside the log lock: writers never wait for OpenBao.
        try:
            # The range may hold entries whose writers still wait for their group commit: it is
            # on disk before its head is signed and anchored.
            self._sync_range()
            signature = self._signer.sign(body.message())
            version = key_version(signature)
            self._anchor_checkpoint(body, signature, recovers=recovers)
        except Forbidden as exc:
            # This identity may not sign or anchor (the operator): it records, others sign.
            logger.warning("audit: %s; checkpoints are left to the services", exc)
            self._signer = None
            return None
        except Exception as exc:  # noqa: BLE001 - any signer failure must cost no entry
            self._checkpoint_failed((body.from_seq, body.to_seq), exc)
            return None
        self._signing_recovered()
        checkpoint = make_event(
            EventType.CHECKPOINT,
            internal=True,
            from_seq=body.from_seq,
            to_seq=body.to_seq,
            head_hash=body.head_hash,
            merkle_root=body.merkle_root,
            signed_at=body.signed_at,
            signature=signature,
            key_version=version,
        )
        with self._guard() as tail:
            if tail.checkpointed_to != body.from_seq - 1:
                return None  # signed by someone else meanwhile
            return self._append_locked(EventType.CHECKPOINT, dict(checkpoint.fields))

    def _sync_range(self) -> None:
        """Make every entry written so far durable (through the group commit)."""
        if self._durable:
            self._await_sync(self._commit.join())

    # ---- anchors -------------------------------------------------------------------------------

    def _refresh_anchor(self) -> None:
        """Bring the cached last anchor up to date: one list at first, then one read per call."""
        if self._anchors is None:
            return
        if not self._anchor_loaded:
            self._anchor = self._anchors.latest()
            self._anchor_loaded = True
        while True:
            number = self._anchor.number if self._anchor else 0
            following = self._anchors.get(number + 1)
            if following is None:
                return
            self._anchor = following

    def _reconcile_at_open(self) -> None:
        """At start-up: a log that lost the last anchored head says so before anything else."""
        if self._anchors is None or self._signer is None:
            return
        try:
            self._refresh_anchor()
        except Exception as exc:  # noqa: BLE001 - OpenBao down at start-up: checked later
            logger.warning("audit: cannot read the anchors at start-up (%s); checked later", exc)
            return
        with self._guard() as tail:
            self._continuity(tail)

    def _continuity(self, tail: _Tail) -> bool:
        """Whether the next anchor must be a recovery one: the log no longer holds the head of
        the last anchor. Records `audit.truncation_detected` (once) when it does not."""
        previous = self._anchor
        if self._anchors is None or previous is None:
            # No anchor yet: anchoring starts here (mid-log for a log older than anchors).
            return tail.checkpointed_to > 0
        if self._head_at(tail, previous.to_seq) == previous.head_hash:
            return False
        if tail.truncation_for != previous.number:
            cut = previous.to_seq > tail.seq
            event = make_event(
                EventType.TRUNCATION_DETECTED,
                internal=True,
                code="truncated" if cut else "replaced",
                lost_from_seq=tail.seq + 1 if cut else 1,
                lost_to_seq=previous.to_seq,
                anchor=previous.number,
                anchored_head=previous.head_hash,
            )
            logger.error(
                "audit: the log lost entries seq %s..%s anchored by anchor %d",
                event.fields["lost_from_seq"],
                previous.to_seq,
                previous.number,
            )
            self._append_locked(event.type, dict(event.fields))
        return True

    def _anchor_checkpoint(self, body: CheckpointBody, signature: str, *, recovers: bool) -> None:
        """Anchor the signed checkpoint as the next number; raises when it cannot."""
        if self._anchors is None:
            return
        previous = self._anchor
        if previous is not None and not recovers and previous.to_seq >= body.to_seq:
            return  # that head is anchored already (a crash between anchoring and appending)
        start = body.from_seq if recovers or previous is None else previous.to_seq + 1
        anchor = Anchor(
            number=(previous.number if previous else 0) + 1,
            from_seq=start,
            to_seq=body.to_seq,
            head_hash=body.head_hash,
            merkle_root=body.merkle_root,
            signed_at=body.signed_at,
            signature=signature,
            recovers=recovers,
        )
        try:
            self._anchors.create(anchor)
        except AnchorConflict:
            self._anchor_loaded = False  # someone else anchored: read them again next time
            raise
        self._anchor = anchor

    def _head_at(self, tail: _Tail, seq: int) -> str | None:
        """The hash of entry `seq` of this log, or None when the log ends before it."""
        if seq > tail.seq:
            return None
        if seq == tail.checkpointed_to:
            return tail.checkpoint_head
        for item in tail.pending:
            if item.seq == seq:
                return item.hash
        return self._scan_hash(seq, tail.size)

    def _scan_hash(self, seq: int, end: int) -> str | None:
        """Read the log from the start for entry `seq` (rare: only when anchors disagree)."""
        offset, carry = 0, b""
        while offset < end:
            chunk = os.pread(self._fd, min(_READ_CHUNK, end - offset), offset)
            if not chunk:
                return None
            offset += len(chunk)
            *lines, carry = (carry + chunk).split(b"\n")
            for raw in lines:
                entry = json.loads(raw)
                if entry.get("seq") == seq:
                    return str(entry["hash"])
        return None

    def _checkpoint_failed(self, pending: tuple[int, int], exc: Exception) -> None:
        self._retry_at = self._clock() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, _MAX_RETRY_DELAY)
        logger.warning(
            "audit checkpoint not signed or anchored (%s); retrying in %.0f s",
            type(exc).__name__,
            self._retry_delay,
        )
        if self._signing_down or pending[1] < pending[0]:
            return
        self._signing_down = True
        code = getattr(exc, "code", None)
        fields = {"from_seq": pending[0], "to_seq": pending[1]}
        try:
            event = make_event(
                EventType.CHECKPOINT_FAILED,
                internal=True,
                code=code if isinstance(code, str) else "signing_failed",
                **fields,
            )
        except AuditFieldError:
            event = make_event(
                EventType.CHECKPOINT_FAILED, internal=True, code="signing_failed", **fields
            )
        with self._guard():
            self._append_locked(event.type, dict(event.fields))

    def _signing_recovered(self) -> None:
        self._signing_down = False
        self._retry_delay = 1.0
        self._retry_at = 0.0

    def _on_checkpoint_entry(self, tail: _Tail, entry: dict[str, Any], offset: int) -> None:
        """A checkpoint entry is in the log: mark its range signed and make sure the checkpoint
        file has it (a crash between the two writes leaves it missing: repair that here)."""
        tail.covered(int(entry["to_seq"]))
        tail.checkpoint_head = str(entry["head_hash"])
        if self._side_last_seq is None or entry["seq"] > self._side_last_seq:
            last = self._last_side_line()
            self._side_last_seq = int(last["seq"]) if last else 0
        if entry["seq"] <= self._side_last_seq:
            return
        line = {
            k: entry[k]
            for k in (
                "seq",
                "hash",
                "time",
                "from_seq",
                "to_seq",
                "head_hash",
                "merkle_root",
                "signed_at",
                "signature",
                "key_version",
            )
        }
        line["offset"] = offset
        line["resume_offset"] = tail.pending[0].offset
        try:
            os.write(self._side_fd, canonical(line) + b"\n")
            if self._durable:
                self._fdatasync(self._side_fd)
        except OSError as exc:
            # The checkpoint is in the log; reloading the log (next time) repairs the file.
            self._stale = True
            logger.warning("cannot write the audit checkpoint file: %s", exc)
            return
        self._side_last_seq = int(entry["seq"])

    def _last_side_line(self) -> dict[str, Any] | None:
        """The last line of the checkpoint file (complete: torn tails are cut), or None."""
        size = os.fstat(self._side_fd).st_size
        if size == 0:
            return None
        begin = max(0, size - 64 * 1024)
        lines = os.pread(self._side_fd, size - begin, begin).rstrip(b"\n").split(b"\n")
        try:
            value = json.loads(lines[-1])
            int(value["seq"])
        except (ValueError, KeyError, TypeError):
            raise AuditLogCorrupt(
                f"the last line of {self.paths.checkpoints} is not a checkpoint: "
                "run `appliance audit verify`"
            ) from None
        return dict(value)


@dataclass
class _Timer:
    """The checkpoint timer's thread: `wake` makes it check at once, `stop` ends it."""

    stop: threading.Event
    wake: threading.Event
    thread: threading.Thread | None = None


def _call_if_alive(ref: weakref.WeakMethod[Callable[[], None]]) -> None:
    method = ref()
    if method is not None:
        method()


def _shared_by_group(directory: Path) -> bool:
    """Whether the log's directory is shared by the writers' group (setgid, as the stack makes it
    when its services run as users of their own): then its files are the group's too."""
    return bool(directory.stat().st_mode & stat.S_ISGID)


def _open_private(path: Path, flags: int, shared: bool) -> int:
    """Open (or create) one of the log's files: 0600, or 0660 in a directory the writers share
    (set on the descriptor, whatever the process's umask). Never through a symlink.

    An existing file is opened without O_CREAT: in the writers' shared directory, which is
    sticky, `fs.protected_regular=2` (Debian's default, the VM image's) refuses an O_CREAT open
    of a file another writer owns, even one the group may write. Only a missing file is
    created, with O_EXCL.
    """
    flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags & ~os.O_CREAT)
    except FileNotFoundError:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another writer created it meanwhile
            fd = os.open(path, flags & ~os.O_CREAT)
    if shared and os.fstat(fd).st_uid == os.geteuid():
        os.fchmod(fd, 0o660)
    return fd


def _digest_key(path: Path, shared: bool = False) -> bytes:
    """The log's local digest key: created once (0600, or 0640 for the writers' group; complete
    before it is visible), then read by every writer."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if shared:
                os.fchmod(fd, 0o640)
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process won the race: use its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) != 32:
        raise OSError(errno.EINVAL, f"{path} is not a 32-byte key")
    return key


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
