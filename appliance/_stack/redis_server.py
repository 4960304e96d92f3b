"""A TLS-only `redis-server` for the local stack, with one ACL user per role.

The ACL file is rendered from `policies/redis-acl.json`. Each role gets a random password kept in
`<state>/secrets/redis-<role>.pass` (0600); the ACL file holds only its SHA-256, and the `default`
user is off. Plaintext connections are impossible (`--port 0`) and every client must present a
certificate from the stack's CA.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import redis

from ..settings import Settings
from .pki import Pki, write_file, write_private
from .policy_files import policies_dir
from .procs import StackError, read_pid_file, start_detached, stop_by_pid_file, wait_for_port
from .users import RunAs

HOST = "127.0.0.1"

#: Where the role definitions live (a checkout's `policies/`, or the installed package's).
DEFAULT_ACL_POLICY = policies_dir() / "redis-acl.json"

_TOKEN_PREFIXES = {
    "keys": ("~", "%R~", "%W~", "%RW~"),
    "channels": ("&",),
    "commands": ("+", "-"),
}
_ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MIB = 1024 * 1024


@dataclass(frozen=True)
class RedisHandle:
    """A running stack Redis: where it listens and how each role connects to it."""

    host: str
    port: int
    pid: int
    state_dir: Path
    pki: Pki

    def password_file(self, role: str) -> Path:
        """The file holding `role`'s Redis password."""
        return password_file(self.state_dir, role)

    def client(self, role: str, **kwargs: Any) -> redis.Redis:
        """A redis-py client logged in as `role`, over TLS with `role`'s client certificate."""
        cert, key = self.pki.client(role)
        return redis.Redis(
            host=self.host,
            port=self.port,
            username=role,
            password=self.password_file(role).read_text().strip(),
            ssl=True,
            ssl_ca_certs=str(self.pki.ca),
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
            **kwargs,
        )

    def url(self, role: str, db: int = 0) -> str:
        """A `rediss://` URL for `role` (it embeds the password: never log it)."""
        password = self.password_file(role).read_text().strip()
        return f"rediss://{role}:{password}@{self.host}:{self.port}/{db}"

    def operator_access(self) -> dict[str, Any]:
        """How the operator reaches this Redis as administrator: paths only, never a secret.

        The shape of `redis` in `appliance status --json` (docs/CONTRACT.md, section 3).
        """
        return operator_access(self.state_dir, self.host, self.port, self.pki)

    def stop(self) -> bool:
        """Stop this Redis; True when it was running."""
        return stop_redis(self.state_dir)


def operator_access(state_dir: Path, host: str, port: int, pki: Pki) -> dict[str, Any]:
    """The `redis` object of `appliance status --json`: the admin's TLS files and password file."""
    cert, key = pki.client("admin")
    return {
        "host": host,
        "port": port,
        "tls": {"ca": str(pki.ca), "cert": str(cert), "key": str(key)},
        "username": "admin",
        "password_file": str(password_file(state_dir, "admin")),
    }


def redis_dir(state_dir: Path) -> Path:
    """Redis's working directory (ACL file, log, pid file) inside the stack state."""
    return state_dir / "redis"


def password_file(state_dir: Path, role: str) -> Path:
    """Where `role`'s Redis password is kept."""
    return state_dir / "secrets" / f"redis-{role}.pass"


def start_redis(
    state_dir: Path,
    port: int,
    pki: Pki,
    *,
    acl_policy: Path = DEFAULT_ACL_POLICY,
    leased: tuple[str, ...] = (),
    run_as: RunAs | None = None,
) -> RedisHandle:
    """Start the stack's Redis on `127.0.0.1:port` (TLS only) and wait until it accepts connections.

    Roles in `leased` get their users from OpenBao's database engine: their static users are
    rendered off, without a password. Idempotent: when this state's Redis already runs, its
    handle is returned and `port` is ignored (its memory limit is set again).
    """
    limit = maxmemory()
    running = _running_handle(state_dir, pki)
    if running is not None:
        _limit_memory(running, limit)
        return running
    workdir = prepare_redis(state_dir, port, acl_policy=acl_policy, leased=leased, run_as=run_as)
    pid = start_detached(
        redis_argv(state_dir, port, pki),
        log_file=workdir / "redis.log",
        pid_file=workdir / "redis.pid",
        env=REDIS_ENV,
        cwd=workdir,
        run_as=run_as,
    )
    handle = RedisHandle(HOST, port, pid, state_dir, pki)
    try:
        wait_for_port(HOST, port, pid=pid)
        _check_admin_login(handle)
    except StackError as exc:
        stop_redis(state_dir)
        raise StackError(f"{exc}; see {workdir / 'redis.log'}") from exc
    return handle


