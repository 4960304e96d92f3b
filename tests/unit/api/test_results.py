"""Reading and revoking results through `create_app` over stubs: every state a record can be in,
and the client it belongs to."""

from __future__ import annotations

import pytest

from appliance.jobs import seal_result
from appliance.specs import ResultBody

from .harness import Harness

BODY = ResultBody.from_json(
    {"status": "succeeded", "result": 42, "error": None, "stdout": "hi", "usage": {"cpu_ms": 1}}
)


@pytest.fixture
def api() -> Harness:
    return Harness()


def _queued(api: Harness) -> str:
    resp = api.submit()
    assert resp.status_code == 202
    return str(resp.json()["result_key"])


def _done(api: Harness, key: str) -> None:
    """Store the result as the worker does: sealed to alice's key when the job was accepted."""
    owner_key = api.registry.clients["alice"].public_key_sha256()
    sealed = seal_result(api.keys, BODY, key, "alice", owner_key)  # type: ignore[arg-type]
    api.store.put(key, "alice", sealed)


def test_a_pending_result_answers_202(api: Harness) -> None:
    key = _queued(api)
    resp = api.request("GET", "/get-result", params={"key": key})
    assert (resp.status_code, resp.json()) == (202, {"key": key, "status": "queued"})
    api.store.start(key, "alice", "t")
    assert api.request("GET", f"/v1/results/{key}").json()["status"] == "running"


def test_a_stored_result_opens_for_its_client(api: Harness) -> None:
    key = _queued(api)
    _done(api, key)
    resp = api.request("GET", f"/v1/results/{key}")
    assert resp.status_code == 200
    assert resp.json() == {
        "key": key,
        "status": "succeeded",
        "result": 42,
        "error": None,
        "stdout": "hi",
        "usage": {"cpu_ms": 1},
        "expires_at": "2027-01-15T08:05:00Z",
    }
    assert api.audit.of_type("result.read")[0]["result_key"] == key


def test_a_result_of_another_client_is_forbidden(api: Harness) -> None:
    key = _queued(api)
    bob = api.add_client("bob", allowed_functions=("*",))
    for method in ("GET", "DELETE"):
        resp = api.request(method, f"/v1/results/{key}", keyid="bob", key=bob)
        assert (resp.status_code, resp.json()["code"]) == (403, "not_your_result")


def test_unknown_expired_and_malformed_keys(api: Harness) -> None:
    resp = api.request("GET", "/v1/results/f_1_" + "0" * 32)
    assert (resp.status_code, resp.json()["code"]) == (404, "result_not_found")
    resp = api.request("GET", "/get-result", params={"key": "../x"})
    assert (resp.status_code, resp.json()["code"]) == (400, "invalid_key")
    key = _queued(api)
    _done(api, key)
    api.clock.now += 300
    assert api.request("GET", f"/v1/results/{key}").status_code == 404


def test_a_result_that_does_not_open_is_unavailable(api: Harness) -> None:
    key = _queued(api)
    api.store.put(key, "alice", seal_result(api.keys, BODY, key, "bob"))  # type: ignore[arg-type]
    resp = api.request("GET", f"/v1/results/{key}")
    assert (resp.status_code, resp.json()["code"]) == (404, "result_unavailable")


def test_a_result_does_not_open_for_a_key_that_replaced_the_clients(api: Harness) -> None:
    # Red team of issue 12, item 2: whoever writes the registry put its own key in alice's entry
    # after her job was accepted; the result stays sealed to the key she had then.
    key = _queued(api)
    _done(api, key)
    thief = api.add_client("alice", allowed_functions=("*",))
    resp = api.request("GET", f"/v1/results/{key}", key=thief)
    assert (resp.status_code, resp.json()["code"]) == (404, "result_unavailable")


def test_only_a_failure_opens_without_an_owner_key(api: Harness) -> None:
    # A job that never opened has no owner key; its result is a failure the worker wrote.
    failed = ResultBody.failure("rejected", "the job could not be opened")
    for body, status in ((failed, 200), (BODY, 404)):
        key = _queued(api)
        sealed = seal_result(api.keys, body, key, "alice", "")  # type: ignore[arg-type]
        api.store.put(key, "alice", sealed)
        assert api.request("GET", f"/v1/results/{key}").status_code == status


def test_revoking_a_queued_job_then_again(api: Harness) -> None:
    key = _queued(api)
    first = api.request("DELETE", f"/v1/results/{key}")
    assert (first.status_code, first.json()) == (200, {"key": key, "status": "revoked"})
    second = api.request("DELETE", f"/v1/results/{key}")
    assert second.json()["status"] == "revoked"
    assert api.request("GET", f"/v1/results/{key}").json()["status"] == "revoked"
    assert [e["status"] for e in api.audit.of_type("task.revoked")] == ["revoked", "revoked"]


def test_a_running_job_is_not_revoked(api: Harness) -> None:
    key = _queued(api)
    api.store.start(key, "alice", "t")
    resp = api.request("DELETE", f"/v1/results/{key}")
    assert (resp.status_code, resp.json()["code"]) == (409, "already_running")


def test_a_finished_result_is_deleted(api: Harness) -> None:
    key = _queued(api)
    _done(api, key)
    resp = api.request("DELETE", f"/v1/results/{key}")
    assert resp.json() == {"key": key, "status": "deleted"}
    assert api.store.get(key) is None


def test_readiness_needs_a_live_worker(api: Harness) -> None:
    resp = api.get("/readyz")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    assert resp.json()["checks"] == {"redis": True, "vault": True, "worker": False}
    api.store.beat("host:1", api.clock() - 5)
    assert api.get("/readyz").status_code == 200
    api.vault.up = False
    assert api.get("/readyz").status_code == 503
    assert api.get("/healthz").json() == {"status": "ok"}


def test_no_page_loads_assets_from_a_cdn_and_the_schema_stays(api: Harness) -> None:
    # Issue 12, finding 24: /docs and /redoc loaded FastAPI's scripts from a CDN.
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert api.get(path).status_code == 404, path
    schema = api.get("/openapi.json")
    assert schema.status_code == 200 and "/v1/tasks" in schema.json()["paths"]
    assert "cdn" not in schema.text.lower()
