"""`show`: time filters, field filters, the table and JSON Lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import AuditLog, Filters, parse_since, select
from appliance.audit._show import format_table, to_json_lines

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("30s", NOW - timedelta(seconds=30)),
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(weeks=1)),
        ("2025-05-31T10:00:00Z", datetime(2025, 5, 31, 10, tzinfo=UTC)),
        ("2025-05-31T10:00:00+02:00", datetime(2025, 5, 31, 8, tzinfo=UTC)),
        ("2025-05-31", datetime(2025, 5, 31, tzinfo=UTC)),
    ],
)
def test_since_accepts_durations_and_iso_times(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "15", "-5m", "5y", ""])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text, NOW)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    hours_ago = [5.0]
    audit = AuditLog.open(path, clock=lambda: NOW.timestamp() - 3600 * hours_ago[0], durable=False)
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "submission.accepted",
            {
                "client": "alice",
                "function": "add",
                "task_id": "t1",
                "result_key": "add_1_a",
                "module_source": "x",
            },
        ),
        (
            "execution.finished",
            {
                "client": "alice",
                "function": "add",
                "task_id": "t1",
                "status": "ok",
                "usage": {"cpu_ms": 3},
            },
        ),
        ("policy.denied", {"client": "bob", "function": "rm", "code": "function_not_allowed"}),
        ("auth.failed", {"code": "bad_signature", "client": "bob"}),
        (
            "execution.finished",
            {"client": "bob", "function": "add", "task_id": "t2", "status": "timeout"},
        ),
    ]
    for event_type, fields in events:
        audit.record(event_type, **fields)
        hours_ago[0] -= 1
    audit.close()
    return path


def test_filters(log: Path) -> None:
    def seqs(**kw: object) -> list[int]:
        return [e["seq"] for e in select(log, Filters(**kw)).entries]  # type: ignore[arg-type]

    assert seqs() == [1, 2, 3, 4, 5]
    assert seqs(client="bob") == [3, 4, 5]
    assert seqs(status="ok") == [2]
    assert seqs(function="add") == [1, 2, 5]
    assert seqs(type="execution") == [2, 5]
    assert seqs(type="execution.finished", client="bob") == [5]
    assert seqs(since=NOW - timedelta(hours=2, minutes=30)) == [4, 5]


def test_limit_keeps_the_last_entries(log: Path) -> None:
    assert [e["seq"] for e in select(log, Filters(), limit=2).entries] == [4, 5]


def test_lines_that_are_not_entries_are_counted(log: Path) -> None:
    log.write_bytes(log.read_bytes() + b"garbage\n[1]\n")
    reading = select(log, Filters())
    assert len(reading.entries) == 5 and reading.skipped == 2


def test_table_and_json_lines(log: Path) -> None:
    entries = select(log, Filters()).entries
    table = format_table(entries)
    assert table.splitlines()[0].split() == [
        "SEQ",
        "TIME",
        "TYPE",
        "CLIENT",
        "FUNCTION",
        "STATUS",
        "DETAIL",
    ]
    assert "code=function_not_allowed" in table and "usage=cpu_ms:3" in table
    lines = to_json_lines(entries).splitlines()
    assert len(lines) == 5 and lines[0].startswith('{"client":"alice"')


def test_table_never_prints_terminal_escapes() -> None:
    table = format_table([{"seq": 1, "client": "\x1b]0;pwned\x07", "type": "auth.failed"}])
    assert "\x1b" not in table and "\\x1b" in table
