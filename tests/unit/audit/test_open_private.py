"""The audit log's files are opened without O_CREAT when they exist (Debian's
`fs.protected_regular=2` refuses an O_CREAT open of another writer's file in the writers' sticky
shared directory: the VM image's worker could not open the log the API had made), created with
O_EXCL only when missing, and never through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.audit import _writer


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real_open = os.open

    def record(path: object, flags: int, *args: int) -> int:
        seen.append(flags)
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_writer.os, "open", record)
    return seen


def test_an_existing_file_is_opened_without_o_creat(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"")
    seen = _recording(monkeypatch)
    fd = _writer._open_private(log, os.O_RDWR | os.O_APPEND | os.O_CREAT, shared=True)
    os.close(fd)
    assert len(seen) == 1
    assert not seen[0] & os.O_CREAT and seen[0] & os.O_NOFOLLOW


def test_a_missing_file_is_created_exclusively(tmp_path: Path, monkeypatch) -> None:
    seen = _recording(monkeypatch)
    fd = _writer._open_private(tmp_path / "new.jsonl", os.O_RDWR | os.O_CREAT, shared=True)
    assert os.fstat(fd).st_mode & 0o777 == 0o660
    os.close(fd)
    assert seen[-1] & os.O_CREAT and seen[-1] & os.O_EXCL and seen[-1] & os.O_NOFOLLOW


def test_a_symlink_in_place_of_the_log_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "audit.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        _writer._open_private(tmp_path / "audit.jsonl", os.O_RDWR | os.O_CREAT, shared=True)
