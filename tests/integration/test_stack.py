"""The local stack against real processes: Redis TLS and ACL roles, Celery, OpenBao policies.

Each test names the guarantee it checks; refusals assert the exact error class (a NOPERM from Redis,
a 403 from OpenBao), so a test cannot pass because a service was unreachable.
"""

from __future__ import annotations

import base64
import importlib.util
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import hvac
import hvac.exceptions
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from redis.backoff import NoBackoff
from redis.retry import Retry

from appliance._stack import (
    CLIENT_ROLES,
    BaoHandle,
    Bootstrap,
    Pki,
    RedisHandle,
    audit_log_path,
    bootstrap,
    ensure_pki,
    start_detached,
    start_openbao,
    start_redis,
    stop_by_pid_file,
)

pytestmark = pytest.mark.integration

# A refused connection must fail at once, not after redis-py's default retries with backoff.
_NO_RETRY = Retry(NoBackoff(), 0)

# --------------------------------------------------------------------------------------------
# PKI and idempotent start-up
# --------------------------------------------------------------------------------------------


def test_pki_is_private_and_idempotent(pki: Pki) -> None:
    assert pki.dir.stat().st_mode & 0o777 == 0o700
    keys = [pki.ca_key, pki.server_key] + [pki.client(role)[1] for role in CLIENT_ROLES]
    assert all(key.stat().st_mode & 0o777 == 0o600 for key in keys)
    before = {path.name: path.read_bytes() for path in pki.dir.iterdir()}
    assert ensure_pki(pki.dir) == pki
    assert {path.name: path.read_bytes() for path in pki.dir.iterdir()} == before
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)


def test_starting_again_returns_the_running_services(
    redis_server: RedisHandle, openbao: BaoHandle, bao_bootstrap: Bootstrap, pki: Pki
) -> None:
    # A running OpenBao's handle comes with a root token generated from the operator token,
    # which the bootstrap makes.
    assert start_redis(redis_server.state_dir, 1, pki).pid == redis_server.pid
    assert start_openbao(openbao.state_dir, 1).pid == openbao.pid


def test_operator_access_names_files_only(redis_server: RedisHandle) -> None:
    access = redis_server.operator_access()
    assert access["username"] == "admin"
    assert (access["host"], access["port"]) == (redis_server.host, redis_server.port)
    for path in (*access["tls"].values(), access["password_file"]):
        assert Path(path).is_file()
    password = redis_server.password_file("admin").read_text().strip()
    assert password not in json.dumps(access)


# --------------------------------------------------------------------------------------------
# Redis: transport and authentication
# --------------------------------------------------------------------------------------------


def test_redis_refuses_plaintext(redis_server: RedisHandle) -> None:
    plain = redis.Redis(
        host=redis_server.host, port=redis_server.port, socket_timeout=3, retry=_NO_RETRY
    )
    with pytest.raises(redis.ConnectionError):
        plain.ping()


def test_redis_refuses_tls_without_client_certificate(redis_server: RedisHandle) -> None:
    no_cert = redis.Redis(
        host=redis_server.host,
        port=redis_server.port,
        username="admin",
        password=redis_server.password_file("admin").read_text().strip(),
        ssl=True,
        ssl_ca_certs=str(redis_server.pki.ca),
        ssl_cert_reqs="required",
        socket_timeout=3,
        retry=_NO_RETRY,
    )
    with pytest.raises(redis.ConnectionError):
        no_cert.ping()


def test_redis_default_user_is_off(redis_server: RedisHandle) -> None:
    cert, key = redis_server.pki.client("admin")
    anonymous = redis.Redis(
        host=redis_server.host,
        port=redis_server.port,
        ssl=True,
        ssl_ca_certs=str(redis_server.pki.ca),
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        ssl_cert_reqs="required",
        retry=_NO_RETRY,
    )
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    flags = redis_server.client("admin").acl_getuser("default")["flags"]
    assert "off" in flags


def test_redis_role_passwords_are_private_files(redis_server: RedisHandle) -> None:
    for role in ("admin", "api", "worker", "flower"):
        path = redis_server.password_file(role)
        assert path.stat().st_mode & 0o777 == 0o600
        assert len(path.read_text().strip()) >= 43  # 32 random bytes, URL-safe base64.
    acl_file = redis_server.state_dir / "redis" / "users.acl"
    assert redis_server.password_file("api").read_text().strip() not in acl_file.read_text()


# --------------------------------------------------------------------------------------------
# Redis: what each role may do
# --------------------------------------------------------------------------------------------


