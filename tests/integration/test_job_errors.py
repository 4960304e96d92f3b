"""Issue 12, finding 14, on the real stack: a job whose worker hits an error that a retry will
not cure ends as failed, with a fixed error for the client and an audit entry; it never stays
`running`. (A dependency that is down or sealed is retried instead, until it is back:
tests/integration/test_vault_down.py and test_vault_restart.py hold that side of the line.)

OpenBao is made to refuse the worker something, as the review did, by adding a `deny` rule to
the worker's policy with a root token for the length of one test.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hvac
import pytest

from appliance._stack import generate_root_token

from .conftest import Stack, submit

pytestmark = pytest.mark.integration

ONE = "def one(secrets=None):\n    return 1\n"


@contextmanager
def worker_denied(s: Stack, path: str) -> Iterator[hvac.Client]:
    """The worker's OpenBao policy with `path` denied, until the block ends."""
    addr = s.status["vault_addr"]
    root = hvac.Client(url=addr, token=generate_root_token(addr, s.state))
    original = root.sys.read_policy("worker")["data"]["rules"]
    root.sys.create_or_update_policy(
        "worker", original + f'\npath "{path}" {{\n  capabilities = ["deny"]\n}}\n'
    )
    try:
        yield root
    finally:
        root.sys.create_or_update_policy("worker", original)
        root.auth.token.revoke_self()


def _finished(s: Stack, task_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        found = [
            e
            for e in s.audit_entries()
            if e["type"] == "execution.finished" and e.get("task_id") == task_id
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_openbao_refusing_a_secret_path_fails_the_job(appliance_stack: Stack) -> None:
    """The review's case: the client's globs allow the secret, OpenBao refuses the worker."""
    folder = f"refused{secrets.token_hex(4)}"
    key_file = appliance_stack.add_client(folder, allowed_secrets=(f"{folder}/*",))
    client = appliance_stack.client(folder, key_file)
    with worker_denied(appliance_stack, f"kv/data/appliance/secrets/{folder}/*") as root:
        root.secrets.kv.v2.create_or_update_secret(
            path=f"appliance/secrets/{folder}/token", secret={"v": "x"}, mount_point="kv"
        )
        accepted = submit(client, ONE, "one", secrets=[f"{folder}/token"])
        assert accepted.status_code == 202, accepted.text
        body = appliance_stack.wait_result(client, accepted.json()["result_key"], timeout=20)
    assert body.status_code == 200, body.text
    error = body.json()["error"]
    assert (body.json()["status"], error["code"]) == ("failed", "secret_unavailable")
    [entry] = _finished(appliance_stack, accepted.json()["task_id"])
    assert entry["status"] == "secret_unavailable"


def test_an_unexpected_error_ends_the_job_as_internal_error(appliance_stack: Stack) -> None:
    """OpenBao refuses to open the job's data key: not an outage, so not retried; the client
    reads `internal_error` and nothing of the cause, the audit log has the cause's code.

    The job comes from a client registered for this test alone: the API mints a data key of its
    own for it (data keys are derived per client), so the worker has never unwrapped that key and
    must ask OpenBao, which refuses. A client that submitted before would have its data key in
    the worker's cache (issue 16, `DataKeyCache`) and its job would never reach OpenBao."""
    keyid = f"refused{secrets.token_hex(4)}"
    client = appliance_stack.client(keyid, appliance_stack.add_client(keyid))
    with worker_denied(appliance_stack, "transit/decrypt/jobs"):
        accepted = submit(client, ONE, "one")
        assert accepted.status_code == 202, accepted.text
        body = appliance_stack.wait_result(client, accepted.json()["result_key"], timeout=20)
    assert body.status_code == 200, body.text
    assert body.json()["status"] == "failed"
    assert body.json()["error"] == {
        "code": "internal_error",
        "type": "InternalError",
        "message": "the appliance failed while running the job",
    }
    [entry] = _finished(appliance_stack, accepted.json()["task_id"])
    assert (entry["status"], entry["reason"]) == ("internal_error", "vault_forbidden")
    # The worker still runs jobs afterwards.
    again = submit(client, ONE, "one")
    assert appliance_stack.wait_result(client, again.json()["result_key"]).json()["result"] == 1
