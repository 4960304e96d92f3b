"""Envelope keys: rotation keeps old results readable until the operator retires old versions;
a result opened for the wrong client fails."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.errors import SealBroken
from appliance.jobs import open_result

from .conftest import Stack, submit

pytestmark = pytest.mark.integration


def _run(stack: Stack, value: int) -> str:
    client = stack.client()
    key: str = submit(client, "def f(x):\n    return x\n", "f", args=[value]).json()["result_key"]
    assert stack.wait_result(client, key).json()["result"] == value
    return key


def _kid(stack: Stack, key: str) -> str:
    stored = json.loads(stack.admin_redis().get(f"result:{key}"))
    return str(json.loads(stored["sealed"])["kid"])


def test_wrong_client_context_cannot_open(appliance_stack: Stack) -> None:
    key = _run(appliance_stack, 5)
    sealed = json.loads(appliance_stack.admin_redis().get(f"result:{key}"))["sealed"]
    transit = appliance_stack.root_transit()
    # Sealed to local's key as it was when the job was accepted (red team of issue 12, item 2).
    owner = appliance_stack.registry().read("local").public_key_sha256()
    assert open_result(transit, sealed, key, "local", owner).result == 5
    with pytest.raises(SealBroken):
        open_result(transit, sealed, key, "someone-else", owner)
    with pytest.raises(SealBroken):
        open_result(transit, sealed, key.replace("f_", "g_", 1), "local", owner)
    with pytest.raises(SealBroken):
        open_result(transit, sealed, key, "local", "0" * 64)


def test_rotation_keeps_old_results_until_retired(appliance_stack: Stack) -> None:
    runner = CliRunner()
    state = ["--state", str(appliance_stack.state)]
    old = _run(appliance_stack, 1)
    old_version = int(_kid(appliance_stack, old).split(":")[1][1:])
    res = runner.invoke(main, [*state, "keys", "rotate", "--key", "results"])
    assert res.exit_code == 0, res.output
    new = _run(appliance_stack, 2)
    new_version = int(_kid(appliance_stack, new).split(":")[1][1:])
    assert new_version == old_version + 1
    client = appliance_stack.client()
    assert client.request("GET", "/get-result", params={"key": old}).json()["result"] == 1

    res = runner.invoke(
        main,
        [
            *state,
            "keys",
            "rotate",
            "--key",
            "results",
            "--min-decryption-version",
            str(new_version),
        ],
    )
    assert res.exit_code == 0, res.output
    # The API caches nothing about keys: the retired version is refused at once.
    gone = client.request("GET", "/get-result", params={"key": old})
    assert gone.status_code == 404 and gone.json()["code"] == "result_unavailable"
    assert client.request("GET", "/get-result", params={"key": new}).json()["result"] == 2