_DANGEROUS = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "dir", "/tmp"),
    ("KEYS", "*"),
    ("DEBUG", "SLEEP", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("ACL", "LIST"),
    ("MONITOR",),
    ("MODULE", "LIST"),
    ("EVAL", "return 1", "0"),
    ("SCRIPT", "FLUSH"),
    ("FUNCTION", "LIST"),
    ("INFO",),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("SAVE",),
]
# Executing these for real would take the server down if the ACL were wrong: dry-run only.
_DRY_RUN_ONLY = {"SHUTDOWN", "MONITOR", "REPLICAOF", "DEBUG"}


@pytest.mark.parametrize("role", ["api", "worker", "flower"])
@pytest.mark.parametrize("command", _DANGEROUS, ids=lambda command: " ".join(command[:2]))
def test_services_cannot_run_dangerous_commands(
    redis_server: RedisHandle, role: str, command: tuple[str, ...]
) -> None:
    verdict = redis_server.client("admin").execute_command("ACL", "DRYRUN", role, *command)
    assert "no permissions" in str(verdict)
    if command[0] not in _DRY_RUN_ONLY:
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis_server.client(role).execute_command(*command)


@pytest.mark.parametrize("key", ["secret:x", "celery-task-meta-x", "audit:x", "unprefixed"])
def test_api_cannot_touch_keys_outside_its_patterns(redis_server: RedisHandle, key: str) -> None:
    api = redis_server.client("api")
    with pytest.raises(redis.exceptions.NoPermissionError):
        api.get(key)
    with pytest.raises(redis.exceptions.NoPermissionError):
        api.set(key, "x")


def test_api_uses_its_own_keys(redis_server: RedisHandle) -> None:
    api = redis_server.client("api")
    try:
        assert api.set("nonce:k1:n1", "1", nx=True, ex=60)
        assert not api.set("nonce:k1:n1", "1", nx=True, ex=60)
        assert api.incr("ratelimit:k1") == 1
        api.set("result:f_1_x", b"sealed", ex=60)
        assert api.get("result:f_1_x") == b"sealed"
    finally:
        redis_server.client("admin").delete("nonce:k1:n1", "ratelimit:k1", "result:f_1_x")


def test_api_may_read_the_registry_generation_but_not_write_it(redis_server: RedisHandle) -> None:
    """Only the operator (admin) renews the registry generation; an API credential that could
    set it back could keep a disabled client cached."""
    admin, api = redis_server.client("admin"), redis_server.client("api")
    try:
        admin.set("registry:generation", "g1")
        assert api.get("registry:generation") == b"g1"
        with pytest.raises(redis.exceptions.NoPermissionError):
            api.set("registry:generation", "g0")
        with pytest.raises(redis.exceptions.NoPermissionError):
            api.delete("registry:generation")
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis_server.client("worker").get("registry:generation")
    finally:
        admin.delete("registry:generation")


def test_lua_runs_with_the_callers_permissions(redis_server: RedisHandle) -> None:
    # kombu needs EVALSHA, so the service roles have it: a script must not escape the ACL.
    api = redis_server.client("api")
    in_script = "user executing the script can.t"
    with pytest.raises(redis.exceptions.ResponseError, match=in_script):
        api.register_script("return redis.call('FLUSHALL')")()
    with pytest.raises(redis.exceptions.ResponseError, match=in_script):
        api.register_script("return redis.call('GET', 'secret:x')")()
    with pytest.raises(redis.exceptions.NoPermissionError):
        api.register_script("return redis.call('GET', KEYS[1])")(keys=["secret:x"])


