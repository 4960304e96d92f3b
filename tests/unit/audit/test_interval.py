"""Verify bounds how much of the log goes without a checkpoint (issue 12, finding 6): counted in
events and in time between the entries' own times, never against the wall clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.audit import AuditLog, EventType, VerificationFailed, verify_log


def _unsigned(path: Path, count: int, step: float) -> None:
    now = [1_700_000_000.0]

    def clock() -> float:
        now[0] += step
        return now[0]

    log = AuditLog.open(path, None, source="api", clock=clock, durable=False)
    for i in range(count):
        log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"t{i}")
    log.close()


def test_too_many_unsigned_events_fail(tmp_path: Path) -> None:
    _unsigned(tmp_path / "audit.jsonl", 1001, 0.001)
    with pytest.raises(VerificationFailed, match="1001 events") as info:
        verify_log(tmp_path / "audit.jsonl", None)
    assert info.value.kind == "unsigned" and info.value.seq == 1
    assert verify_log(tmp_path / "audit.jsonl", None, max_unsigned_entries=2000).unsigned == 1001


def test_too_long_unsigned_fails_by_the_logs_own_times(tmp_path: Path) -> None:
    _unsigned(tmp_path / "audit.jsonl", 4, 120.0)  # minutes between the first and the last
    with pytest.raises(VerificationFailed, match=r"over \d+ s") as info:
        verify_log(tmp_path / "audit.jsonl", None)
    assert info.value.kind == "unsigned"
    _unsigned(tmp_path / "short.jsonl", 4, 20.0)  # within the bound, whenever it is checked
    assert verify_log(tmp_path / "short.jsonl", None).unsigned == 4
