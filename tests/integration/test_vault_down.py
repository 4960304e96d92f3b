"""OpenBao down: new submissions get 503 with Retry-After and nothing is queued; readiness
says so. (On its own stack: stopping OpenBao would break the shared one.)"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from appliance import stack
from appliance._stack import stop_openbao

from .conftest import FREE_PORTS, Stack, is_problem, submit

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lonely_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("vault-down")
    try:
        yield Stack(state, stack.up(state, FREE_PORTS))
    finally:
        stack.down(state)


def test_vault_down_gives_503_with_retry_after(lonely_stack: Stack) -> None:
    client = lonely_stack.client()
    ok = submit(client, "def f():\n    return 1\n", "f")
    assert ok.status_code == 202
    assert stop_openbao(lonely_stack.state)
    queued_before = lonely_stack.admin_redis().llen("celery:appliance")
    resp = submit(client, "def f():\n    return 1\n", "f")
    body = is_problem(resp, 503)
    assert body["code"] == "dependency_unavailable"
    assert int(resp.headers["Retry-After"]) > 0
    assert lonely_stack.admin_redis().llen("celery:appliance") == queued_before
    ready = httpx.get(lonely_stack.status["api_url"] + "/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["vault"] is False
    assert "Retry-After" in ready.headers