def test_worker_cannot_read_nonces_or_rate_limits(redis_server: RedisHandle) -> None:
    worker = redis_server.client("worker")
    for key in ("nonce:k1:n1", "ratelimit:k1"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.get(key)


def test_flower_reads_queues_but_cannot_enqueue(redis_server: RedisHandle) -> None:
    flower = redis_server.client("flower")
    assert flower.llen("celery:appliance") == 0
    for key in ("celery:appliance", "celery:unacked", "result:x"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            flower.lpush(key, "{}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.get("result:x")


# --------------------------------------------------------------------------------------------
# Celery over the ACL roles
# --------------------------------------------------------------------------------------------

_PROBE_APP = '''
"""A tiny Celery app configured like the appliance: TLS, JSON only, prefixed keys, no results."""
import os
import ssl
from pathlib import Path

from celery import Celery


def make_app(state: str, port: int, role: str) -> Celery:
    state_dir = Path(state)
    password = (state_dir / "secrets" / f"redis-{role}.pass").read_text().strip()
    tls = state_dir / "tls"
    app = Celery("probe", broker=f"rediss://{role}:{password}@127.0.0.1:{port}/0")
    app.conf.update(
        broker_use_ssl={
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": str(tls / "ca.crt"),
            "ssl_certfile": str(tls / f"client-{role}.crt"),
            "ssl_keyfile": str(tls / f"client-{role}.key"),
        },
        broker_transport_options={"global_keyprefix": "celery:"},
        broker_connection_retry_on_startup=False,
        task_default_queue="appliance",
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
    )
    app.task(name="probe.touch")(touch)
    return app


def touch(path: str, text: str) -> None:
    # Written aside and renamed: the test polls for the file and must never read it half-written.
    Path(path + ".part").write_text(text)
    os.replace(path + ".part", path)


if "PROBE_STATE" in os.environ:
    app = make_app(os.environ["PROBE_STATE"], int(os.environ["PROBE_PORT"]), "worker")
'''


@pytest.fixture(scope="module")
def probe_module(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    directory = tmp_path_factory.mktemp("celery-probe")
    path = directory / "probe_app.py"
    path.write_text(_PROBE_APP)
    spec = importlib.util.spec_from_file_location("probe_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def celery_worker(
    redis_server: RedisHandle, probe_module: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A real `celery worker` (solo pool, events on) logged in to Redis as `worker`."""
    run_dir = tmp_path_factory.mktemp("celery-worker")
    pid_file = run_dir / "worker.pid"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(run_dir),
        "PYTHONPATH": str(Path(probe_module.__file__ or "").parent),
        "PROBE_STATE": str(redis_server.state_dir),
        "PROBE_PORT": str(redis_server.port),
    }
    argv = [sys.executable, "-m", "celery", "-A", "probe_app", "worker", "--pool=solo",
            "--events", "--queues=appliance", "--hostname=probe@%h", "--loglevel=INFO"]  # fmt: skip
    redis_server.client("admin").acl_log_reset()
    start_detached(argv, log_file=run_dir / "worker.log", pid_file=pid_file, env=env)
    try:
        yield run_dir / "worker.log"
    finally:
        stop_by_pid_file(pid_file, timeout=20)


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_celery_task_round_trips_through_acl_roles(
    redis_server: RedisHandle, probe_module: ModuleType, celery_worker: Path, tmp_path: Path
) -> None:
    api_app = probe_module.make_app(str(redis_server.state_dir), redis_server.port, "api")
    marker = tmp_path / "touched"

    api_app.send_task("probe.touch", args=[str(marker), "round trip"])

    log = celery_worker.read_text
    _wait_for(marker.exists, 45, f"the worker to run the task; worker log:\n{log()}")
    assert marker.read_text() == "round trip"
    # The API's readiness check reaches the worker through the pidbox broadcast channel.
    replies = _wait_for(lambda: api_app.control.inspect(timeout=2).ping(), 15, "an inspect reply")
    assert any(reply == {"ok": "pong"} for reply in replies.values())
    assert "NoPermissionError" not in log() and "NOPERM" not in log()
    # Since the worker started, neither role has hit a single ACL denial.
    assert redis_server.client("admin").acl_log() == []


def test_celery_keys_all_carry_the_prefix(redis_server: RedisHandle, celery_worker: Path) -> None:
    keys = [key.decode() for key in redis_server.client("admin").scan_iter(count=1000)]
    assert any(key.startswith("celery:_kombu.binding.") for key in keys)
    assert [key for key in keys if not key.startswith("celery:")] == []


# --------------------------------------------------------------------------------------------
# OpenBao: AppRole credentials
# --------------------------------------------------------------------------------------------


def _login(openbao: BaoHandle, role: str, directory: Path) -> hvac.Client:
    """Log in like a service: read the role_id file, unwrap the secret_id once, log in."""
    role_id_file, wrap_file = openbao.write_service_credentials(role, directory)
    unwrapper = hvac.Client(url=openbao.addr, token=wrap_file.read_text().strip())
    secret_id = unwrapper.sys.unwrap()["data"]["secret_id"]
    client = hvac.Client(url=openbao.addr)
    client.auth.approle.login(role_id=role_id_file.read_text().strip(), secret_id=secret_id)
    assert client.is_authenticated()
    return client


@pytest.fixture(scope="module")
def api_bao(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path_factory: pytest.TempPathFactory
) -> hvac.Client:
    return _login(openbao, "api", tmp_path_factory.mktemp("api-creds"))


@pytest.fixture(scope="module")
def worker_bao(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path_factory: pytest.TempPathFactory
) -> hvac.Client:
    return _login(openbao, "worker", tmp_path_factory.mktemp("worker-creds"))


@pytest.fixture(scope="module")
def fixtures_in_bao(openbao: BaoHandle, bao_bootstrap: Bootstrap) -> dict[str, str]:
    """One registered client and one task secret, written with the root token."""
    root = openbao.client()
    root.secrets.kv.v2.create_or_update_secret(
        "appliance/clients/alice", secret={"public_key": "PEM", "enabled": True}, mount_point="kv"
    )
    secret_value = "s3cr3t-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
    root.secrets.kv.v2.create_or_update_secret(
        "appliance/secrets/db", secret={"password": secret_value}, mount_point="kv"
    )
    return {"client": "alice", "secret_path": "appliance/secrets/db", "secret_value": secret_value}


def test_credential_files_are_private(openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path: Path):
    for path in openbao.write_service_credentials("api", tmp_path):
        assert path.stat().st_mode & 0o777 == 0o600
    secrets = openbao.state_dir / "secrets"
    for name in ("bao-unseal.json", "bao-operator.token"):
        assert (secrets / name).stat().st_mode & 0o777 == 0o600
    assert not (secrets / "bao-root.token").exists()  # No root token is ever written.


def test_service_tokens_carry_only_their_policy(api_bao: hvac.Client, worker_bao: hvac.Client):
    for client, role in ((api_bao, "api"), (worker_bao, "worker")):
        token = client.auth.token.lookup_self()["data"]
        assert token["policies"] == [role]
        assert token["ttl"] <= 600
        client.auth.token.renew_self()


def test_wrapped_secret_id_unwraps_only_once(openbao: BaoHandle, bao_bootstrap: Bootstrap):
    wrap_token = bao_bootstrap.issue_wrapped_secret_id("worker")
    lookup = openbao.client().adapter.post("/v1/sys/wrapping/lookup", json={"token": wrap_token})
    assert lookup["data"]["creation_path"] == "auth/approle/role/worker/secret-id"
    unwrapper = hvac.Client(url=openbao.addr, token=wrap_token)
    secret_id = unwrapper.sys.unwrap()["data"]["secret_id"]
    with pytest.raises(hvac.exceptions.VaultError):
        unwrapper.sys.unwrap()
    client = hvac.Client(url=openbao.addr)
    client.auth.approle.login(role_id=bao_bootstrap.role_id("worker"), secret_id=secret_id)
    # A secret_id is good for one login: the service logs in again with the successor it
    # minted (tests/integration/test_service_identities.py).
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hvac.Client(url=openbao.addr).auth.approle.login(
            role_id=bao_bootstrap.role_id("worker"), secret_id=secret_id
        )
    info = openbao.client().auth.approle.read_role("worker")["data"]
    assert info["secret_id_bound_cidrs"] == ["127.0.0.1/32"]
    assert info["token_bound_cidrs"] in (["127.0.0.1/32"], ["127.0.0.1"])


def test_bootstrap_is_idempotent(openbao: BaoHandle, bao_bootstrap: Bootstrap) -> None:
    again = bootstrap(openbao)
    assert dict(again.role_ids) == dict(bao_bootstrap.role_ids)
    keys = openbao.client().secrets.transit.list_keys(mount_point="transit")["data"]["keys"]
    assert sorted(keys) == ["audit", "carry", "jobs", "results", "task-messages", "task-signing"]


# --------------------------------------------------------------------------------------------
# OpenBao: what each role may and may not do
# --------------------------------------------------------------------------------------------

_CONTEXT = base64.b64encode(b"result:f_1_x").decode()


def _ciphertext(openbao: BaoHandle, key: str) -> str:
    data = openbao.client().secrets.transit.generate_data_key(
        key, "wrapped", context=_CONTEXT, mount_point="transit"
    )
    return str(data["data"]["ciphertext"])


_Forbidden = Callable[[hvac.Client, BaoHandle], Any]

_API_FORBIDDEN: dict[str, _Forbidden] = {
    "mint worker secret_id": lambda c, b: c.auth.approle.generate_secret_id("worker"),
    "read worker role_id": lambda c, b: c.auth.approle.read_role_id("worker"),
    "create a token": lambda c, b: c.auth.token.create(policies=["worker"]),
    "read task secrets": lambda c, b: c.secrets.kv.v2.read_secret_version(
        "appliance/secrets/db", mount_point="kv", raise_on_deleted_version=True
    ),
    "decrypt jobs": lambda c, b: c.secrets.transit.decrypt_data(
        "jobs", _ciphertext(b, "jobs"), context=_CONTEXT, mount_point="transit"
    ),
    "results data key": lambda c, b: c.secrets.transit.generate_data_key(
        "results", "plaintext", context=_CONTEXT, mount_point="transit"
    ),
    "results wrapped data key": lambda c, b: c.secrets.transit.generate_data_key(
        "results", "wrapped", context=_CONTEXT, mount_point="transit"
    ),
    "rotate a key": lambda c, b: c.secrets.transit.rotate_key("results", mount_point="transit"),
    "write the registry": lambda c, b: c.secrets.kv.v2.create_or_update_secret(
        "appliance/clients/mallory", secret={"public_key": "x"}, mount_point="kv"
    ),
}

_WORKER_FORBIDDEN: dict[str, _Forbidden] = {
    "read the client registry": lambda c, b: c.secrets.kv.v2.read_secret_version(
        "appliance/clients/alice", mount_point="kv", raise_on_deleted_version=True
    ),
    "list the client registry": lambda c, b: c.secrets.kv.v2.list_secrets(
        "appliance/clients", mount_point="kv"
    ),
    "decrypt results": lambda c, b: c.secrets.transit.decrypt_data(
        "results", _ciphertext(b, "results"), context=_CONTEXT, mount_point="transit"
    ),
    "jobs data key": lambda c, b: c.secrets.transit.generate_data_key(
        "jobs", "plaintext", context=_CONTEXT, mount_point="transit"
    ),
    "mint api secret_id": lambda c, b: c.auth.approle.generate_secret_id("api"),
    "write task secrets": lambda c, b: c.secrets.kv.v2.create_or_update_secret(
        "appliance/secrets/db", secret={"password": "x"}, mount_point="kv"
    ),
}


@pytest.mark.parametrize("action", list(_API_FORBIDDEN))
def test_api_is_refused(
    action: str, api_bao: hvac.Client, openbao: BaoHandle, fixtures_in_bao: dict[str, str]
) -> None:
    with pytest.raises(hvac.exceptions.Forbidden):
        _API_FORBIDDEN[action](api_bao, openbao)


@pytest.mark.parametrize("action", list(_WORKER_FORBIDDEN))
def test_worker_is_refused(
    action: str, worker_bao: hvac.Client, openbao: BaoHandle, fixtures_in_bao: dict[str, str]
) -> None:
    with pytest.raises(hvac.exceptions.Forbidden):
        _WORKER_FORBIDDEN[action](worker_bao, openbao)


def test_api_reads_the_client_registry(api_bao: hvac.Client, fixtures_in_bao: dict[str, str]):
    kv = api_bao.secrets.kv.v2
    entry = kv.read_secret_version(
        "appliance/clients/alice", mount_point="kv", raise_on_deleted_version=True
    )
    assert entry["data"]["data"]["public_key"] == "PEM"
    listed = kv.list_secrets("appliance/clients", mount_point="kv")["data"]["keys"]
    assert "alice" in listed


def test_job_key_goes_from_api_to_worker(api_bao: hvac.Client, worker_bao: hvac.Client) -> None:
    transit = "transit"
    sealed = api_bao.secrets.transit.generate_data_key(
        "jobs", "plaintext", context=_CONTEXT, mount_point=transit
    )["data"]
    opened = worker_bao.secrets.transit.decrypt_data(
        "jobs", sealed["ciphertext"], context=_CONTEXT, mount_point=transit
    )["data"]
    assert opened["plaintext"] == sealed["plaintext"]


def test_result_key_goes_from_worker_to_api(api_bao: hvac.Client, worker_bao: hvac.Client) -> None:
    sealed = worker_bao.secrets.transit.generate_data_key(
        "results", "plaintext", context=_CONTEXT, mount_point="transit"
    )["data"]
    opened = api_bao.secrets.transit.decrypt_data(
        "results", sealed["ciphertext"], context=_CONTEXT, mount_point="transit"
    )["data"]
    assert opened["plaintext"] == sealed["plaintext"]


def test_task_signature_from_api_verifies_in_worker(api_bao: hvac.Client, worker_bao: hvac.Client):
    envelope = base64.b64encode(json.dumps({"task": "x"}).encode()).decode()
    tag = api_bao.secrets.transit.generate_hmac(
        "task-signing", envelope, algorithm="sha2-256", mount_point="transit"
    )["data"]["hmac"]
    verified = worker_bao.secrets.transit.verify_signed_data(
        "task-signing", envelope, hmac=tag, hash_algorithm="sha2-256", mount_point="transit"
    )
    assert verified["data"]["valid"] is True
    # Only the API mints task signatures: a worker (or whoever holds its token) cannot.
    with pytest.raises(hvac.exceptions.Forbidden):
        worker_bao.secrets.transit.generate_hmac(
            "task-signing", envelope, algorithm="sha2-256", mount_point="transit"
        )


def test_audit_signatures_verify_offline(
    openbao: BaoHandle, api_bao: hvac.Client, worker_bao: hvac.Client
) -> None:
    checkpoint = b'{"seq": 10, "hash": "abc"}'
    public = openbao.client().secrets.transit.read_key("audit", mount_point="transit")
    # Other tests may have rotated the shared key: signatures use the latest version.
    latest = str(public["data"]["latest_version"])
    public_key = Ed25519PublicKey.from_public_bytes(
        base64.b64decode(public["data"]["keys"][latest]["public_key"])
    )
    for client in (api_bao, worker_bao):
        signed = client.secrets.transit.sign_data(
            "audit", base64.b64encode(checkpoint).decode(), mount_point="transit"
        )["data"]["signature"]
        public_key.verify(base64.b64decode(signed.split(":", 2)[2]), checkpoint)


def test_worker_reads_task_secrets(worker_bao: hvac.Client, fixtures_in_bao: dict[str, str]):
    entry = worker_bao.secrets.kv.v2.read_secret_version(
        fixtures_in_bao["secret_path"], mount_point="kv", raise_on_deleted_version=True
    )
    assert entry["data"]["data"]["password"] == fixtures_in_bao["secret_value"]


def test_operator_policy(openbao: BaoHandle, bao_bootstrap: Bootstrap) -> None:
    root = openbao.client()
    token = root.auth.token.create(policies=["operator"], no_default_policy=True, ttl="5m")
    operator = hvac.Client(url=openbao.addr, token=token["auth"]["client_token"])
    operator.secrets.kv.v2.create_or_update_secret(
        "appliance/clients/bob", secret={"public_key": "PEM"}, mount_point="kv"
    )
    operator.secrets.transit.rotate_key("jobs", mount_point="transit")
    assert (
        operator.secrets.transit.read_key("jobs", mount_point="transit")["data"]["latest_version"]
        >= 2
    )
    # Only the bootstrap enrols a service (issue 12, finding 5): no secret_id, wrapped or not.
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.auth.approle.generate_secret_id("worker", wrap_ttl="60s")
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.auth.approle.generate_secret_id("worker")
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.secrets.transit.update_key_configuration(
            "jobs", exportable=True, mount_point="transit"
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.secrets.transit.decrypt_data(
            "results", _ciphertext(openbao, "results"), context=_CONTEXT, mount_point="transit"
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.secrets.kv.v2.read_secret_version(
            "appliance/secrets/db", mount_point="kv", raise_on_deleted_version=True
        )


# --------------------------------------------------------------------------------------------
# OpenBao: audit device
# --------------------------------------------------------------------------------------------


def test_audit_log_records_requests_without_secrets(
    openbao: BaoHandle, worker_bao: hvac.Client, fixtures_in_bao: dict[str, str]
) -> None:
    worker_bao.secrets.kv.v2.read_secret_version(
        fixtures_in_bao["secret_path"], mount_point="kv", raise_on_deleted_version=True
    )
    path = audit_log_path(openbao.state_dir)
    assert path.stat().st_mode & 0o777 == 0o600
    lines = path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) > 10
    paths = {entry.get("request", {}).get("path") for entry in entries}
    assert "auth/approle/login" in paths
    assert fixtures_in_bao["secret_path"].replace("appliance/", "kv/data/appliance/") in paths
    assert fixtures_in_bao["secret_value"] not in path.read_text()
    assert openbao.root_token not in path.read_text()


def test_admin_is_unrestricted(redis_server: RedisHandle) -> None:
    """The operator's account (what `appliance status` points to) can inspect everything."""
    admin = redis_server.client("admin")
    assert admin.info("server")["redis_version"].startswith("7.")
    assert admin.acl_whoami() == "admin"
