"""OpenBao's side of a backup (issue 15, red-team findings M1 and M2): which cluster a backup
belongs to, the transit key that signs its manifest, and the restore of a raft snapshot.

- The cluster's identity is `cluster_id` of `sys/health` (unauthenticated; present once
  OpenBao is unsealed). A snapshot of another cluster is refused before anything is stopped:
  forced into this one it would leave OpenBao sealed under the other cluster's keys.
- The manifest is signed with the transit key `backup` (Ed25519), which the backup token
  creates on first use (`policies/backup.hcl`: create and read that key, sign with it,
  nothing else). A key of its own, not `audit` or `task-messages`: a token that may sign any
  message with the audit key could forge audit checkpoints. The signature is checked at
  restore against the key's public halves, read from this OpenBao: an archive built by
  anyone who only holds the operator's age recipient carries no valid signature.
- The restore uses `sys/storage/raft/snapshot` (not `snapshot-force`), with a root token:
  OpenBao itself refuses a snapshot whose keyring is not this cluster's.

Every hvac error is translated here (`StackError`), never shown as a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hvac
import requests

from ..errors import ApplianceError
from ..vault import Transit, VaultSession
from .procs import StackError

#: The transit key that signs backup manifests.
BACKUP_KEY = "backup"


class BackupRefused(StackError):
    """Raised when OpenBao refuses a step of a backup or a restore (the reason says which)."""

    code, title = "backup_refused", "Backup or restore refused"


@contextmanager
def openbao_refusals(step: str) -> Iterator[None]:
    """Around a whole day-2 step: any hvac error left untranslated by its parts becomes a
    `StackError` naming the step, never a traceback (hvac is reached from here only)."""
    try:
        yield
    except hvac.exceptions.VaultError as exc:
        raise StackError(f"OpenBao refused a step of the {step}: {exc}") from exc


def cluster_id(addr: str) -> str:
    """This OpenBao's cluster id (`sys/health`). Raises `BackupRefused` when it has none
    (sealed, uninitialised) or does not answer."""
    try:
        health: Any = hvac.Client(url=addr, timeout=10).sys.read_health_status(
            method="GET", standby_ok=True, sealed_code=200, uninit_code=200
        )
    except (hvac.exceptions.VaultError, requests.RequestException) as exc:
        raise BackupRefused(f"OpenBao at {addr} does not answer its health check: {exc}") from exc
    found = health.get("cluster_id") if isinstance(health, dict) else None
    if not isinstance(found, str) or not found:
        raise BackupRefused(f"OpenBao at {addr} gives no cluster id (sealed or uninitialised)")
    return found


def sign_manifest(addr: str, token: str, manifest: bytes) -> str:
    """Transit's signature of `manifest` with the key `backup`, created on first use."""
    client = hvac.Client(url=addr, token=token, timeout=10)
    try:
        try:
            client.secrets.transit.read_key(name=BACKUP_KEY)
        except hvac.exceptions.InvalidPath:
            client.secrets.transit.create_key(name=BACKUP_KEY, key_type="ed25519")
        return Transit(VaultSession(addr, token)).sign(BACKUP_KEY, manifest)
    except (hvac.exceptions.VaultError, ApplianceError) as exc:
        raise BackupRefused(
            f"OpenBao refused to sign the backup's manifest (transit key {BACKUP_KEY!r}): "
            f"{_detail(exc)}; run `appliance init` (or `unseal --reenrol`) with this version "
            "to load policies/backup.hcl"
        ) from exc


def verify_manifest(addr: str, token: str, manifest: bytes, signature: str) -> None:
    """Return when `signature` is the key `backup`'s signature of `manifest` in this OpenBao;
    raise `BackupRefused` otherwise."""
    try:
        Transit(VaultSession(addr, token)).verify_signature(BACKUP_KEY, manifest, signature)
    except (hvac.exceptions.VaultError, ApplianceError) as exc:
        raise BackupRefused(
            "the backup's manifest is not signed by this appliance's backup key (made by "
            f"another appliance, or forged): {_detail(exc)}"
        ) from exc


def restore_snapshot(addr: str, root_token: str, snapshot: bytes) -> None:
    """Restore a raft snapshot of this cluster (root token; OpenBao checks its keyring)."""
    client = hvac.Client(url=addr, token=root_token, timeout=120)
    try:
        client.adapter.post("/v1/sys/storage/raft/snapshot", data=snapshot)
    except (hvac.exceptions.VaultError, requests.RequestException) as exc:
        raise BackupRefused(f"OpenBao refused the raft snapshot: {_detail(exc)}") from exc


def _detail(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)
    return str(detail if isinstance(detail, str) else exc).strip() or type(exc).__name__
