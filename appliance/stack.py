"""`appliance up` / `status` / `down`: the whole local stack under one state directory.

up: PKI → Redis (TLS, ACL users) → OpenBao (persistent, unsealed from the state's key shares,
bootstrapped from policies/*.hcl with a root token that is revoked at the end) → worker → API →
Flower. Each service gets only its own credentials: a role_id and a single-use wrapped secret_id
for OpenBao, its Redis user's password file and client certificate. Idempotent: a service whose
pid is alive is left alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import httpx
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import _stack
from ._stack.api_tls import ApiCertFiles, ensure_generated
from ._stack.pki import write_file
from ._stack.procs import port_open
from ._stack.redis_server import operator_access
from ._stack.seal import pending_shares
from .errors import NotFound
from .registry import Client, InvalidRegistryEntry, Registry
from .settings import SETTINGS_FILE, Settings
from .store import RedisGeneration
from .vault import EnrolmentLost, VaultSession, successor_file

if TYPE_CHECKING:
    from .audit import VaultAnchorStore

HOST = "127.0.0.1"
DEFAULT_PORTS = {"redis": 16379, "bao": 18200, "api": 8000, "flower": 5555, "metrics": 9464}
SERVICES = ("worker", "api", "flower")
LOCAL_CLIENT = "local"
WORKER_CONCURRENCY = 2


@dataclass
class Ports:
    """Where each service listens."""

    redis: int
    bao: int
    api: int
    flower: int
    metrics: int  # the worker's Prometheus endpoint (the API serves its own on /metrics)


def _config_file(state: Path) -> Path:
    return state / "stack.json"


def load_ports(state: Path, requested: dict[str, int] | None = None) -> Ports:
    """The ports recorded for this state, or the requested/default ones for a new stack."""
    if _config_file(state).is_file():
        return Ports(**{**DEFAULT_PORTS, **json.loads(_config_file(state).read_text())["ports"]})
    chosen = dict(DEFAULT_PORTS)
    for name, port in (requested or {}).items():
        chosen[name] = _stack.free_port() if port == 0 else port
    return Ports(**chosen)


@dataclass(frozen=True)
class ApiTls:
    """Whether the API serves HTTPS (stack.json's `api_tls`), and the extra names its generated
    certificate covers besides loopback and the host's name."""

    enabled: bool = False
    names: tuple[str, ...] = ()


def load_api_tls(state: Path) -> ApiTls:
    """What `prepare` recorded for the API's TLS (off for a state without it)."""
    try:
        recorded = json.loads(_config_file(state).read_text())
    except FileNotFoundError:
        return ApiTls()
    return ApiTls(bool(recorded.get("api_tls", False)), tuple(recorded.get("api_tls_names", ())))


def _requested_api_tls(state: Path) -> ApiTls:
    """APPLIANCE_API_TLS and APPLIANCE_API_TLS_NAMES of this process (or `appliance.env`) where
    given; what the state recorded where not, so that a later `up` without them keeps TLS."""
    settings = Settings(_env_file=state / SETTINGS_FILE)  # type: ignore[call-arg]
    recorded = load_api_tls(state)
    given = settings.model_fields_set
    return ApiTls(
        settings.api_tls if "api_tls" in given else recorded.enabled,
        settings.api_tls_names if "api_tls_names" in given else recorded.names,
    )


def api_cert_files(state: Path) -> ApiCertFiles:
    """The API's generated and operator-supplied certificate pairs in `tls/`."""
    return ApiCertFiles(state / "tls")


def api_tls_owner(state: Path) -> _stack.RunAs | None:
    """Who must own the API's TLS files: the API's user when services run as their own users
    (and this process is root), else None (the caller)."""
    users = _recorded_users(state)
    return users["api"] if users is not None else None


def api_url(state: Path, ports: Ports | None = None) -> str:
    """The API's URL on this machine: https when the state serves it over TLS."""
    scheme = "https" if load_api_tls(state).enabled else "http"
    return f"{scheme}://{HOST}:{(ports or load_ports(state)).api}"


def _service_dir(state: Path, name: str) -> Path:
    path = state / "run" / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _pid_file(state: Path, name: str) -> Path:
    return _service_dir(state, name) / f"{name}.pid"


def _require_binaries() -> None:
    if shutil.which("redis-server") is None:
        raise _stack.StackError(
            "redis-server is missing: run `apt-get install -y redis-server` as root"
        )


def service_env(
    state: Path, role: str, ports: Ports, pki: _stack.Pki, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The whole environment of one service: paths to its own credentials, nothing inline."""
    cert, key = pki.client(role)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(_service_dir(state, role)),
        "LANG": "C.UTF-8",
        "APPLIANCE_STATE": str(state),
        "APPLIANCE_REDIS_HOST": HOST,
        "APPLIANCE_REDIS_PORT": str(ports.redis),
        "APPLIANCE_REDIS_CA": str(pki.ca),
        "APPLIANCE_REDIS_CERT": str(cert),
        "APPLIANCE_REDIS_KEY": str(key),
        "APPLIANCE_REDIS_USERNAME": role,
        "APPLIANCE_REDIS_PASSWORD_FILE": str(_stack.password_file(state, role)),
        "APPLIANCE_VAULT_ADDR": f"http://{HOST}:{ports.bao}",
        "APPLIANCE_AUDIT_LOG": str(audit_log(state)),
        "APPLIANCE_METRICS_TOKEN_FILE": str(metrics_token_file(state)),
        "APPLIANCE_METRICS_PORT": str(ports.metrics),
    }
    if role in _stack.load_leased_roles():
        # The role's Redis user comes from OpenBao; its static user is off and has no password.
        del env["APPLIANCE_REDIS_PASSWORD_FILE"]
        env["APPLIANCE_REDIS_LEASE_ROLE"] = role
    env.update(extra or {})
    return env


def metrics_token_file(state: Path) -> Path:
    """The bearer token a Prometheus scraper presents to `/metrics` (API and worker)."""
    return state / "secrets" / "metrics.token"


def audit_log(state: Path) -> Path:
    """The appliance's audit log."""
    return state / "audit" / "audit.jsonl"


#: Whose files `prepare` exports (the services started before `init`: Redis and its relay share
#: the `redis` tree) and whose `init` exports (after it made their enrolment files).
EXPORTED_BY_PREPARE = ("redis",)
EXPORTED_BY_INIT = SERVICES


def service_files(state: Path, name: str) -> dict[str, tuple[Path, ...]]:
    """What service `name` reads of `tls/` and `secrets/`, by directory: the CA certificate, its
    own certificate and key, and its own secrets; never the CA key, another service's key, the
    unseal shares, the operator token or the `admin` and `vault` passwords."""
    pki = _stack.Pki(state / "tls")
    if name == "redis":
        # Redis and its relay serve with the server certificate; the relay (and the healthcheck)
        # reach Redis as `vault`, whose password stays with OpenBao's database engine.
        return {"tls": (pki.ca, pki.server_cert, pki.server_key, *pki.client("vault"))}
    if name not in SERVICES:
        raise _stack.StackError(f"no service {name!r} to export for")
    own = [metrics_token_file(state)] if name in ("api", "worker") else []
    if name == "worker":
        own.append(_stack.enrolment_file(state))
    if name not in _stack.load_leased_roles():
        own.append(_stack.password_file(state, name))
    tls = [pki.ca, *pki.client(name)]
    if name == "api" and load_api_tls(state).enabled:
        tls.extend(api_cert_files(state).served())
    return {"tls": tuple(tls), "secrets": tuple(own)}


def export_service_files(state: Path, names: tuple[str, ...], target: Path) -> None:
    """Each service of `names` gets `target/<name>/tls` and `target/<name>/secrets` holding
    only its own files (`service_files`), for a container engine to mount at `<state>/tls` and
    `<state>/secrets` in that service's container instead of the whole directories."""
    for name in names:
        _stack.export_files(service_files(state, name), target / name)


def _argv(
    name: str, ports: Ports, state: Path, env: Mapping[str, str], replica: str | None = None
) -> list[str]:
    py = sys.executable
    if name == "worker":
        # Celery's node name: each replica its own (Flower and `inspect` tell them apart).
        node = f"{replica or f'worker-{ports.api}'}@%h"
        return [
            py,
            "-m",
            "celery",
            "--quiet",
            "-A",
            "appliance.worker.app",
            "worker",
            "--pool",
            "threads",
            "-c",
            str(WORKER_CONCURRENCY),
            "-Q",
            "appliance",
            "-n",
            node,
            "-E",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
        ]
    if name == "api":
        argv = [
            py,
            # uvicorn with read deadlines and caps (appliance/api/_server.py), not plain uvicorn.
            "-m",
            "appliance.api",
            "--host",
            env.get("APPLIANCE_API_HOST", HOST),
            "--port",
            str(ports.api),
        ]
        if load_api_tls(state).enabled:
            cert, key = api_cert_files(state).served()
            argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        return argv
    # Flower reads its login from OpenBao itself (AppRole `flower`): no secret in argv or env.
    address = env.get("APPLIANCE_FLOWER_HOST", HOST)
    return [py, "-m", "appliance.flower", "--address", address, "--port", str(ports.flower)]


def _start_service(
    state: Path,
    name: str,
    ports: Ports,
    pki: _stack.Pki,
    bao: _stack.BaoHandle,
    users: Mapping[str, _stack.RunAs] | None,
) -> None:
    """Enrol the service (a wrapped secret_id minted by the bootstrap) and start it."""
    if _stack.read_pid_file(_pid_file(state, name)) is not None:
        return
    # One instance per service here: its earlier secret_ids (a successor left by its last run)
    # are destroyed, so that the new enrolment is the only way in as this service.
    bao.retire_secret_ids(name)
    bao.write_service_credentials(name, _service_dir(state, name))
    _launch(state, name, ports, pki, users)


def restart_service(state: Path, name: str) -> None:
    """Start a stopped service again without the bootstrap: it logs in with the secret_id its
    last login left in its directory (`EnrolmentLost` in its log, and exit, if that secret_id
    was used elsewhere, destroyed or has expired: then run `appliance up`)."""
    if name not in SERVICES:
        raise _stack.StackError(f"no service {name!r}; the services are {', '.join(SERVICES)}")
    if _stack.read_pid_file(_pid_file(state, name)) is not None:
        return
    _launch(state, name, load_ports(state), _stack.Pki(state / "tls"), _service_users(state))


def _launch(
    state: Path,
    name: str,
    ports: Ports,
    pki: _stack.Pki,
    users: Mapping[str, _stack.RunAs] | None,
) -> None:
    port = {"api": ports.api, "flower": ports.flower}.get(name)
    if port is not None and port_open(HOST, port):
        raise _stack.StackError(
            f"port {port} for the {name} is taken: free it or choose "
            f"another with --{name}-port on a new --state"
        )
    directory = _service_dir(state, name)
    command = _service_command(state, name, ports, pki, users, directory)
    _stack.start_detached(
        command.argv,
        log_file=directory / f"{name}.log",
        pid_file=_pid_file(state, name),
        env=command.env,
        cwd=directory,
        run_as=command.run_as,
    )


@dataclass(frozen=True)
class Command:
    """How one service runs: its command line, its whole environment, where, and as whom."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    run_as: _stack.RunAs | None = None


def _service_command(
    state: Path,
    name: str,
    ports: Ports,
    pki: _stack.Pki,
    users: Mapping[str, _stack.RunAs] | None,
    directory: Path,
    overrides: Mapping[str, str] | None = None,
    *,
    own_files: bool = True,
    replica: str | None = None,
) -> Command:
    """The API's, the worker's or Flower's command, logging in with the files in `directory`;
    `overrides` (APPLIANCE_* settings of `appliance serve`'s caller) win over the defaults,
    except the service's credentials. With `own_files`, its files are given to its user first
    (`serve` leaves that to `prepare` and `init`: its mounts may be read-only)."""
    role_id_file, wrap_file = _stack.credential_files(directory, name)
    extra = {
        "APPLIANCE_VAULT_ROLE_ID_FILE": str(role_id_file),
        "APPLIANCE_VAULT_SECRET_ID_WRAP_FILE": str(wrap_file),
    }
    if name == "api":
        # The one authority a signed request to this stack may name (issue 12, finding 19): the
        # loopback address and port of `api_url`, which is all the local stack listens on.
        extra["APPLIANCE_API_AUTHORITIES"] = _api_authorities(state, ports)
    extra.update({k: v for k, v in (overrides or {}).items() if k not in _CREDENTIAL_SETTINGS})
    run_as = None
    if users is not None:
        if own_files:
            _own_service_files(state, name, ports, pki, users, directory)
        # The worker starts as root, starts its sandbox launcher, then becomes its user.
        if name == "worker":
            extra["APPLIANCE_WORKER_USER"] = users[name].name
        else:
            run_as = users[name]
    env = service_env(state, name, ports, pki, extra)
    return Command(_argv(name, ports, state, env, replica), env, directory, run_as)


def _api_authorities(state: Path, ports: Ports) -> str:
    """The `@authority` values a signed request may name: `HOST:PORT`, and over TLS also each
    extra name of the certificate with the port (the names clients reach the API by)."""
    api_tls = load_api_tls(state)
    names = [HOST, *(api_tls.names if api_tls.enabled else ())]
    hosts = (f"[{n}]" if ":" in n else n for n in dict.fromkeys(names))
    return ",".join(f"{host}:{ports.api}" for host in hosts)


#: What `serve` decides itself, whatever its caller's environment says: the service's identity.
_CREDENTIAL_SETTINGS = frozenset(
    {
        "APPLIANCE_VAULT_ROLE_ID_FILE",
        "APPLIANCE_VAULT_SECRET_ID_WRAP_FILE",
        "APPLIANCE_WORKER_USER",
        "APPLIANCE_REDIS_USERNAME",
        "APPLIANCE_REDIS_PASSWORD_FILE",
        "APPLIANCE_REDIS_CERT",
        "APPLIANCE_REDIS_KEY",
        "APPLIANCE_REDIS_LEASE_ROLE",
    }
)


def _own_service_files(
    state: Path,
    name: str,
    ports: Ports,
    pki: _stack.Pki,
    users: Mapping[str, _stack.RunAs],
    directory: Path,
) -> None:
    """A service's login directory, client key and (a static Redis user's) password to its user."""
    users[name].own(directory, pki.client(name)[1])
    if name == "api":
        # The API's TLS keys (generated and operator-supplied, whichever exist): its user's alone.
        users[name].own(*(path for path in _api_tls_files(state) if path.exists()))
    if "APPLIANCE_REDIS_PASSWORD_FILE" in service_env(state, name, ports, pki):
        users[name].own(_stack.password_file(state, name))


def _api_tls_files(state: Path) -> tuple[Path, ...]:
    files = api_cert_files(state)
    return (*files.generated, *files.operator)


def _service_users(state: Path) -> Mapping[str, _stack.RunAs] | None:
    """Each service's own user when `up` runs as root; None when every service runs as the
    caller: `up` not run as root, or those users could not reach the state directory, the
    Python or the code (then `status` says why, under `service_users`)."""
    why = _users_file(state)
    why.unlink(missing_ok=True)
    users = _stack.service_users()
    if users is None:
        return None
    try:
        _stack.check_reachable(state, Path(sys.executable), Path(__file__))
    except _stack.StackError as exc:
        why.write_text(json.dumps({"enabled": False, "why": str(exc)}))
        return None
    os.chmod(state, 0o711)  # noqa: S103 - search only: each service reaches its own files
    why.write_text(json.dumps({"enabled": True, "users": {k: u.name for k, u in users.items()}}))
    return users


def _users_file(state: Path) -> Path:
    return state / "service-users.json"


def _hand_over_keys(state: Path, pki: _stack.Pki, users: Mapping[str, _stack.RunAs] | None) -> None:
    """The directories each service must cross made searchable, and Redis's keys to its user;
    each other service gets its own files when it starts (`_launch`). The rest stays root's:
    the CA key, the `admin` key and password, the unseal shares, the operator token."""
    if users is None:
        return
    for directory in (pki.dir, state / "secrets", state / "run"):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o711)  # noqa: S103 - search only, no listing
    users["redis"].own(pki.server_key, pki.client("vault")[1])


def _share_audit_and_metrics(state: Path, users: Mapping[str, _stack.RunAs] | None) -> None:
    """The audit directory and the metrics token to the group of the API and the worker, and
    the secrets directory searchable (the services' Redis password files are in it)."""
    if users is None:
        return
    # Searchable, not listable: each service opens only the files it owns (or its group's).
    # Redis's start makes `secrets/` 0700 again, hence here, right before the services start.
    os.chmod(state / "secrets", 0o711)  # noqa: S103 - search only
    gid = _stack.shared_gid()
    directory = audit_log(state).parent
    os.chown(directory, 0, gid)
    # setgid: every file made in it belongs to the group (the writers make them 0660). Sticky:
    # a writer removes or renames only its own files, never the other's log or root's keys.
    os.chmod(directory, 0o3770)  # noqa: S103 - the group of the API and the worker only
    from .audit import AuditPaths

    public_keys = AuditPaths(audit_log(state)).public_keys
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # Every entry may have been made by a writer (a symlink to `secrets/backup.token`, a
        # FIFO): each is changed through a descriptor of a regular file, never by its name.
        for name in os.listdir(dir_fd):
            if name == public_keys.name:
                # What `audit verify` trusts first: root's alone, readable by all.
                _stack.set_owner_and_mode(Path(name), 0, 0, lambda _: 0o644, dir_fd=dir_fd)
                continue
            group_bits = 0o040 if name.endswith(".key") else 0o060
            _stack.set_owner_and_mode(Path(name), -1, gid, _with_bits(group_bits), dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    os.chown(metrics_token_file(state), 0, gid)
    os.chmod(metrics_token_file(state), 0o640)


def _with_bits(bits: int) -> Callable[[int], int]:
    return lambda mode: mode | bits


def _ensure_local_client(state: Path, bao: _stack.BaoHandle) -> None:
    """A client key for the operator's own shell, registered for every function."""
    keys = state / "clients"
    private, public = keys / f"{LOCAL_CLIENT}.key", keys / f"{LOCAL_CLIENT}.pub"
    if not private.is_file():
        write_keypair(keys, LOCAL_CLIENT)
    registry = Registry(
        VaultSession(bao.addr, bao.operator_token()), generation=RedisGeneration(admin_redis(state))
    )
    # `read`, not `get`: a client the operator disabled or narrowed is theirs to keep as set;
    # only a missing one is registered (issue 12, finding 15).
    try:
        registry.read(LOCAL_CLIENT)
    except NotFound:
        registry.put(Client(LOCAL_CLIENT, public.read_text(), ("*",)))
    except InvalidRegistryEntry as exc:
        # An entry the operator edited by hand and broke is theirs to fix (`clients list` says
        # why); `up` does not put a fresh one, enabled for every function, in its place.
        print(f"warning: {exc.detail}; the API refuses its key id until fixed", file=sys.stderr)


def admin_redis(state: Path) -> redis.Redis:
    """The operator's Redis connection as `admin` (the `redis` of `appliance status --json`)."""
    access = operator_access(state, HOST, load_ports(state).redis, _stack.Pki(state / "tls"))
    return redis.Redis(
        host=access["host"],
        port=access["port"],
        ssl=True,
        ssl_ca_certs=access["tls"]["ca"],
        ssl_certfile=access["tls"]["cert"],
        ssl_keyfile=access["tls"]["key"],
        username=access["username"],
        password=Path(access["password_file"]).read_text().strip(),
        socket_timeout=5,
        socket_connect_timeout=3,
    )


def operator_registry(state: Path) -> Registry:
    """The client registry as the operator writes it: OpenBao with the operator token, and the
    registry generation renewed in Redis as `admin`, so every API process sees each write on
    its next request."""
    return Registry(operator_session(state), generation=RedisGeneration(admin_redis(state)))


def operator_session(state: Path) -> VaultSession:
    """An OpenBao session with the operator's token (policies/operator.hcl)."""
    token_file = _stack.operator_token_file(state)
    return VaultSession.from_token_file(f"http://{HOST}:{load_ports(state).bao}", token_file)


def write_keypair(directory: Path, keyid: str) -> tuple[Path, Path]:
    """An Ed25519 key pair as PEM: `<keyid>.key` (0600) and `<keyid>.pub`."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private, public = directory / f"{keyid}.key", directory / f"{keyid}.pub"
    _stack.write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@dataclass(frozen=True)
class Prepared:
    """A prepared state directory: its ports, PKI, and the services' users (None: the caller's)."""

    ports: Ports
    pki: _stack.Pki
    users: Mapping[str, _stack.RunAs] | None


def prepare(state: Path, requested_ports: dict[str, int] | None = None) -> Prepared:
    """`appliance prepare`: everything the services read at start that needs no running service
    (ports, PKI, Redis's passwords and ACL file, the relay's port, OpenBao's configuration, the
    audit directory and metrics token, each service's files to its user). Idempotent; no network.
    """
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    users = _service_users(state)
    ports = load_ports(state, requested_ports)
    api_tls = _requested_api_tls(state)
    # Atomically: a `prepare` stopped mid-write (SIGTERM at a unit's timeout) must not leave an
    # empty stack.json that every later command fails to read.
    write_file(
        _config_file(state),
        json.dumps(
            {"ports": asdict(ports), "api_tls": api_tls.enabled, "api_tls_names": api_tls.names}
        ).encode(),
    )
    pki = _stack.ensure_pki(state / "tls")
    if api_tls.enabled:
        ensure_generated(pki, api_tls.names)
    _hand_over_keys(state, pki, users)
    leased = _stack.load_leased_roles()
    _stack.prepare_redis(
        state, ports.redis, leased=leased, run_as=users["redis"] if users else None
    )
    _stack.relay_port(state)
    # Files older stacks left: the dev-mode OpenBao's root token (that server is gone) and the
    # static passwords of roles whose users now come from OpenBao.
    (state / "secrets" / "bao-root.token").unlink(missing_ok=True)
    for role in leased:
        _stack.password_file(state, role).unlink(missing_ok=True)
    _stack.prepare_openbao(state, ports.bao, run_as=users["openbao"] if users else None)
    (state / "audit").mkdir(exist_ok=True, mode=0o700)
    if not metrics_token_file(state).is_file():
        _stack.write_private(metrics_token_file(state), secrets.token_urlsafe(32).encode())
    _share_audit_and_metrics(state, users)
    if users is not None:
        for name in SERVICES:
            _own_service_files(state, name, ports, pki, users, _service_dir(state, name))
    return Prepared(ports, pki, users)


def _prepared(state: Path) -> Prepared:
    """The ports, PKI and users of a state that `prepare` made (StackError if it did not)."""
    if not _config_file(state).is_file():
        raise _stack.StackError(f"no prepared stack in {state}: run `appliance prepare` first")
    return Prepared(load_ports(state), _stack.Pki(state / "tls"), _recorded_users(state))


def _recorded_users(state: Path) -> Mapping[str, _stack.RunAs] | None:
    """The services' users when `prepare` (or `up`) gave them their files and this process is
    root; else None."""
    if not _service_users_status(state).get("enabled"):
        return None
    return _stack.service_users()


def init(state: Path, timeout: float = 60.0, *, recipient: str | None = None) -> dict[str, Any]:
    """`appliance init`: with Redis, its relay and OpenBao running (`appliance serve`), open
    OpenBao (initialise once, unseal), bootstrap it, enrol the API and Flower unless their own
    credentials are still good, keep a live worker enrolment credential, revoke the root token.
    Idempotent. Returns what it did.

    `recipient` (an age X25519 recipient) makes a new OpenBao's seal the operator's
    (`_stack/seal.py`): its shares come back encrypted under `unseal_shares`, as long as the
    state keeps them (`<state>/unseal-shares.age`, until `appliance shares ack`). In
    operator mode without shares there is no root token: OpenBao sealed raises `OpenBaoSealed`;
    unsealed, only what the operator token allows is done (`"bootstrap": "skipped"`)."""
    prepared = _prepared(state)
    ports = prepared.ports
    _stack.wait_for_port(HOST, ports.redis, timeout=timeout)
    _stack.wait_for_port(HOST, _stack.relay_port(state), timeout=timeout)
    seal = _stack.seal_for(state, recipient=recipient)
    bao = _stack.open_openbao(state, timeout=timeout, seal=seal)
    if not bao.has_root:
        _resume(state, bao, prepared.users)
        return _with_pending_shares(
            state,
            {
                "initialised_now": False,
                "enrolled": [],
                "worker_enrolment": "unchecked",
                "unseal": seal.mode,
                "bootstrap": "skipped",
            },
        )
    try:
        done = enrol(state, bao)
    finally:
        bao.revoke_root()
    result = {"initialised_now": bao.initialized_now, **done}
    if seal.mode == _stack.OPERATOR_MODE:
        result["unseal"] = seal.mode
    return _with_pending_shares(state, result)


def _with_pending_shares(state: Path, result: dict[str, Any]) -> dict[str, Any]:
    """`result` with the kept block of the first boot's shares under `unseal_shares`, if any."""
    block = pending_shares(state)
    return result if block is None else {**result, "unseal_shares": block}


def enrol(state: Path, bao: _stack.BaoHandle) -> dict[str, Any]:
    """The bootstrap and enrolment of `init`, with the root token of `bao`: OpenBao configured,
    each single-instance service (the API, Flower, and `up`'s own worker) enrolled unless it
    holds a live credential, a live worker enrolment credential kept, and worker replicas whose
    secret_id OpenBao no longer knows (after a restore) left to enrol afresh."""
    prepared = _prepared(state)
    ports, pki, users = prepared.ports, prepared.pki, prepared.users
    _bootstrap(state, bao, pki, _stack.relay_port(state), users)
    enrolled = [
        name
        for name in _single_instance_services(state)
        if _enrol_unless_enrolled(state, name, bao, ports, pki, users)
    ]
    new_enrolment = _stack.ensure_enrolment_credential(
        bao.client(), _stack.enrolment_file(state), users["worker"] if users else None
    )
    _forget_dead_replicas(state, bao)
    return {"enrolled": enrolled, "worker_enrolment": "new" if new_enrolment else "kept"}


def stale_enrolments(state: Path, bao: _stack.BaoHandle) -> list[str]:
    """Which of the single-instance services (and `enrol-worker`) hold no live credential: what
    `enrol` would renew (root token of `bao`)."""
    stale = [
        name
        for name in _single_instance_services(state)
        if not bao.holds_live_credential(name, _service_dir(state, name))
    ]
    if not bao.holds_live_enrolment(_stack.enrolment_file(state)):
        stale.append(_stack.ENROL_ROLE)
    return stale


def _single_instance_services(state: Path) -> tuple[str, ...]:
    """The API and Flower; and the worker when `up` runs it as one instance (`run/worker`)."""
    local_worker = _stack.credential_files(state / "run" / "worker", "worker")[0]
    return ("api", "flower", "worker") if local_worker.is_file() else ("api", "flower")


def _forget_dead_replicas(state: Path, bao: _stack.BaoHandle) -> None:
    """A worker replica's successor secret_id that OpenBao no longer knows is removed, so that
    the replica enrols afresh with the enrolment credential at its next start."""
    replicas = state / "run" / "worker" / "replicas"
    if not replicas.is_dir():
        return
    for directory in replicas.iterdir():
        if directory.is_dir() and not bao.holds_live_credential("worker", directory):
            role_id_file, wrap_file = _stack.credential_files(directory, "worker")
            for path in (role_id_file, wrap_file, successor_file(wrap_file)):
                path.unlink(missing_ok=True)


def _resume(state: Path, bao: _stack.BaoHandle, users: Mapping[str, _stack.RunAs] | None) -> None:
    """What `init` and `up` do without a root token (operator mode): renew the operator's and
    the backup token, export the audit keys, keep the local client and the shared files."""
    _stack.renew_orphan_tokens(bao.addr, state)
    (state / "audit").mkdir(exist_ok=True, mode=0o700)
    export_audit_keys(state, bao.addr, bao.operator_token())
    if not metrics_token_file(state).is_file():
        _stack.write_private(metrics_token_file(state), secrets.token_urlsafe(32).encode())
    _ensure_local_client(state, bao)
    _share_audit_and_metrics(state, users)


def _enrol_unless_enrolled(
    state: Path,
    name: str,
    bao: _stack.BaoHandle,
    ports: Ports,
    pki: _stack.Pki,
    users: Mapping[str, _stack.RunAs] | None,
) -> bool:
    """Enrol one single-instance service afresh unless its directory holds a live credential
    (an unused wrapped secret_id, or the successor its last login left); True when enrolled.
    Enrolling destroys the role's earlier secret_ids first."""
    directory = _service_dir(state, name)
    if bao.holds_live_credential(name, directory):
        return False
    bao.retire_secret_ids(name)
    bao.write_service_credentials(name, directory)
    if users is not None:
        _own_service_files(state, name, ports, pki, users, directory)
    return True


def _bootstrap(
    state: Path,
    bao: _stack.BaoHandle,
    pki: _stack.Pki,
    relay_port: int,
    users: Mapping[str, _stack.RunAs] | None,
) -> None:
    """OpenBao's engines, keys, policies and roles, the leased Redis users, the audit keys, the
    local client, and the audit directory shared (with the root token of `bao`)."""
    _stack.bootstrap(bao)
    _configure_redis_leases(state, bao, pki, relay_port, _stack.load_leased_roles())
    (state / "audit").mkdir(exist_ok=True, mode=0o700)
    export_audit_keys(state, bao.addr, bao.operator_token())
    if not metrics_token_file(state).is_file():
        _stack.write_private(metrics_token_file(state), secrets.token_urlsafe(32).encode())
    # Flower's login lives in OpenBao now (`appliance flower-credentials`); drop the file of
    # older stacks so that no stale password is left lying around.
    (state / "secrets" / "flower.pass").unlink(missing_ok=True)
    _ensure_local_client(state, bao)
    _share_audit_and_metrics(state, users)


def up(
    state: Path,
    requested_ports: dict[str, int] | None = None,
    wait_ready: float = 60.0,
    *,
    recipient: str | None = None,
) -> dict[str, Any]:
    """Start (or complete) the stack and return its status: `prepare`, Redis, its relay and
    OpenBao started here, the bootstrap of `init`, then each service that is not running,
    enrolled afresh.

    `recipient` as for `init` (the status then carries `unseal_shares` while the state keeps
    them). In operator mode
    without shares: OpenBao sealed raises `OpenBaoSealed` (left running, for `appliance
    unseal`); unsealed, no bootstrap runs and each stopped service starts with the credential
    its last run left (`_resume`)."""
    _require_binaries()
    prepared = prepare(state, requested_ports)
    ports, pki, users = prepared.ports, prepared.pki, prepared.users
    leased = _stack.load_leased_roles()
    redis_was_running = _stack.read_pid_file(state / "redis" / "redis.pid") is not None
    redis_user = users["redis"] if users else None
    _stack.start_redis(state, ports.redis, pki, leased=leased, run_as=redis_user)
    relay_port = _stack.start_relay(state, ports.redis, pki, run_as=redis_user)
    bao = _stack.start_openbao(
        state,
        ports.bao,
        run_as=users["openbao"] if users else None,
        seal=_stack.seal_for(state, recipient=recipient),
    )
    if not bao.has_root:
        _resume(state, bao, users)
        for name in SERVICES:
            _start_without_root(state, name, ports, pki, users, bao.addr)
        _wait_ready(state, ports, wait_ready)
        return _with_pending_shares(state, status(state))
    try:
        if bao.initialized_now or not redis_was_running:
            # A new, empty OpenBao has none of the old identities, and a new Redis none of the
            # leased users: services must log in afresh.
            for name in reversed(SERVICES):
                _stack.stop_by_pid_file(_pid_file(state, name))
        _bootstrap(state, bao, pki, relay_port, users)
        for name in SERVICES:
            _start_service(state, name, ports, pki, bao, users)
    finally:
        # The root token served the bootstrap only; the operator token (an orphan) and the
        # services' AppRole tokens are not its children and stay valid.
        bao.revoke_root()
    _wait_ready(state, ports, wait_ready)
    return _with_pending_shares(state, status(state))


def _start_without_root(
    state: Path,
    name: str,
    ports: Ports,
    pki: _stack.Pki,
    users: Mapping[str, _stack.RunAs] | None,
    addr: str,
) -> None:
    """Start a stopped service with the credential its last run (or `init`) left; a worker
    that has none enrols like a replica, with the worker enrolment credential."""
    if _stack.read_pid_file(_pid_file(state, name)) is not None:
        return
    directory = _service_dir(state, name)
    if name == "worker" and not _stack.credential_files(directory, name)[0].is_file():
        enrolment = _stack.enrolment_file(state)
        _as_user(
            users["worker"] if users else None, lambda: _enrol_replica(addr, enrolment, directory)
        )
    _launch(state, name, ports, pki, users)


#: What `appliance serve` runs: the stack's services, each in the foreground.
SERVABLE = ("redis", "relay", "openbao", *SERVICES)


def serve_command(
    state: Path, name: str, overrides: Mapping[str, str] | None = None, replica: str | None = None
) -> Command:
    """How `appliance serve NAME` runs service NAME of a prepared (and, for the API, the worker
    and Flower, initialised) state: the command `up` would start, for `exec_service`. The worker
    enrols itself first when it has no secret_id of its own (`_worker_replica_dir`)."""
    if name not in SERVABLE:
        raise _stack.StackError(f"no service {name!r}; the services are {', '.join(SERVABLE)}")
    prepared = _prepared(state)
    _refuse_off_loopback(state, name, overrides or {})
    ports, pki, users = prepared.ports, prepared.pki, prepared.users
    if name == "redis":
        run_as = users["redis"] if users else None
        argv = _stack.redis_argv(state, ports.redis, pki)
        return Command(argv, dict(_stack.REDIS_ENV), _stack.redis_dir(state), run_as)
    if name == "relay":
        argv = _stack.relay_argv(state, ports.redis, pki)
        run_as = users["redis"] if users else None
        return Command(argv, _stack.relay_env(), state / "redis", run_as)
    if name == "openbao":
        run_as = users["openbao"] if users else None
        argv, env = _stack.openbao_argv(state), _stack.openbao_env(state)
        return Command(argv, env, _stack.data_dir(state).parent, run_as)
    directory = state / "run" / name
    if name != "worker":
        return _service_command(
            state, name, ports, pki, users, directory, overrides, own_files=False
        )
    directory = _worker_replica_dir(state, users, replica or socket.gethostname())
    command = _service_command(
        state, name, ports, pki, users, directory, overrides, own_files=False, replica=replica
    )
    # The worker starts as root, which in a worker container may not enter the worker's own
    # directories (no CAP_DAC_OVERRIDE): it starts in the state directory (searchable) and
    # reads its files only once it is the worker's user.
    return Command(command.argv, command.env, state, command.run_as)


def _refuse_off_loopback(state: Path, name: str, overrides: Mapping[str, str]) -> None:
    """Default deny for site settings that would put a plaintext channel on the network (red
    team L2): OpenBao and Redis are reached on loopback only (the services' tokens are bound
    to 127.0.0.1, and OpenBao's listener is plain HTTP: an AppRole login sent elsewhere would
    cross the network in clear), and the API listens off loopback only over TLS."""
    vault = overrides.get("APPLIANCE_VAULT_ADDR")
    if vault is not None and not _is_loopback(urlsplit(vault).hostname or ""):
        raise _stack.StackError(
            f"APPLIANCE_VAULT_ADDR={vault[:200]!r} is not on loopback: the stack's OpenBao "
            f"listens on {HOST} only, over plain HTTP"
        )
    redis_host = overrides.get("APPLIANCE_REDIS_HOST")
    if redis_host is not None and not _is_loopback(redis_host):
        raise _stack.StackError(
            f"APPLIANCE_REDIS_HOST={redis_host[:200]!r} is not on loopback: the stack's Redis "
            f"listens on {HOST} only"
        )
    api_host = overrides.get("APPLIANCE_API_HOST")
    if (
        name == "api"
        and api_host is not None
        and not _is_loopback(api_host)
        and not load_api_tls(state).enabled
        # The compose stack's pod: a network namespace of its own whose port is published on
        # the host's loopback only. Said explicitly there; a VM seed may not say it.
        and overrides.get("APPLIANCE_API_PLAINTEXT_IN_POD") != "1"
    ):
        raise _stack.StackError(
            f"APPLIANCE_API_HOST={api_host[:200]!r} is off loopback but this stack's API has no "
            "TLS (stack.json api_tls false): set APPLIANCE_API_TLS=1 and run `appliance "
            "prepare`, or keep the API on loopback"
        )


def _is_loopback(host: str) -> bool:
    """Whether `host` is a loopback IP address (a name could resolve anywhere: refused)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _worker_replica_dir(
    state: Path, users: Mapping[str, _stack.RunAs] | None, replica: str
) -> Path:
    """A worker replica's own login directory (`run/worker/replicas/<replica>`, by default the
    host name: a container's id), holding its own successor secret_id, or one it mints now with
    the enrolment credential (as the worker's user: root in a worker container has no
    capability to read or write the worker's files, and needs none)."""
    if not _REPLICA_NAME.fullmatch(replica):
        raise _stack.StackError(
            f"{replica[:80]!r} cannot name a worker replica: letters, digits, '.' and '-', "
            "at most 63, starting with a letter or digit"
        )
    directory = state / "run" / "worker" / "replicas" / replica
    addr = f"http://{HOST}:{load_ports(state).bao}"
    enrolment = _stack.enrolment_file(state)
    _as_user(users["worker"] if users else None, lambda: _enrol_replica(addr, enrolment, directory))
    return directory


def _enrol_replica(addr: str, enrolment: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    role_id_file, wrap_file = _stack.credential_files(directory, "worker")
    successor = successor_file(wrap_file)
    if not successor.is_file():
        VaultSession.enrol(addr, enrolment, role_id_file, successor)


def _as_user(run_as: _stack.RunAs | None, step: Callable[[], None]) -> None:
    """Run `step` as `run_as` in a child process when this one is root (else here), and raise
    what it raised: `EnrolmentLost` again, anything else as StackError."""
    if run_as is None or os.geteuid() != 0:
        step()
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        _run_child_step(run_as, step, write)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0 and not report:
        return
    kind, _, detail = report.partition(":")
    if kind == "enrolment_lost":
        raise EnrolmentLost(detail)
    raise _stack.StackError(f"as {run_as.name}: {detail or 'the step failed'}")


def _run_child_step(run_as: _stack.RunAs, step: Callable[[], None], report: int) -> NoReturn:
    code = 0
    try:
        os.setgroups(list(run_as.groups))
        os.setgid(run_as.gid)
        os.setuid(run_as.uid)
        os.umask(0o077)
        step()
    except EnrolmentLost as exc:
        os.write(report, f"enrolment_lost:{exc.detail}".encode())
        code = 1
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        os.write(report, f"error:{type(exc).__name__}: {exc}".encode())
        code = 1
    finally:
        os._exit(code)


_REPLICA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")


def _configure_redis_leases(
    state: Path, bao: _stack.BaoHandle, pki: _stack.Pki, relay_port: int, leased: tuple[str, ...]
) -> None:
    """The database engine issues the leased roles' Redis users, with the ACL rules of
    `policies/redis-acl.json` as creation statements."""
    policy = _stack.load_acl_policy()
    _stack.configure_redis_leases(
        bao,
        port=relay_port,
        password=_stack.password_file(state, "vault").read_text().strip(),
        ca_pem=pki.ca.read_text(),
        roles={r: _stack.lease_rules(policy[r]) for r in leased},
    )


def export_audit_keys(state: Path, addr: str, token: str) -> None:
    """Write the audit key's public keys beside the log, so `audit verify` works offline."""
    from .audit import AuditPaths, TransitSigner, export_public_keys
    from .vault import Transit

    signer = TransitSigner(Transit(VaultSession(addr, token)))
    target = AuditPaths(audit_log(state)).public_keys
    # Exported in a directory of root's (its writers may have planted a symlink where
    # `export_public_keys` puts its temporary file), then written to a fresh name in the audit
    # directory (mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW, so nothing planted is followed; the sticky
    # directory keeps the writers from replacing it) and renamed over the target there: the
    # audit directory may be a file system of its own (a compose volume), so no rename across.
    with tempfile.TemporaryDirectory(dir=state, prefix=".audit-keys.") as private:
        written = Path(private) / target.name
        export_public_keys(signer, written)
        document = written.read_bytes()
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".audit-pubkeys.", suffix=".tmp")
    try:
        os.write(fd, document)
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(temporary, target)
    except OSError:
        os.unlink(temporary)
        raise


def audit_anchors(state: Path) -> VaultAnchorStore | None:
    """The stack's audit anchors, read with the operator token; None without one (handed to
    the audit commands by `appliance`, so that the audit package never imports the stack)."""
    from .audit import VaultAnchorStore

    token = _stack.operator_token_file(state)
    if not token.is_file():
        return None
    addr = f"http://{HOST}:{load_ports(state).bao}"
    return VaultAnchorStore(VaultSession.from_token_file(addr, token))


def _wait_ready(state: Path, ports: Ports, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for name in SERVICES:
            if _stack.read_pid_file(_pid_file(state, name)) is None:
                log = _service_dir(state, name) / f"{name}.log"
                raise _stack.StackError(f"the {name} exited at start-up; see {log}")
        try:
            resp = httpx.get(
                f"{api_url(state, ports)}/readyz", timeout=2, verify=_served_cert_pin(state)
            )
            if resp.status_code == 200:
                return
            last = resp.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise _stack.StackError(f"the stack did not become ready in {timeout:.0f} s: {last}")


def _served_cert_pin(state: Path) -> ssl.SSLContext | bool:
    """Over TLS, a context that trusts exactly the certificate the API was started with (the
    readiness check reaches it as 127.0.0.1, which an operator's certificate need not name);
    True (unused) over plain HTTP."""
    if not load_api_tls(state).enabled:
        return True
    context = ssl.create_default_context(cafile=str(api_cert_files(state).served()[0]))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # The leaf itself is the anchor.
    context.check_hostname = False  # The pin is the certificate itself, not a name.
    return context


def status(state: Path) -> dict[str, Any]:
    """`appliance status --json`: URLs, audit log, each service's state, the admin's Redis."""
    ports = load_ports(state)
    pki = _stack.Pki(state / "tls")
    pid_files = {
        "redis": state / "redis" / "redis.pid",
        "openbao": state / "bao" / "bao.pid",
        "redis-relay": state / "redis" / "relay.pid",
        **{name: _pid_file(state, name) for name in SERVICES},
    }
    services = {}
    for name, pid_file in pid_files.items():
        pid = _stack.read_pid_file(pid_file) if pid_file.exists() else None
        services[name] = {"state": "running" if pid else "stopped", "pid": pid}
    url = api_url(state, ports)
    return {
        "state_dir": str(state),
        "api_url": url,
        "api_tls": _api_tls_status(state),
        "flower_url": f"http://{HOST}:{ports.flower}",
        # Never the password itself: where it is, and the command that shows it.
        "flower_credentials": {
            "vault_path": "kv/appliance/flower",
            "command": "appliance flower-credentials",
        },
        "vault_addr": f"http://{HOST}:{ports.bao}",
        "audit_log": str(audit_log(state)),
        "metrics": {
            "api": f"{url}/metrics",
            "worker": f"http://{HOST}:{ports.metrics}/metrics",
            "token_file": str(metrics_token_file(state)),
        },
        "services": services,
        "service_users": _service_users_status(state),
        "redis": operator_access(state, HOST, ports.redis, pki),
        "client": {
            "key_id": LOCAL_CLIENT,
            "private_key": str(state / "clients" / f"{LOCAL_CLIENT}.key"),
        },
    }


def _api_tls_status(state: Path) -> dict[str, Any]:
    """Whether the API serves HTTPS, with which certificate, and which CA a client trusts for
    it: the stack's for the generated certificate, None (the system's store) for the
    operator's."""
    if not load_api_tls(state).enabled:
        return {"enabled": False}
    files = api_cert_files(state)
    operator = files.operator_supplied
    return {
        "enabled": True,
        "cert": str(files.served()[0]),
        "operator_supplied": operator,
        "ca": None if operator else str(_stack.Pki(state / "tls").ca),
    }


def _service_users_status(state: Path) -> dict[str, Any]:
    """Whether each service runs as a user of its own, and if not, why (`status --json`)."""
    try:
        recorded: dict[str, Any] = json.loads(_users_file(state).read_text())
    except FileNotFoundError:
        return {"enabled": False, "why": "`appliance up` did not run as root"}
    return recorded


def down(state: Path) -> dict[str, bool]:
    """Stop every service of this stack; which were running."""
    stopped = {}
    for name in reversed(SERVICES):
        stopped[name] = _stack.stop_by_pid_file(_pid_file(state, name))
    stopped["openbao"] = _stack.stop_openbao(state)
    stopped["redis-relay"] = _stack.stop_relay(state)
    stopped["redis"] = _stack.stop_redis(state)
    return stopped
