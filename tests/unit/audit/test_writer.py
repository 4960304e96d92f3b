"""The writer: consecutive seqs under concurrency (threads, forks, processes), durability,
torn-tail repair, fail-closed on a broken log, and checkpoints by count and by time."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from appliance.audit import (
    AuditFieldError,
    AuditLog,
    AuditLogCorrupt,
    EventType,
    UnsafeInMemorySigner,
    export_public_keys,
    verify_log,
)
from appliance.errors import DependencyUnavailable

from .helpers import SEED, paths, read_lines, records, write_in_process, write_lines, write_sample


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingSigner(UnsafeInMemorySigner):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.down = False

    def sign(self, message: bytes) -> str:
        self.calls += 1
        if self.down:
            raise DependencyUnavailable("OpenBao is unreachable")
        return super().sign(message)


def _task(log: AuditLog, i: int) -> None:
    log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"t{i}")


def _tasks(log: AuditLog, first: int, count: int) -> None:
    for i in range(first, first + count):
        _task(log, i)


def test_seq_starts_at_one_and_chains(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "audit.jsonl")
    first = log.record("auth.failed", code="bad_signature")
    second = log.record("auth.failed", code="expired")
    log.close()
    assert (first.seq, second.seq) == (1, 2)
    [a, b] = records(tmp_path / "audit.jsonl")
    assert a["prev_hash"] == "0" * 64 and b["prev_hash"] == a["hash"] == first.hash


def test_a_refused_event_writes_nothing(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "audit.jsonl")
    with pytest.raises(AuditFieldError):
        log.record("auth.failed", code="bad_signature", body="{...}")
    log.close()
    assert (tmp_path / "audit.jsonl").read_bytes() == b""


def test_files_are_private(tmp_path: Path) -> None:
    AuditLog.open(tmp_path / "audit" / "audit.jsonl").close()
    assert (tmp_path / "audit").stat().st_mode & 0o777 == 0o700
    for name in ("audit.jsonl", "audit.checkpoints.jsonl", "audit.digest.key"):
        assert (tmp_path / "audit" / name).stat().st_mode & 0o777 == 0o600


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    signer = UnsafeInMemorySigner()
    keys = export_public_keys(signer, tmp_path / "keys.json")
    write_sample(path, signer, 25)
    write_sample(path, signer, 25)
    assert [r["seq"] for r in records(path)] == list(range(1, len(records(path)) + 1))
    # 27 entries (checkpoints at 11 and 22), then 25 more: checkpoints at 33, 44 and 55.
    report = verify_log(path, keys)
    assert (report.entries, report.checkpoints, report.unsigned) == (55, 5, 0)


def test_a_bad_start_up_hint_falls_back_to_reading_the_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    signer = UnsafeInMemorySigner()
    write_sample(path, signer, 25)
    side = paths(path).checkpoints
    side.write_bytes(side.read_bytes().replace(b'"resume_offset":', b'"resume_offset":1'))
    write_sample(path, signer, 5)
    # 27 entries, then 5: the tenth pending entry (seq 32) makes checkpoint seq 33 due.
    assert [r["type"] for r in records(path)][-2:] == ["submission.accepted", "checkpoint"]
    assert len(records(path)) == 33


def test_threads_share_one_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    signer = UnsafeInMemorySigner()
    keys = export_public_keys(signer, tmp_path / "keys.json")
    log = AuditLog.open(path, signer, checkpoint_every=20, durable=False)
    threads = [threading.Thread(target=_tasks, args=(log, n * 1000, 150)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    report = verify_log(path, keys)
    assert sum(r["type"] == "task.rejected" for r in records(path)) == 600
    assert report.unsigned == 0


def test_a_forked_child_gets_its_own_lock(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path, durable=False)
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_tasks, args=(log, 10_000, 300))
    child.start()
    for i in range(300):
        _task(log, i)
    child.join()
    assert child.exitcode == 0
    log.close()
    entries = records(path)
    assert [r["seq"] for r in entries] == list(range(1, 601))
    assert len({r["pid"] for r in entries}) == 2
    verify_log(path, None)


def test_four_processes_lose_nothing_and_repeat_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    signer = UnsafeInMemorySigner.from_seed(SEED)
    keys = export_public_keys(signer, paths(path).public_keys)
    AuditLog.open(path).close()
    context = multiprocessing.get_context("fork")
    barrier, out = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=write_in_process, args=(str(path), n, 1000, barrier, out))
        for n in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    entries = records(path)
    assert [r["seq"] for r in entries] == list(range(1, len(entries) + 1))
    events = [r for r in entries if r["type"] == "execution.finished"]
    assert len(events) == 4000 and len({r["task_id"] for r in events}) == 4000
    assert Counter(r["source"] for r in events) == {f"w{n}": 1000 for n in range(4)}
    report = verify_log(path, keys)
    assert report.unsigned == 0 and report.checkpoints >= 40
    assert not report.warnings


def test_a_torn_last_line_is_cut_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path, None, 3)
    path.write_bytes(path.read_bytes() + b'{"v":1,"seq":4,"ti')
    log = AuditLog.open(path)
    log.record("auth.failed", code="expired")
    log.close()
    entries = records(path)
    assert [r["type"] for r in entries[3:]] == ["audit.recovered", "auth.failed"]
    assert entries[3]["fragment_bytes"] == 18 and entries[3]["seq"] == 4
    verify_log(path, None)


def test_a_log_cut_before_its_last_checkpoint_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path, UnsafeInMemorySigner(), 25)
    write_lines(path, read_lines(path)[:15])
    with pytest.raises(AuditLogCorrupt, match="truncated"):
        AuditLog.open(path)


def test_a_log_that_shrinks_under_a_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path)
    for i in range(3):
        _task(log, i)
    write_lines(path, read_lines(path)[:2])
    with pytest.raises(AuditLogCorrupt, match="shrank"):
        _task(log, 3)


def test_a_replaced_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path)
    _task(log, 0)
    os.rename(path, tmp_path / "elsewhere.jsonl")
    path.write_bytes(b"")
    with pytest.raises(AuditLogCorrupt, match="replaced"):
        _task(log, 1)


def test_a_foreign_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path)
    _task(log, 0)
    with path.open("ab") as handle:
        handle.write(b'{"seq": 2, "note": "appended by someone else"}\n')
    with pytest.raises(AuditLogCorrupt, match="not an audit entry|does not chain"):
        _task(log, 1)


def test_a_checkpoint_is_due_after_n_entries(tmp_path: Path) -> None:
    signer = CountingSigner()
    log = AuditLog.open(tmp_path / "audit.jsonl", signer, checkpoint_every=5, durable=False)
    for i in range(4):
        _task(log, i)
    assert signer.calls == 0
    _task(log, 4)
    assert signer.calls == 1
    log.close(final_checkpoint=False)
    [checkpoint] = [r for r in records(tmp_path / "audit.jsonl") if r["type"] == "checkpoint"]
    assert (checkpoint["from_seq"], checkpoint["to_seq"], checkpoint["seq"]) == (1, 5, 6)


def test_a_checkpoint_is_due_after_t_seconds(tmp_path: Path) -> None:
    clock, signer = Clock(), CountingSigner()
    log = AuditLog.open(tmp_path / "audit.jsonl", signer, checkpoint_interval=60, clock=clock)
    _task(log, 0)
    assert log.maybe_checkpoint() is None
    clock.now += 61
    checkpoint = log.maybe_checkpoint()
    assert checkpoint is not None and checkpoint.seq == 2
    clock.now += 600
    # A checkpoint entry alone never makes another one due: an idle log stays quiet.
    assert log.maybe_checkpoint() is None
    assert signer.calls == 1
    log.close()


def test_without_auto_checkpoint_record_never_signs(tmp_path: Path) -> None:
    signer = CountingSigner()
    log = AuditLog.open(tmp_path / "audit.jsonl", signer, checkpoint_every=2, auto_checkpoint=False)
    for i in range(5):
        _task(log, i)
    assert signer.calls == 0
    assert log.maybe_checkpoint() is not None and signer.calls == 1
    log.close()


def test_signing_down_costs_no_entry_and_is_retried_with_backoff(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock, signer = Clock(), CountingSigner()
    keys = export_public_keys(signer, tmp_path / "keys.json")
    signer.down = True
    log = AuditLog.open(path, signer, checkpoint_every=3, clock=clock, durable=False)
    for i in range(10):
        _task(log, i)
    assert signer.calls == 1  # then backing off
    clock.now += 1.5
    _task(log, 10)
    assert signer.calls == 2
    signer.down = False
    clock.now += 5
    _task(log, 11)
    assert signer.calls == 3
    log.close()
    entries = records(path)
    failed = [r for r in entries if r["type"] == "checkpoint.failed"]
    assert len(failed) == 1 and failed[0]["code"] == "dependency_unavailable"
    assert sum(r["type"] == "task.rejected" for r in entries) == 12
    assert verify_log(path, keys).unsigned == 0


def test_processes_sharing_a_digest_key_agree(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    one, two = AuditLog.open(path), AuditLog.open(path)
    for log in (one, two):
        log.record("result.read", client="a", result_key="k", status="succeeded", result=[1])
    one.close()
    two.close()
    first, second = records(path)
    assert first["result_hmac"] == second["result_hmac"]


def test_the_timer_signs_a_quiet_log(tmp_path: Path) -> None:
    clock, signer = Clock(), CountingSigner()
    log = AuditLog.open(tmp_path / "audit.jsonl", signer, checkpoint_interval=60, clock=clock)
    _task(log, 0)
    clock.now += 61
    log.start_checkpoint_timer(period=0.01)
    deadline = time.monotonic() + 5
    while signer.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    log.close()
    assert signer.calls == 1
    assert [r["type"] for r in records(tmp_path / "audit.jsonl")] == ["task.rejected", "checkpoint"]
