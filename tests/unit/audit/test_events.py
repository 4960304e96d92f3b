"""The audit vocabulary: default deny on fields, plaintext only ever as a digest."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.audit import AuditFieldError, EventType, UnsafeMemoryAuditSink, make_event


def test_accepted_submission_keeps_only_hashes() -> None:
    source = "def add(a, b):\n    return a + b\n"
    event = make_event(
        EventType.SUBMISSION_ACCEPTED,
        client="alice",
        function="add",
        task_id="t1",
        result_key="add_1_ab",
        module_source=source,
        args=[1, 2],
        kwargs={"x": 3},
    )
    assert event.fields["module_sha256"] == hashlib.sha256(source.encode()).hexdigest()
    assert event.fields["status"] == "accepted"
    assert set(event.blind) == {"args_hmac"}
    assert source not in repr(event)


@pytest.mark.parametrize("field", ["module", "source", "args_plain", "result_value", "detail"])
def test_a_field_outside_the_whitelist_is_refused(field: str) -> None:
    with pytest.raises(AuditFieldError, match=field):
        extra: dict[str, Any] = {field: "x"}
        make_event("auth.failed", code="bad_signature", **extra)


def test_plaintext_keywords_only_where_they_make_sense() -> None:
    with pytest.raises(AuditFieldError, match="result="):
        make_event("auth.failed", code="bad_signature", result={"secret": 1})
    with pytest.raises(AuditFieldError, match="args="):
        make_event("result.read", client="a", result_key="k", status="succeeded", args=[1])


def test_required_fields_and_fixed_status() -> None:
    with pytest.raises(AuditFieldError, match="requires field"):
        make_event("execution.finished", task_id="t1")
    with pytest.raises(AuditFieldError, match="status"):
        make_event("policy.denied", client="a", code="function_not_allowed", status="ok")
    event = make_event(
        "execution.finished",
        task_id="t1",
        status="timeout",
        usage={"cpu_ms": 5, "wall_ms": 9, "max_rss_kb": 1000},
    )
    assert event.fields["usage"] == {"cpu_ms": 5, "wall_ms": 9, "max_rss_kb": 1000}


def test_internal_types_are_refused_to_callers() -> None:
    for kind in ("checkpoint", "checkpoint.failed", "audit.recovered"):
        with pytest.raises(AuditFieldError, match="written by the audit log itself"):
            make_event(kind, code="x")
    with pytest.raises(AuditFieldError, match="unknown audit event type"):
        make_event("made.up", code="x")


def test_result_none_is_a_result() -> None:
    event = make_event("execution.finished", task_id="t", status="ok", result=None)
    assert "result_hmac" in event.blind


def test_module_source_and_hash_must_agree() -> None:
    with pytest.raises(AuditFieldError, match="disagree"):
        make_event(
            "execution.started",
            task_id="t",
            function="f",
            module_source="x",
            module_sha256="0" * 64,
        )


@pytest.mark.parametrize("value", ["Ok", "has space", "x" * 65, "", "ok\n", 3])
def test_slugs_are_strict_and_never_echoed(value: object) -> None:
    with pytest.raises(AuditFieldError) as info:
        make_event("task.rejected", code=value)
    if isinstance(value, str) and value:
        assert value.strip() not in str(info.value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("http_status", 99),
        ("http_status", "401"),
        ("http_status", True),
        ("step", -1),
    ],
)
def test_integers_are_range_checked(field: str, value: object) -> None:
    with pytest.raises(AuditFieldError):
        extra: dict[str, Any] = {field: value}
        make_event("submission.rejected", code="bad_request", **extra)


def test_usage_is_counters_only() -> None:
    for usage in (
        {"cpu_ms": -1},
        {"cpu_ms": 1.5},
        {"Bad Key": 1},
        {f"k{i}": 1 for i in range(17)},
        ["cpu_ms"],
    ):
        with pytest.raises(AuditFieldError):
            make_event("execution.finished", task_id="t", status="ok", usage=usage)


@given(st.text(max_size=300))
def test_an_untrusted_identifier_is_stored_verbatim_only_when_harmless(claimed: str) -> None:
    event = make_event("auth.failed", code="unknown_key", client=claimed)
    stored = event.fields.get("client")
    if claimed == "":
        # An empty string is not an identifier: stored as its digest.
        assert stored == "sha256:" + hashlib.sha256(b"").hexdigest()
        return
    assert (
        stored == claimed
        or stored
        == "sha256:" + hashlib.sha256(claimed.encode("utf-8", "surrogatepass")).hexdigest()
    )
    assert re.fullmatch(r"[A-Za-z0-9_.:@/+=\[\]-]{1,200}", str(stored))


def test_memory_sink_applies_the_same_rules() -> None:
    sink = UnsafeMemoryAuditSink()
    sink.record("result.read", client="alice", result_key="k1", status="succeeded", result={"v": 1})
    with pytest.raises(AuditFieldError):
        sink.record(
            "result.read", client="alice", result_key="k1", status="succeeded", value={"v": 1}
        )
    [stored] = sink.of_type("result.read")
    assert stored["client"] == "alice" and "result_hmac" in stored and "result" not in stored
