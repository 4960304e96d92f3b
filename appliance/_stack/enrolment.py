"""The worker enrolment credential (issue 14; SECURITY.md "Service identities and enrolment",
case 2): how a worker replica that no bootstrap enrolled gets an identity of its own.

`appliance init` (the bootstrap, with its root token) keeps one secret_id of the AppRole
`enrol-worker` in a file that only the worker's user may read (0400, never deleted by a reader,
so that a read-only mount works). Its policy (`policies/enrol-worker.hcl`) mints `worker`
secret_ids with metadata and nothing else. `appliance serve worker` logs in with it, mints the
replica's own single-use `worker` secret_id, and revokes the enrolment token at once; from then
on the replica rotates its own secret_ids like any service. The operator sees the credential in
`appliance identities list` and ends new enrolments with `appliance identities destroy
enrol-worker --all` (running workers keep their own identities); the next `init` makes a new one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import hvac

from .pki import write_private
from .procs import StackError
from .users import RunAs

#: The enrolment AppRole, its policy (`policies/enrol-worker.hcl`) and the role it enrols.
ENROL_ROLE = "enrol-worker"
ENROLLED_ROLE = "worker"

#: The enrolment secret_id: good for a month and for this many enrolments, from loopback only;
#: its tokens live minutes (a replica uses one for two calls) and are revoked after use.
ENROLMENT_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "secret_id_ttl": "720h",
        "secret_id_num_uses": 1000,
        "secret_id_bound_cidrs": ["127.0.0.1/32"],
        "token_bound_cidrs": ["127.0.0.1/32"],
        "token_ttl": "2m",
        "token_max_ttl": "5m",
        "token_no_default_policy": True,
    }
)

_APPROLE = "/v1/auth/approle/role"


def enrolment_file(state_dir: Path) -> Path:
    """Where `init` keeps the worker enrolment credential (JSON, 0400, the worker's user)."""
    return state_dir / "secrets" / f"{ENROL_ROLE}.json"


def ensure_enrolment_role(client: hvac.Client) -> None:
    """The AppRole `enrol-worker` with its own policy only (the bootstrap, root token)."""
    client.auth.approle.create_or_update_approle(
        ENROL_ROLE, token_policies=[ENROL_ROLE], mount_point="approle", **ENROLMENT_SETTINGS
    )


def ensure_enrolment_credential(
    client: hvac.Client, path: Path, owner: RunAs | None = None
) -> bool:
    """Keep a live enrolment credential in `path`: the one there if OpenBao still knows its
    secret_id, else a new one. True when a new one was written. `client` has the bootstrap's
    root token."""
    if _live(client, path):
        return False
    role_id = _role_id(client, ENROL_ROLE)
    response = client.adapter.post(
        f"{_APPROLE}/{ENROL_ROLE}/secret-id", json={"metadata": json.dumps({"host": "init"})}
    )
    credential = {
        "role_id": role_id,
        "secret_id": str(response["data"]["secret_id"]),
        "enrols": ENROLLED_ROLE,
        "enrols_role_id": _role_id(client, ENROLLED_ROLE),
    }
    path.unlink(missing_ok=True)
    write_private(path, json.dumps(credential).encode() + b"\n")
    path.chmod(0o400)
    if owner is not None:
        owner.own(path)
    return True


def _live(client: hvac.Client, path: Path) -> bool:
    try:
        secret_id = json.loads(path.read_text())["secret_id"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    try:
        found = client.adapter.post(
            f"{_APPROLE}/{ENROL_ROLE}/secret-id/lookup", json={"secret_id": secret_id}
        )
    except hvac.exceptions.InvalidPath:
        return False  # Destroyed, used up or expired.
    return isinstance(found, dict) and bool(found.get("data"))


def _role_id(client: hvac.Client, role: str) -> str:
    try:
        data = client.auth.approle.read_role_id(role, mount_point="approle")["data"]
    except hvac.exceptions.InvalidPath:
        raise StackError(f"no AppRole {role!r}: the bootstrap did not run") from None
    return str(data["role_id"])
