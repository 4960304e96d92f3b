"""Submissions through `create_app` over stubs: authorization (sandbox policy, then the client's
own), what an accepted job leaves behind, refusals that run nothing, replays and rate limits."""

from __future__ import annotations

import pytest

from .harness import Harness


@pytest.fixture
def api() -> Harness:
    return Harness(
        allowed_functions=("f", "g*"),
        allowed_secrets=("db/*",),
        allowed_imports=("math",),
        limits={"cpu_seconds": 5},
    )


def test_an_accepted_task_is_sealed_recorded_published_and_audited(api: Harness) -> None:
    resp = api.submit(args=[41])
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert accepted["status"] == "queued"
    assert [m.task_id for m in api.published] == [accepted["task_id"]]
    assert "return x" not in api.published[0].sealed_job  # ciphertext only
    assert api.store.state(accepted["result_key"]) == "queued"
    [event] = api.audit.of_type("submission.accepted")
    assert event["client"] == "alice" and event["result_key"] == accepted["result_key"]
    assert accepted["result_key"].startswith("f_1800000000000_")


@pytest.mark.parametrize(
    ("task", "status", "code"),
    [
        ({"function": "not a name"}, 400, "invalid_function"),
        ({"function": "h"}, 403, "function_not_allowed"),
        ({"secrets": ["../etc"]}, 400, "invalid_secret_name"),
        ({"secrets": ["web/token"]}, 403, "secret_not_allowed"),
        ({"limits": {"cpu_seconds": 6}}, 403, "limits_not_allowed"),
        ({"limits": {"cpu_seconds": 10_000}}, 403, "limits_not_allowed"),
        ({"limits": {"cpu_seconds": "x"}}, 400, "invalid_limits"),
        ({"imports": ["json"]}, 403, "import_not_allowed"),
        ({"imports": ["os"]}, 403, "import_not_allowed"),
        ({"unknown": 1}, 400, "invalid_field"),
    ],
)
def test_authorize_refuses_and_nothing_runs(
    api: Harness, task: dict[str, object], status: int, code: str
) -> None:
    resp = api.submit(**task)
    assert (resp.status_code, resp.json()["code"]) == (status, code), resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert api.published == [] and api.store.keys() == []
    if status == 403:
        assert api.audit.of_type("policy.denied")[0]["code"] == code


def test_what_the_policies_allow_is_accepted(api: Harness) -> None:
    resp = api.submit(
        function="g2",
        module="def g2():\n    return 1\n",
        secrets=["db/password"],
        imports=["math"],
        limits={"cpu_seconds": 5},
    )
    assert resp.status_code == 202, resp.text


def test_a_replayed_nonce_is_refused(api: Harness) -> None:
    body = {"module": "def f():\n    return 1\n", "function": "f"}
    assert api.request("POST", "/v1/tasks", body, nonce="n" * 22).status_code == 202
    again = api.request("POST", "/v1/tasks", body, nonce="n" * 22)
    assert (again.status_code, again.json()["code"]) == (401, "replayed_nonce")
    assert len(api.published) == 1


def test_an_unknown_or_disabled_key_is_refused_and_audited(api: Harness) -> None:
    key = api.add_client("bob", allowed_functions=("*",), enabled=False)
    resp = api.request("POST", "/v1/tasks", {"module": "", "function": "f"}, keyid="bob", key=key)
    assert resp.status_code == 401
    assert api.audit.of_type("auth.failed")
    assert api.published == []


def test_an_unsigned_request_is_refused(api: Harness) -> None:
    resp = api.get("/v1/results/f_1_" + "0" * 32)
    assert (resp.status_code, resp.json()["code"]) == (401, "missing_signature")


def test_the_per_minute_limit_refuses_without_counting_and_resets(api: Harness) -> None:
    api.registry.clients["alice"] = api.registry.clients["alice"].__class__(
        **{**api.registry.clients["alice"].__dict__, "rate_per_minute": 2}
    )
    api.clock.now = 1_800_000_020.0  # 20 s into a minute
    assert [api.submit().status_code for _ in range(2)] == [202, 202]
    refused = api.submit()
    assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited")
    assert refused.headers["retry-after"] == "40"
    assert len(api.published) == 2
    api.clock.now += 40  # the next minute
    assert api.submit().status_code == 202


def test_a_workflow_counts_each_step_and_is_refused_whole(api: Harness) -> None:
    alice = api.registry.clients["alice"]
    api.registry.clients["alice"] = alice.__class__(**{**alice.__dict__, "rate_per_minute": 3})
    step = {"module": "def f(x=0):\n    return x\n", "function": "f"}
    assert api.request("POST", "/v1/workflows", {"steps": [step] * 2}).status_code == 202
    refused = api.request("POST", "/v1/workflows", {"steps": [step] * 2})
    assert refused.status_code == 429
    assert api.submit().status_code == 202  # the refused workflow counted nothing


def test_the_daily_quota(api: Harness) -> None:
    alice = api.registry.clients["alice"]
    api.registry.clients["alice"] = alice.__class__(**{**alice.__dict__, "daily_quota": 1})
    assert api.submit().status_code == 202
    api.clock.now += 120
    refused = api.submit()
    assert refused.status_code == 429 and "per day" in refused.json()["detail"]


def test_a_workflow_queues_its_first_step_and_keeps_the_rest(api: Harness) -> None:
    step = {"module": "def f(x=0):\n    return x\n", "function": "f"}
    resp = api.request("POST", "/v1/workflows", {"steps": [step] * 3})
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    keys = [s["result_key"] for s in accepted["steps"]]
    assert accepted["result_key"] == keys[-1]
    assert [m.result_key for m in api.published] == [keys[0]]
    assert sorted(api.store.workflow_messages(accepted["workflow_id"])) == ["1", "2"]
    assert all(api.store.state(k) == "queued" for k in keys)


def test_a_workflow_over_the_step_limit_is_refused(api: Harness) -> None:
    step = {"module": "def f():\n    return 1\n", "function": "f"}
    resp = api.request("POST", "/v1/workflows", {"steps": [step] * 11})
    assert (resp.status_code, resp.json()["code"]) == (400, "too_many_steps")


def test_the_signature_window_comes_from_the_settings() -> None:
    # Issue 12, finding 22: APPLIANCE_SIGNATURE_WINDOW_SECONDS and ..._FUTURE_SKEW_SECONDS were
    # read into Settings and ignored (300 s and 30 s were hard-coded).
    from appliance.settings import Settings

    body = {"module": "def f():\n    return 1\n", "function": "f"}
    narrow = Harness(
        settings=Settings(signature_window_seconds=60, signature_future_skew_seconds=5)
    )
    default = Harness()
    old = narrow.clock() - 90
    assert default.request("POST", "/v1/tasks", body, signed_at=old).status_code == 202
    late = narrow.request("POST", "/v1/tasks", body, signed_at=old)
    assert late.status_code == 401 and late.json()["code"] == "stale_signature"
    ahead = narrow.clock() + 20
    assert default.request("POST", "/v1/tasks", body, signed_at=ahead).status_code == 202
    early = narrow.request("POST", "/v1/tasks", body, signed_at=ahead)
    assert early.status_code == 401 and early.json()["code"] == "stale_signature"
    assert narrow.request("POST", "/v1/tasks", body).status_code == 202
