"""Task secrets: read by the worker from KV v2 at job start, handed to the function as the
`secrets` keyword argument, and never in the broker, Redis, the result or a log."""

from __future__ import annotations

import json
import secrets
import time
import uuid

import pytest

from appliance.stack import write_keypair

from .conftest import Stack, is_problem, submit

pytestmark = pytest.mark.integration


def _put_secret(stack: Stack, name: str, data: dict[str, str]) -> None:
    vault = stack.registry().session
    vault.call(
        lambda c: c.secrets.kv.v2.create_or_update_secret(
            path=f"appliance/secrets/{name}", secret=data, mount_point="kv"
        )
    )


def test_secret_reaches_the_function_and_nothing_else(appliance_stack: Stack) -> None:
    canary = f"SECRETCANARY{secrets.token_hex(8)}"
    _put_secret(appliance_stack, "db", {"password": canary})
    key_file = appliance_stack.add_client("withsecret", allowed_secrets=("db",))
    client = appliance_stack.client("withsecret", key_file)
    module = (
        "def use(prefix, secrets):\n"
        "    pw = secrets['db']['password']\n"
        "    print('using', pw)\n"
        "    return {'length': len(pw), 'starts': pw[:12], 'echo': prefix + pw}\n"
    )
    resp = submit(client, module, "use", args=["x-"], secrets=["db"])
    assert resp.status_code == 202, resp.text
    key = resp.json()["result_key"]
    in_flight = appliance_stack.all_redis_bytes()
    body = appliance_stack.wait_result(client, key).json()
    assert body["status"] == "succeeded", body
    assert body["result"]["length"] == len(canary)
    assert body["result"]["starts"] == "SECRETCANARY"  # a fragment is the function's own doing
    assert body["result"]["echo"] == "x-[redacted]"
    assert canary not in body["stdout"]
    time.sleep(0.2)
    everything = in_flight + appliance_stack.all_redis_bytes() + appliance_stack.logs().encode()
    assert canary.encode() not in everything


def test_missing_secret_fails_the_job_cleanly(appliance_stack: Stack) -> None:
    key_file = appliance_stack.add_client("ghost", allowed_secrets=("nothing-*",))
    client = appliance_stack.client("ghost", key_file)
    key = submit(client, "def f(secrets):\n    return 1\n", "f", secrets=["nothing-here"]).json()[
        "result_key"
    ]
    body = appliance_stack.wait_result(client, key).json()
    assert body["status"] == "failed" and body["error"]["code"] == "secret_unavailable"


def test_secret_outside_the_policy_is_403(appliance_stack: Stack) -> None:
    key_file = appliance_stack.add_client("narrow", allowed_secrets=("reports/*",))
    client = appliance_stack.client("narrow", key_file)
    resp = submit(client, "def f(secrets):\n    return 1\n", "f", secrets=["db"])
    assert is_problem(resp, 403)["code"] == "secret_not_allowed"


# ---- secret names cannot climb out of the client's globs (issue 12, finding 1) ---------------

_USE = "def use(secrets):\n    return sorted(secrets)\n"
_TRAVERSALS = [
    "team-a/../team-b/token",
    "team-a/%2e%2e/team-b/token",
    "team-a/./../team-b/token",
    "team-a//token",
    "team-a\\..\\team-b\\token",
    "team-a/token?x=../../team-b/token",
]


def _client_ran(stack: Stack, keyid: str) -> list[str]:
    """The audit entries that say a job of `keyid` was accepted or ran."""
    return [
        e["type"]
        for e in stack.audit_entries()
        if e.get("client") == keyid
        and e["type"] in ("submission.accepted", "execution.started", "execution.finished")
    ]