#: Redis's whole environment.
REDIS_ENV = MappingProxyType({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def prepare_redis(
    state_dir: Path,
    port: int,
    *,
    acl_policy: Path = DEFAULT_ACL_POLICY,
    leased: tuple[str, ...] = (),
    run_as: RunAs | None = None,
) -> Path:
    """Write what Redis reads at start: its working directory, the ACL file (the roles'
    passwords made on first use and kept) and where it listens. Idempotent; returns the
    working directory."""
    workdir = redis_dir(state_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    acl = render_acl(state_dir, load_acl_policy(acl_policy), leased)
    write_private(workdir / "users.acl", acl.encode())
    # Its directory is Redis's user's: a new file renamed in, never through a planted name.
    write_file(workdir / "endpoint.json", json.dumps({"host": HOST, "port": port}).encode())
    if run_as is not None:
        run_as.own(workdir)
    return workdir


def redis_argv(state_dir: Path, port: int, pki: Pki) -> list[str]:
    """The command line of this state's Redis (TLS only on `port`, the ACL file of
    `prepare_redis`), with the memory limit of `maxmemory`, and an append-only file in its
    directory when `APPLIANCE_REDIS_APPENDONLY` says so."""
    appendonly = Settings().redis_appendonly
    return _argv(_redis_binary(), redis_dir(state_dir), port, pki, maxmemory(), appendonly)


def stop_redis(state_dir: Path) -> bool:
    """Stop this state's Redis if it runs; True when it was running."""
    return stop_by_pid_file(redis_dir(state_dir) / "redis.pid")


def load_acl_policy(path: Path = DEFAULT_ACL_POLICY) -> dict[str, dict[str, list[str]]]:
    """Read and validate the role definitions; raise `ValueError` on anything unexpected.

    Returns, per role, its `keys`, `channels` and `commands` rules, with `$set` references in
    `commands` expanded from the file's `command_sets`.
    """
    raw = json.loads(path.read_text())
    roles = raw.get("roles")
    if not isinstance(roles, dict) or not roles:
        raise ValueError(f"{path}: 'roles' must be a non-empty object")
    if "default" in roles:
        raise ValueError(f"{path}: the 'default' user is always off and cannot be defined")
    command_sets = raw.get("command_sets", {})
    return {name: _validated_role(name, spec, command_sets) for name, spec in roles.items()}


def render_acl(
    state_dir: Path, roles: dict[str, dict[str, list[str]]], leased: tuple[str, ...] = ()
) -> str:
    """The ACL file: `default` off, then one user per role with its password's SHA-256.

    A role's password is created on first use and kept afterwards, so a restart keeps credentials.
    A role in `leased` is rendered `off` with no password: its users come from OpenBao.
    """
    lines = ["user default off resetkeys resetchannels -@all"]
    for role, spec in roles.items():
        if role in leased:
            login = ["off", "resetpass"]
        else:
            digest = hashlib.sha256(_ensure_password(state_dir, role).encode()).hexdigest()
            login = ["on", f"#{digest}"]
        lines.append(f"user {role} " + " ".join(login + lease_rules(spec)))
    return "\n".join(lines) + "\n"


def lease_rules(spec: dict[str, list[str]]) -> list[str]:
    """A role's ACL rules after the login: what the static user gets, and what OpenBao's database
    engine puts in a leased user's creation statements (so both come from the same file)."""
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        *spec["keys"],
        *spec["channels"],
        *spec["commands"],
    ]


def load_leased_roles(path: Path = DEFAULT_ACL_POLICY) -> tuple[str, ...]:
    """The roles whose Redis users come from OpenBao (`leased_roles` in the policy file)."""
    leased = json.loads(path.read_text()).get("leased_roles", [])
    roles = load_acl_policy(path)
    unknown = [r for r in _string_list(leased, "leased_roles") if r not in roles]
    if unknown:
        raise ValueError(f"{path}: leased_roles names unknown roles {unknown}")
    return tuple(leased)


def _validated_role(name: str, spec: Any, command_sets: Any) -> dict[str, list[str]]:
    if not _ROLE_NAME.match(name) or not isinstance(spec, dict):
        raise ValueError(f"bad Redis role {name!r}")
    role: dict[str, list[str]] = {}
    for field, prefixes in _TOKEN_PREFIXES.items():
        tokens = _expand(_string_list(spec.get(field, []), f"role {name!r} {field}"), command_sets)
        for token in tokens:
            if not token.startswith(prefixes) or any(c.isspace() for c in token):
                raise ValueError(f"role {name!r}: bad {field} rule {token!r}")
        role[field] = tokens
    return role


def _expand(tokens: list[str], command_sets: Any) -> list[str]:
    expanded: list[str] = []
    for token in tokens:
        if token.startswith("$"):
            if not isinstance(command_sets, dict) or token[1:] not in command_sets:
                raise ValueError(f"unknown command set {token!r}")
            expanded += _string_list(command_sets[token[1:]], f"command set {token!r}")
        else:
            expanded.append(token)
    return expanded


def _string_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return value


def _ensure_password(state_dir: Path, role: str) -> str:
    path = password_file(state_dir, role)
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    password = secrets.token_urlsafe(32)
    write_private(path, password.encode() + b"\n")
    return password


def _redis_binary() -> str:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        raise StackError("redis-server not found: run `apt-get install -y redis-server` as root")
    return binary


def maxmemory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Redis's memory limit in bytes: `APPLIANCE_REDIS_MAXMEMORY_MB`, else a quarter of the
    host's memory, at least 256 MiB and at most 4 GiB."""
    configured = Settings().redis_maxmemory_mb
    if configured:
        return configured * _MIB
    total_kib = next(
        (
            int(line.split()[1])
            for line in meminfo.read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return min(max(total_kib * 1024 // 4, 256 * _MIB), 4096 * _MIB)


def _limit_memory(handle: RedisHandle, limit: int) -> None:
    """Set the memory limit of a Redis that already runs (an `up` after the setting changed)."""
    try:
        with handle.client("admin", socket_timeout=5) as admin:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", limit)
    except redis.RedisError as exc:
        raise StackError(
            f"cannot set the memory limit of Redis on port {handle.port}: {exc}"
        ) from exc


def _argv(
    binary: str, workdir: Path, port: int, pki: Pki, limit: int, appendonly: bool = False
) -> list[str]:
    return [
        binary,
        "--port", "0",
        "--tls-port", str(port),
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes",
        "--bind", HOST,
        "--protected-mode", "yes",
        "--save", "",
        # APPLIANCE_REDIS_APPENDONLY: an append-only file in `--dir`, fsynced every second.
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        # Past the limit Redis refuses writes (the API answers 503 storage_full, the worker
        # retries); it never evicts: a lost claim, nonce or result would be a replay or a loss.
        "--maxmemory", str(limit),
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--dir", str(workdir),
        "--aclfile", str(workdir / "users.acl"),
        "--logfile", "",
    ]  # fmt: skip


def _check_admin_login(handle: RedisHandle) -> None:
    """A TLS login as `admin` proves the certificates and the ACL file were both accepted."""
    try:
        with handle.client("admin", socket_timeout=5) as admin:
            admin.ping()
    except redis.RedisError as exc:
        raise StackError(f"Redis on port {handle.port} refused the admin login: {exc}") from exc


def _running_handle(state_dir: Path, pki: Pki) -> RedisHandle | None:
    pid = read_pid_file(redis_dir(state_dir) / "redis.pid")
    if pid is None:
        return None
    endpoint = json.loads((redis_dir(state_dir) / "endpoint.json").read_text())
    return RedisHandle(endpoint["host"], int(endpoint["port"]), pid, state_dir, pki)
