"""Flower's launcher without a stack: event redaction and the route table (default deny)."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from appliance.flower import (
    REDACTED,
    AuthenticatedMetrics,
    NotFound,
    Refused,
    read_only_handlers,
    redact_event,
)


def _routes() -> dict[str, Any]:
    routes = {}
    for handler in read_only_handlers():
        if isinstance(handler, tuple):
            routes[handler[0]] = handler[1]
        else:
            routes[handler.regex.pattern.removesuffix("$")] = handler.handler_class
    return routes


def test_acting_routes_are_refused() -> None:
    routes = _routes()
    for pattern in (
        "/api/task/async-apply/(.+)",
        "/api/task/send-task/(.+)",
        "/api/task/apply/(.+)",
        "/api/task/revoke/(.+)",
        "/api/task/abort/(.+)",
        "/api/worker/shutdown/(.+)",
        "/api/worker/pool/restart/(.+)",
        "/api/task/result/(.+)",
        "/login/?",
    ):
        assert routes[pattern] is Refused, pattern
    assert routes["/metrics"] is AuthenticatedMetrics
    assert routes[".*"] is NotFound


def test_a_route_flower_adds_later_is_refused() -> None:
    routed = read_only_handlers([("/api/task/new-way-to-run/(.+)", object), ("/tasks", object)])
    assert routed == [("/api/task/new-way-to-run/(.+)", Refused), ("/tasks", object)]


def test_task_event_is_redacted() -> None:
    event = {
        "type": "task-received",
        "uuid": "u",
        "name": "appliance.run_job",
        "args": "['canary-arg']",
        "kwargs": "{'k': 'canary-kw'}",
        "hostname": "w",
    }
    clean = redact_event(event)
    assert clean["args"] == REDACTED and clean["kwargs"] == REDACTED
    assert clean["uuid"] == "u" and clean["name"] == "appliance.run_job"
    assert event["args"] == "['canary-arg']"  # The original is not modified.


def test_result_is_kept_only_as_a_status_word() -> None:
    assert redact_event({"type": "task-succeeded", "result": "'ok'"})["result"] == "'ok'"
    for result in ("'canary value'", "['x']", "42", "'Secret'", "'" + "a" * 40 + "'"):
        assert redact_event({"type": "task-succeeded", "result": result})["result"] == REDACTED


def test_exception_keeps_only_its_type() -> None:
    clean = redact_event(
        {
            "type": "task-failed",
            "exception": "ValueError('canary')",
            "traceback": "Traceback ... canary",
        }
    )
    assert clean["exception"] == "ValueError" and clean["traceback"] == REDACTED


def test_worker_events_pass_through() -> None:
    event = {"type": "worker-heartbeat", "hostname": "w", "active": 1}
    assert redact_event(event) == event


@given(
    st.dictionaries(
        st.sampled_from(["args", "kwargs", "result", "exception", "traceback"]), st.text()
    ),
    st.sampled_from(
        [
            "task-received",
            "task-started",
            "task-succeeded",
            "task-failed",
            "task-retried",
            "task-sent",
            "task-rejected",
        ]
    ),
)
def test_only_status_words_and_exception_types_survive(fields: dict[str, str], kind: str) -> None:
    clean = redact_event({"type": kind, **fields})
    for name in ("args", "kwargs", "traceback"):
        if name in fields:
            assert clean[name] == REDACTED
    if "result" in fields:
        assert clean["result"] == REDACTED or re.fullmatch(r"'[a-z_]{1,32}'", clean["result"])
    if "exception" in fields:
        kept = clean["exception"]
        assert kept == REDACTED or (
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", kept) and fields["exception"].startswith(kept)
        )
