"""Group commit (issue 16): concurrent appends share one `fdatasync`, and every entry is on disk
before `record()` returns; many threads in several processes lose nothing and the chain
verifies; checkpoint signing happens on the timer's thread, not the appender's."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import (
    AuditLog,
    AuditRecord,
    AuditUnavailable,
    EventType,
    UnsafeInMemorySigner,
    export_public_keys,
    verify_log,
)

from .helpers import SEED, paths, read_lines, records

_WAIT = 10.0


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _task(log: AuditLog, name: str) -> AuditRecord:
    return log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=name)


class GatedSync:
    """`fdatasync` behind a gate: records the log's size when each sync starts (every line
    written before it), holds it until the test opens the gate, then really syncs."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.started: list[int] = []  # the log's size when each sync of the log began
        self.finished: list[int] = []  # the same sizes, once the sync returned
        self.failing: set[int] = set()  # which syncs (0 the first) fail with EIO

    def __call__(self, fd: int) -> None:
        if os.fstat(fd).st_ino != self.log_path.stat().st_ino:
            os.fdatasync(fd)  # the checkpoint file
            return
        size = os.fstat(fd).st_size
        with self.lock:
            number = len(self.started)
            self.started.append(size)
        assert self.gate.wait(_WAIT), "the test never opened the gate"
        if number in self.failing:
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)
        with self.lock:
            self.finished.append(size)


def _line_ends(path: Path) -> dict[int, int]:
    """seq -> the byte offset just past its line."""
    ends, offset = {}, 0
    for line in read_lines(path):
        offset += len(line)
        ends[json.loads(line)["seq"]] = offset
    return ends


def test_an_append_returns_only_after_a_sync_that_began_after_its_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sync = GatedSync(path)
    log = AuditLog.open(path, sync=sync)
    returned: list[tuple[AuditRecord, list[int]]] = []
    lock = threading.Lock()

    def append(name: str) -> None:
        record = _task(log, name)
        with sync.lock:
            synced = list(sync.finished)
        with lock:
            returned.append((record, synced))

    first = threading.Thread(target=append, args=("first",))
    first.start()
    _wait_for(lambda: len(sync.started) == 1, "the first writer's sync")
    others = [threading.Thread(target=append, args=(f"t{i}",)) for i in range(7)]
    for thread in others:
        thread.start()
    # Seven more entries are written while the first sync is held: the lock is not.
    _wait_for(lambda: len(read_lines(path)) == 8, "eight written entries")
    assert returned == []  # written, but nobody returned before a sync
    assert sync.started == [_line_ends(path)[1]]  # the first sync covers the first entry only
    sync.gate.set()
    for thread in [first, *others]:
        thread.join(_WAIT)
    log.close(final_checkpoint=False)

    ends = _line_ends(path)
    assert sorted(r.seq for r, _ in returned) == list(range(1, 9))
    for record, synced in returned:
        # A sync that started after the entry's line was complete had finished by the return.
        assert any(size >= ends[record.seq] for size in synced), (record.seq, synced)
    # Eight appends, two syncs: the first writer's, then one for the seven that waited.
    assert len(sync.started) == 2 and sync.started[1] == ends[8]
    verify_log(path, None)


def test_without_group_commit_each_entry_is_synced_under_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sync = GatedSync(path)
    sync.gate.set()
    log = AuditLog.open(path, sync=sync, group_commit=False)
    threads = [
        threading.Thread(target=lambda n=n: [_task(log, f"{n}-{i}") for i in range(20)])
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_WAIT)
    log.close(final_checkpoint=False)
    ends = sorted(_line_ends(path).values())
    assert sorted(sync.started) == ends  # one sync per entry, each right after its own line


