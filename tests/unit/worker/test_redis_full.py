"""A job whose Redis write is refused for memory waits in place and runs again, instead of going
through Celery's retry, which a full Redis refuses too (issue 12, finding 8)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from appliance.errors import DependencyUnavailable
from appliance.worker.app import while_redis_is_full


def _failing(times: int, code: str) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def run() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise DependencyUnavailable("refused", code=code)
        return "ok"

    return calls, run


def test_a_full_redis_is_waited_for_with_a_growing_pause() -> None:
    calls, run = _failing(6, "storage_full")
    pauses: list[float] = []
    assert while_redis_is_full(run, pauses.append) == "ok"
    assert len(calls) == 7
    assert pauses == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_other_outages_go_to_celerys_retry() -> None:
    calls, run = _failing(1, "dependency_unavailable")
    with pytest.raises(DependencyUnavailable):
        while_redis_is_full(run, lambda _: None)
    assert len(calls) == 1
