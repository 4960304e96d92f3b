"""Flower on the real stack: its login comes from OpenBao (AppRole `flower`, policy
`policies/flower.hcl`), every page, API route and `/metrics` needs it, and nothing it offers can
submit a task or act on a worker: its routes refuse, its read-only mode refuses, and its Redis user
cannot push to the queue."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest
from celery import Celery
from click.testing import CliRunner

from appliance._stack import BaoHandle, Bootstrap, Pki, operator_token_file, password_file
from appliance.cli import main as cli
from appliance.queue import BROKER_KEY_PREFIX, TASK_NAME
from appliance.vault import FlowerCredential, VaultSession, read_flower_credential

from .conftest import Stack, submit

pytestmark = pytest.mark.integration

QUEUE = "celery:appliance"


def flower_login(stack: Stack) -> FlowerCredential:
    """Flower's login as the operator reads it: from OpenBao with the operator token."""
    token = operator_token_file(stack.state).read_text().strip()
    return read_flower_credential(VaultSession(stack.status["vault_addr"], token))


def flower_get(
    stack: Stack, path: str, login: FlowerCredential | None = None, **kw: Any
) -> httpx.Response:
    auth = (login.username, login.password) if login else None
    return httpx.get(stack.status["flower_url"] + path, auth=auth, timeout=10, **kw)


def flower_tasks(stack: Stack, login: FlowerCredential) -> dict[str, dict[str, Any]]:
    resp = flower_get(stack, "/api/tasks", login)
    assert resp.status_code == 200, resp.text
    tasks: dict[str, dict[str, Any]] = resp.json()
    return tasks