def test_a_failed_sync_fails_every_writer_of_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sync = GatedSync(path)
    log = AuditLog.open(path, sync=sync)
    outcomes: list[str] = []

    def append(name: str) -> None:
        try:
            _task(log, name)
            outcomes.append("ok")
        except AuditUnavailable as exc:
            outcomes.append(exc.code)

    first = threading.Thread(target=append, args=("first",))
    first.start()
    _wait_for(lambda: len(sync.started) == 1, "the first writer's sync")
    batch = [threading.Thread(target=append, args=(f"b{i}",)) for i in range(3)]
    for thread in batch:
        thread.start()
    _wait_for(lambda: len(read_lines(path)) == 4, "four written entries")
    # The first sync succeeds; the second, the batch of three, fails with EIO.
    sync.failing = {1}
    sync.gate.set()
    for thread in [first, *batch]:
        thread.join(_WAIT)
    assert len(sync.started) == 2
    assert Counter(outcomes) == {"ok": 1, "audit_unavailable": 3}
    # The log goes on: the next entry chains on what is in the file.
    assert _task(log, "after").seq == 5
    log.close(final_checkpoint=False)
    verify_log(path, None)


def _threads_in_process(path: str, index: int, threads: int, count: int, barrier: Any) -> None:
    """Body of one writer process: `threads` threads of `count` durable appends each."""
    log = AuditLog.open(
        Path(path), UnsafeInMemorySigner.from_seed(SEED), source=f"p{index}", checkpoint_every=50
    )
    barrier.wait()

    def run(n: int) -> None:
        for i in range(count):
            log.record(
                EventType.EXECUTION_FINISHED,
                task_id=f"p{index}-{n}-{i}",
                function="f",
                status="ok",
                usage={"cpu_ms": i, "wall_ms": i},
            )

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    log.close()


def test_threads_in_three_processes_lose_nothing_and_the_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    signer = UnsafeInMemorySigner.from_seed(SEED)
    keys = export_public_keys(signer, paths(path).public_keys)
    AuditLog.open(path).close()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    processes = [
        context.Process(target=_threads_in_process, args=(str(path), n, 8, 60, barrier))
        for n in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    entries = records(path)
    assert [r["seq"] for r in entries] == list(range(1, len(entries) + 1))
    events = [r for r in entries if r["type"] == "execution.finished"]
    assert len(events) == 3 * 8 * 60 and len({r["task_id"] for r in events}) == len(events)
    assert Counter(r["source"] for r in events) == {f"p{n}": 480 for n in range(3)}
    report = verify_log(path, keys)
    # Checkpoints of 50 or more entries (a range due while another process signs waits for
    # the next): every entry is covered.
    assert report.unsigned == 0 and report.checkpoints >= 2
    # The operator's command agrees (exit 0).
    done = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "audit", "verify", "--log", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"{len(entries)} entries, chain intact" in done.stdout


class ThreadRecordingSigner(UnsafeInMemorySigner):
    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def sign(self, message: bytes) -> str:
        self.threads.append(threading.current_thread().name)
        return super().sign(message)


def test_a_due_checkpoint_is_signed_by_the_timer_not_the_appender(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    signer = ThreadRecordingSigner()
    keys = export_public_keys(signer, tmp_path / "keys.json")
    log = AuditLog.open(path, signer, checkpoint_every=5)
    log.start_checkpoint_timer(period=3600)  # only an append that finds one due wakes it
    for i in range(5):
        _task(log, f"t{i}")
    _wait_for(lambda: len(signer.threads) == 1, "the timer's signature")
    _wait_for(lambda: records(path)[-1]["type"] == "checkpoint", "the checkpoint entry")
    assert signer.threads == ["audit-checkpoints"]
    log.close(final_checkpoint=False)
    report = verify_log(path, keys)
    assert (report.entries, report.checkpoints, report.unsigned) == (6, 1, 0)


@pytest.mark.parametrize("group_commit", [True, False])
def test_a_checkpoint_covers_only_entries_already_on_disk(
    tmp_path: Path, group_commit: bool
) -> None:
    path = tmp_path / "audit.jsonl"
    sync = GatedSync(path)
    sync.gate.set()
    signed_after: list[int] = []

    class Recording(UnsafeInMemorySigner):
        def sign(self, message: bytes) -> str:
            with sync.lock:
                signed_after.append(max(sync.finished, default=0))
            return super().sign(message)

    log = AuditLog.open(path, Recording(), checkpoint_every=3, sync=sync, group_commit=group_commit)
    for i in range(3):
        _task(log, f"t{i}")
    log.close(final_checkpoint=False)
    ends = _line_ends(path)
    assert len(signed_after) == 1 and signed_after[0] >= ends[3]