def test_a_traversal_name_is_400_and_nothing_runs(appliance_stack: Stack) -> None:
    """The review's attack: a client allowed `team-a/*` named `team-a/../team-b/token` and read
    team B's secret. Now the name is refused at the boundary, before any policy check."""
    canary = f"TEAMBCANARY{secrets.token_hex(8)}"
    _put_secret(appliance_stack, "team-a/token", {"value": "team-a-value"})
    _put_secret(appliance_stack, "team-b/token", {"value": canary})
    key_file = appliance_stack.add_client("team-a-only", allowed_secrets=("team-a/*",))
    client = appliance_stack.client("team-a-only", key_file)
    for name in _TRAVERSALS:
        resp = submit(client, _USE, "use", secrets=[name])
        assert is_problem(resp, 400)["code"] == "invalid_secret_name", name
    step = {"module": _USE, "function": "use", "secrets": [_TRAVERSALS[0]]}
    resp = client.request("POST", "/v1/workflows", {"steps": [step]})
    assert is_problem(resp, 400)["code"] == "invalid_secret_name"
    time.sleep(0.5)
    assert _client_ran(appliance_stack, "team-a-only") == []
    assert canary.encode() not in appliance_stack.all_redis_bytes()
    # The client's own secret still works.
    resp = submit(client, _USE, "use", secrets=["team-a/token"])
    assert resp.status_code == 202, resp.text
    body = appliance_stack.wait_result(client, resp.json()["result_key"]).json()
    assert body["status"] == "succeeded" and body["result"] == ["team-a/token"], body


def test_a_star_does_not_cross_a_slash(appliance_stack: Stack) -> None:
    _put_secret(appliance_stack, "team-a/nested/token", {"value": "nested-value"})
    key_file = appliance_stack.add_client("team-a-flat", allowed_secrets=("team-a/*",))
    flat = appliance_stack.client("team-a-flat", key_file)
    resp = submit(flat, _USE, "use", secrets=["team-a/nested/token"])
    assert is_problem(resp, 403)["code"] == "secret_not_allowed"
    key_file = appliance_stack.add_client("team-a-tree", allowed_secrets=("team-a/**",))
    tree = appliance_stack.client("team-a-tree", key_file)
    resp = submit(tree, _USE, "use", secrets=["team-a/nested/token"])
    assert resp.status_code == 202, resp.text
    body = appliance_stack.wait_result(tree, resp.json()["result_key"]).json()
    assert body["status"] == "succeeded", body


def test_the_worker_refuses_a_traversal_name_the_api_did_not_check(appliance_stack: Stack) -> None:
    """Defence in depth: a job sealed and signed as the API would (here with a root token, as a
    buggy API could) that names a traversal path ends failed, and team B's secret is not read."""
    from appliance.jobs import JobMessage, seal_job, sign_message
    from appliance.queue import TASK_NAME
    from appliance.results import new_result_key
    from appliance.specs import JobSpec

    canary = f"TEAMBCANARY{secrets.token_hex(8)}"
    _put_secret(appliance_stack, "team-b/token", {"value": canary})
    leak = "def use(secrets):\n    return [v for s in secrets.values() for v in s.values()]\n"
    for name, globs in (
        ("team-a/../team-b/token", ["team-a/*"]),
        ("team-b/token", ["team-a/*"]),
        ("team-b/token", []),
    ):
        spec = {
            "module": leak,
            "function": "use",
            "args": [],
            "kwargs": {},
            "limits": {},
            "imports": [],
            "secrets": [name],
            "secret_globs": globs,
            # The client's key when "accepted": its result is sealed to it.
            "owner_key_sha256": appliance_stack.registry().read("local").public_key_sha256(),
        }
        transit = appliance_stack.root_transit()
        task_id, key = str(uuid.uuid4()), new_result_key("use", int(time.time() * 1000))
        message = sign_message(
            transit,
            JobMessage(
                task_id,
                key,
                "local",
                seal_job(transit, JobSpec.from_json(spec), task_id, key, "local"),
            ),
            TASK_NAME,
            time.time(),
        )
        producer = appliance_stack.broker_producer("intruder", task_serializer="json")
        producer.send_task(TASK_NAME, args=[message.to_wire()], queue="appliance")
        body = appliance_stack.wait_result(appliance_stack.client(), key).json()
        assert body["status"] == "failed", body
        assert body["error"]["code"] == "secret_not_allowed", body
        assert canary not in json.dumps(body)


def test_clients_add_refuses_a_malformed_secret_glob(appliance_stack: Stack) -> None:
    _, public = write_keypair(appliance_stack.state / "clients", "badglob")
    done = appliance_stack.cli(
        "clients",
        "add",
        "badglob",
        "--public-key",
        str(public),
        "--allow-secret",
        "team-a/../team-b/*",
    )
    assert done.returncode == 2, done
    assert "invalid" in done.stderr and "team-a/../team-b/*" in done.stderr
    assert appliance_stack.registry().get("badglob") is None