def wait_flower_sees(
    stack: Stack, login: FlowerCredential, task_ids: set[str], timeout: float = 30
) -> dict[str, dict[str, Any]]:
    """Flower's tasks once every id in `task_ids` is there, named and finished."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = flower_tasks(stack, login)
        seen = {
            tid
            for tid in task_ids
            if tasks.get(tid, {}).get("name") == TASK_NAME and tasks[tid].get("state") == "SUCCESS"
        }
        if seen == task_ids:
            return tasks
        if time.monotonic() > deadline:
            raise AssertionError(f"Flower never showed {task_ids - seen}: {tasks}")
        time.sleep(0.2)


def warm_up(stack: Stack, login: FlowerCredential, timeout: float = 40) -> None:
    """Run small tasks until Flower records one from its first event: its event stream is live
    (Flower enables and consumes events a few seconds after it starts)."""
    client = stack.client()
    deadline = time.monotonic() + timeout
    while True:
        resp = submit(client, "def ping():\n    return 1\n", "ping")
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        assert stack.wait_result(client, accepted["result_key"]).status_code == 200
        try:
            wait_flower_sees(stack, login, {accepted["task_id"]}, timeout=5)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


# --------------------------------------------------------------------------------------------
# The login comes from OpenBao, through the `flower` AppRole and its policy
# --------------------------------------------------------------------------------------------


def _flower_bao(openbao: BaoHandle, directory: Path) -> hvac.Client:
    """Log in like the Flower launcher: role_id file, unwrap the secret_id once, log in."""
    role_id_file, wrap_file = openbao.write_service_credentials("flower", directory)
    unwrapper = hvac.Client(url=openbao.addr, token=wrap_file.read_text().strip())
    secret_id = unwrapper.sys.unwrap()["data"]["secret_id"]
    client = hvac.Client(url=openbao.addr)
    client.auth.approle.login(role_id=role_id_file.read_text().strip(), secret_id=secret_id)
    return client


@pytest.fixture(scope="module")
def flower_bao(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path_factory: pytest.TempPathFactory
) -> hvac.Client:
    return _flower_bao(openbao, tmp_path_factory.mktemp("flower-creds"))


def _kv_read(path: str) -> Callable[[hvac.Client], Any]:
    return lambda c: c.secrets.kv.v2.read_secret_version(
        path, mount_point="kv", raise_on_deleted_version=True
    )


_FLOWER_FORBIDDEN: dict[str, Callable[[hvac.Client], Any]] = {
    "read the client registry": _kv_read("appliance/clients/local"),
    "list the client registry": lambda c: c.secrets.kv.v2.list_secrets(
        "appliance/clients", mount_point="kv"
    ),
    "read task secrets": _kv_read("appliance/secrets/db"),
    "list kv": lambda c: c.secrets.kv.v2.list_secrets("appliance", mount_point="kv"),
    "read its login's metadata": lambda c: c.secrets.kv.v2.read_secret_metadata(
        "appliance/flower", mount_point="kv"
    ),
    "rewrite its login": lambda c: c.secrets.kv.v2.create_or_update_secret(
        "appliance/flower", secret={"username": "x", "password": "y"}, mount_point="kv"
    ),
    "delete its login": lambda c: c.secrets.kv.v2.delete_latest_version_of_secret(
        "appliance/flower", mount_point="kv"
    ),
    "jobs data key": lambda c: c.secrets.transit.generate_data_key(
        "jobs", "plaintext", context="eA==", mount_point="transit"
    ),
    "results data key": lambda c: c.secrets.transit.generate_data_key(
        "results", "plaintext", context="eA==", mount_point="transit"
    ),
    "sign a task": lambda c: c.secrets.transit.generate_hmac(
        "task-signing", "eA==", mount_point="transit"
    ),
    "sign an audit checkpoint": lambda c: c.secrets.transit.sign_data(
        "audit", "eA==", mount_point="transit"
    ),
    "mint a worker secret_id": lambda c: c.auth.approle.generate_secret_id("worker"),
    # Its own successor with metadata only (issue 12, finding 5), never one that is wider.
    "mint its own secret_id for anywhere": lambda c: c.auth.approle.generate_secret_id(
        "flower", cidr_list=["0.0.0.0/0"]
    ),
    "read the api role_id": lambda c: c.auth.approle.read_role_id("api"),
    "create a token": lambda c: c.auth.token.create(policies=["flower"]),
    "read policies": lambda c: c.sys.read_policy("operator"),
}


@pytest.mark.parametrize("action", list(_FLOWER_FORBIDDEN))
def test_flower_role_is_refused(action: str, flower_bao: hvac.Client) -> None:
    with pytest.raises(hvac.exceptions.Forbidden):
        _FLOWER_FORBIDDEN[action](flower_bao)


def test_flower_role_reads_only_its_login(flower_bao: hvac.Client) -> None:
    token = flower_bao.auth.token.lookup_self()["data"]
    assert token["policies"] == ["flower"]
    login = _kv_read("appliance/flower")(flower_bao)["data"]["data"]
    assert login["username"] == "operator" and len(login["password"]) >= 32
    flower_bao.auth.token.revoke_self()


def test_operator_reads_the_login_but_cannot_change_it(appliance_stack: Stack) -> None:
    token = operator_token_file(appliance_stack.state).read_text().strip()
    operator = hvac.Client(url=appliance_stack.status["vault_addr"], token=token)
    assert _kv_read("appliance/flower")(operator)["data"]["data"]["username"] == "operator"
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.secrets.kv.v2.create_or_update_secret(
            "appliance/flower", secret={"username": "x", "password": "y"}, mount_point="kv"
        )


def test_cli_shows_the_login_and_status_only_points_to_it(appliance_stack: Stack) -> None:
    login = flower_login(appliance_stack)
    state = str(appliance_stack.state)
    shown = CliRunner().invoke(cli, ["flower-credentials", "--state", state, "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == {
        "url": appliance_stack.status["flower_url"],
        "username": login.username,
        "password": login.password,
    }
    status = CliRunner().invoke(cli, ["status", "--state", state, "--json"])
    assert status.exit_code == 0, status.output
    assert login.password not in status.output
    assert json.loads(status.output)["flower_credentials"] == {
        "vault_path": "kv/appliance/flower",
        "command": "appliance flower-credentials",
    }
    assert flower_get(appliance_stack, "/workers", login).status_code == 200


def test_password_is_in_no_file_argv_or_environment(appliance_stack: Stack) -> None:
    password = flower_login(appliance_stack).password.encode()
    state = appliance_stack.state
    # Every file of the stack: logs, secrets, TLS, OpenBao's audit log (which HMACs secrets) and
    # its raft storage (encrypted by its barrier key).
    holding = [p for p in state.rglob("*") if p.is_file() and password in p.read_bytes()]
    assert holding == []
    assert not (state / "secrets" / "flower.pass").exists()
    run = state / "run" / "flower"
    assert not list(run.glob("*.wrap"))  # The launcher unwrapped and deleted its secret_id.
    pid = appliance_stack.status["services"]["flower"]["pid"]
    assert password not in Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert password not in environ and b"FLOWER_" not in environ


# --------------------------------------------------------------------------------------------
# Every page, API route and /metrics needs the login
# --------------------------------------------------------------------------------------------

_PROTECTED = [
    "/",
    "/workers",
    "/tasks",
    "/tasks/datatable",
    "/broker",
    "/metrics",
    "/api/workers",
    "/api/tasks",
    "/api/task/types",
    "/api/queues/length",
    "/api/task/info/x",
    "/task/x",
    "/worker/x",
    "/no-such-page",
]


@pytest.mark.parametrize("path", _PROTECTED)
def test_unauthenticated_requests_get_401(appliance_stack: Stack, path: str) -> None:
    resp = flower_get(appliance_stack, path)
    assert resp.status_code == 401, (path, resp.status_code)
    if not path.startswith("/api/"):  # Flower's API handlers answer 401 without a challenge.
        assert resp.headers.get("www-authenticate", "").startswith("Basic")


def test_a_wrong_password_gets_401(appliance_stack: Stack) -> None:
    wrong = FlowerCredential("operator", "not-the-password")
    for path in ("/", "/metrics", "/api/tasks"):
        assert flower_get(appliance_stack, path, wrong).status_code == 401


def test_metrics_are_served_behind_the_login(appliance_stack: Stack) -> None:
    resp = flower_get(appliance_stack, "/metrics", flower_login(appliance_stack))
    assert resp.status_code == 200
    assert "flower_events_total" in resp.text or "flower_" in resp.text


def test_healthcheck_stays_open_and_says_nothing_else(appliance_stack: Stack) -> None:
    resp = flower_get(appliance_stack, "/healthcheck")
    assert resp.status_code == 200 and resp.text == "OK"


# --------------------------------------------------------------------------------------------
# No way around the signed API: no submission, no remote control
# --------------------------------------------------------------------------------------------

_ACTING = [
    f"/api/task/async-apply/{TASK_NAME}",
    f"/api/task/send-task/{TASK_NAME}",
    f"/api/task/apply/{TASK_NAME}",
    "/api/task/abort/00000000-0000-0000-0000-000000000000",
    "/api/task/revoke/00000000-0000-0000-0000-000000000000",
    f"/api/task/timeout/{TASK_NAME}",
    f"/api/task/rate-limit/{TASK_NAME}",
    "/api/task/result/00000000-0000-0000-0000-000000000000",
    "/api/worker/shutdown/{worker}",
    "/api/worker/pool/restart/{worker}",
    "/api/worker/pool/grow/{worker}",
    "/api/worker/pool/shrink/{worker}",
    "/api/worker/pool/autoscale/{worker}",
    "/api/worker/queue/add-consumer/{worker}",
    "/api/worker/queue/cancel-consumer/{worker}",
]


def _worker_name(stack: Stack, login: FlowerCredential) -> str:
    deadline = time.monotonic() + 20
    while True:
        workers = flower_get(stack, "/api/workers", login, params={"refresh": "1"}).json()
        if workers:
            return str(next(iter(workers)))
        assert time.monotonic() < deadline, "Flower lists no worker"
        time.sleep(0.5)


def test_no_route_submits_or_controls(appliance_stack: Stack) -> None:
    login = flower_login(appliance_stack)
    worker = _worker_name(appliance_stack, login)
    admin = appliance_stack.admin_redis()
    tasks_before = set(flower_tasks(appliance_stack, login))
    queued_before = admin.llen(QUEUE)
    body = {"args": [{"forged": True}], "kwargs": {}, "queue": "appliance"}
    for template in _ACTING:
        url = appliance_stack.status["flower_url"] + template.format(worker=worker)
        # Without the login: 401, like every other route.
        assert httpx.post(url, json=body, timeout=10).status_code == 401, url
        # With it: refused, and the reason says where to go instead.
        resp = httpx.post(
            url,
            json=body,
            auth=(login.username, login.password),
            timeout=10,
            params={
                "terminate": "true",
                "n": "1",
                "min": "1",
                "max": "2",
                "queue": "appliance",
                "soft": "1",
                "hard": "2",
                "ratelimit": "1/s",
            },
        )
        assert resp.status_code == 403, (url, resp.status_code, resp.text[:200])
        assert "signed API" in resp.text
    time.sleep(1.5)  # Anything enqueued would have been received and reported by now.
    assert admin.llen(QUEUE) == queued_before
    new = set(flower_tasks(appliance_stack, login)) - tasks_before
    assert new == set()
    # The worker is still there, with its pool.
    assert _worker_name(appliance_stack, login) == worker
    status = appliance_stack.status["services"]["worker"]["pid"]
    assert Path(f"/proc/{status}").exists()


def test_flower_broker_user_cannot_enqueue(appliance_stack: Stack) -> None:
    """Even a Flower whose routes were bypassed holds Redis credentials that cannot push work."""
    state = appliance_stack.state
    r = appliance_stack.status["redis"]
    password = password_file(state, "flower")
    cert, key = Pki(state / "tls").client("flower")
    app = Celery(
        "intruder", broker=f"rediss://flower:{password.read_text().strip()}@127.0.0.1:{r['port']}/0"
    )
    app.conf.update(
        broker_use_ssl={
            "ssl_cert_reqs": 2,
            "ssl_ca_certs": r["tls"]["ca"],
            "ssl_certfile": str(cert),
            "ssl_keyfile": str(key),
        },
        broker_transport_options={"global_keyprefix": BROKER_KEY_PREFIX},
        broker_connection_retry=False,
        broker_connection_max_retries=0,
        task_publish_retry=False,
    )
    admin = appliance_stack.admin_redis()
    before = admin.llen(QUEUE)
    with pytest.raises(Exception, match="(?i)noperm|permission"):
        app.send_task(TASK_NAME, args=[{}], queue="appliance")
    assert admin.llen(QUEUE) == before
