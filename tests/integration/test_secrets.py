"""Task secrets: read by the worker from KV v2 at job start, handed to the function as the
`secrets` keyword argument, and never in the broker, Redis, the result or a log."""

from __future__ import annotations

import secrets
import time

import pytest

from .conftest import Stack, is_problem, submit

pytestmark = pytest.mark.integration


def _put_secret(stack: Stack, name: str, data: dict[str, str]) -> None:
    vault = stack.registry().session
    vault.call(lambda c: c.secrets.kv.v2.create_or_update_secret(
        path=f"appliance/secrets/{name}", secret=data, mount_point="kv"))


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
    key = submit(client, "def f(secrets):\n    return 1\n", "f",
                 secrets=["nothing-here"]).json()["result_key"]
    body = appliance_stack.wait_result(client, key).json()
    assert body["status"] == "failed" and body["error"]["code"] == "secret_unavailable"


def test_secret_outside_the_policy_is_403(appliance_stack: Stack) -> None:
    key_file = appliance_stack.add_client("narrow", allowed_secrets=("reports/*",))
    client = appliance_stack.client("narrow", key_file)
    resp = submit(client, "def f(secrets):\n    return 1\n", "f", secrets=["db"])
    assert is_problem(resp, 403)["code"] == "secret_not_allowed"
