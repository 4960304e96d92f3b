"""No plaintext reaches the audit files: module source, arguments and results carrying canary
strings go through the public API, and only their digests come out."""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from pathlib import Path

import pytest

from appliance.audit import AuditFieldError, AuditLog, EventType, UnsafeInMemorySigner


def canaries() -> dict[str, str]:
    return {
        name: f"CANARY{name.upper()}{secrets.token_hex(8)}"
        for name in ("source", "arg", "kwarg", "result", "secret", "claimed")
    }


def assert_absent(directory: Path, marks: dict[str, str], extra: str = "") -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for mark in marks.values():
                for form in (mark.encode(), mark.lower().encode(), base64.b64encode(mark.encode())):
                    assert form not in data, f"{mark} found in {path.name}"
    for mark in marks.values():
        assert mark not in extra


def test_plaintext_never_reaches_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    marks = canaries()
    source = (
        f"# {marks['source']}\ndef f(x, key=None):\n"
        f"    return {{'echo': x, 'note': '{marks['source']}'}}\n"
    )
    args = [marks["arg"], {"nested": [marks["arg"]]}]
    kwargs = {"key": marks["kwarg"], "password": marks["secret"]}
    result = {"echo": marks["result"], "secret": marks["secret"]}
    log = AuditLog.open(
        tmp_path / "audit" / "audit.jsonl", UnsafeInMemorySigner(), source="api", checkpoint_every=3
    )
    log.record(
        EventType.SUBMISSION_ACCEPTED,
        client="alice",
        function="f",
        task_id="t1",
        result_key="f_1_ab",
        module_source=source,
        args=args,
        kwargs=kwargs,
    )
    log.record(
        EventType.SUBMISSION_REJECTED,
        code="compile_error",
        http_status=400,
        client=f"{marks['claimed']} with spaces",
        module_source=source.encode(),
    )
    log.record(EventType.AUTH_FAILED, code="unknown_key", client=f"{marks['claimed']}\n")
    log.record(
        EventType.EXECUTION_STARTED,
        task_id="t1",
        function="f",
        module_source=source,
        args=args,
        kwargs=kwargs,
    )
    log.record(
        EventType.EXECUTION_FINISHED,
        task_id="t1",
        status="ok",
        module_source=source,
        result=result,
        usage={"cpu_ms": 1},
    )
    log.record(
        EventType.RESULT_READ,
        client="alice",
        result_key="f_1_ab",
        status="succeeded",
        result=result,
    )
    # Plaintext offered where it has no place is refused, and the refusal does not echo it.
    for attempt in (
        {"reason": marks["secret"]},
        {"detail": marks["secret"]},
        {"code": f"{marks['secret']} leaked"},
    ):
        with pytest.raises(AuditFieldError) as info:
            log.record(EventType.TASK_REJECTED, **{"code": "bad_envelope", **attempt})
        assert marks["secret"] not in str(info.value)
    log.close()
    log_text = (tmp_path / "audit" / "audit.jsonl").read_text()
    assert hashlib.sha256(source.encode()).hexdigest() in log_text  # the module, as its hash
    assert_absent(tmp_path / "audit", marks, caplog.text)
