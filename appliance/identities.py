"""Service identities as the operator sees them: the secret_ids of each service's AppRole.

Only the bootstrap (a root token inside `appliance up` or `appliance init`) enrols a service,
with a wrapped, single-use, expiring secret_id; at each login the service mints its own
successor. Worker replicas enrol themselves once with the enrolment credential `init` keeps for
the worker (role `enrol-worker`, listed and destroyed here too: destroying it stops new
replicas, not running ones). The operator
may see them (accessor, where the service ran, when it expires, uses left) and destroy them,
never read a role_id or mint one (`policies/operator.hcl`): it cannot become a service. A role
normally holds one live secret_id per running instance; more is a sign that someone minted with
a service's token. SECURITY.md, "Service identities".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ._stack.enrolment import ENROL_ROLE
from ._stack.openbao import APPROLE_MOUNT, SERVICE_ROLES, revoke_role_tokens
from .errors import NotFound
from .vault import VaultSession

__all__ = [
    "IDENTITY_ROLES",
    "SERVICE_ROLES",
    "SecretIdInfo",
    "destroy_secret_id",
    "list_secret_ids",
    "revoke_tokens",
]

#: The roles whose secret_ids the operator sees and destroys: the services', and the worker
#: enrolment credential's (destroying it stops new worker replicas, not running ones).
IDENTITY_ROLES: tuple[str, ...] = (*SERVICE_ROLES, ENROL_ROLE)


_ACCESSOR = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class SecretIdInfo:
    """One secret_id of a service role, as its accessor shows it (never the secret_id)."""

    role: str
    accessor: str
    host: str
    pid: str
    created: str
    expires: str
    uses_left: int

    def as_json(self) -> dict[str, str | int]:
        """The record `appliance identities list --json` prints."""
        return {
            "role": self.role,
            "accessor": self.accessor,
            "host": self.host,
            "pid": self.pid,
            "created": self.created,
            "expires": self.expires,
            "uses_left": self.uses_left,
        }


def list_secret_ids(
    session: VaultSession, roles: Iterable[str] = IDENTITY_ROLES
) -> list[SecretIdInfo]:
    """Every live secret_id of the given roles (by default every service's and the enrolment
    role's)."""
    found = []
    for role in roles:
        _check_role(role)
        for accessor in _accessors(session, role):
            try:
                found.append(_lookup(session, role, accessor))
            except NotFound:
                continue  # Used or expired between the list and the lookup.
    return found


def revoke_tokens(session: VaultSession, role: str) -> int:
    """Revoke every token a login of `role` issued; how many. The service stops working until it
    is enrolled again (`appliance down`, then `appliance up`)."""
    _check_role(role)
    return session.call(lambda client: revoke_role_tokens(client, role))


def destroy_secret_id(session: VaultSession, role: str, accessor: str) -> None:
    """Destroy one secret_id of `role` by its accessor; NotFound when it does not exist or is
    not an accessor at all.

    Tokens already issued with it live on: `revoke_tokens` ends them (`identities destroy --all`).
    """
    _check_role(role)
    if not _ACCESSOR.fullmatch(accessor):
        raise NotFound(f"{accessor!r} is not a secret_id accessor (a UUID)")
    _lookup(session, role, accessor)
    session.call(
        lambda client: client.adapter.post(
            f"/v1/auth/{APPROLE_MOUNT}/role/{role}/secret-id-accessor/destroy",
            json={"secret_id_accessor": accessor},
        )
    )


def _accessors(session: VaultSession, role: str) -> list[str]:
    try:
        listed = session.call(
            lambda client: client.adapter.list(f"/v1/auth/{APPROLE_MOUNT}/role/{role}/secret-id")
        )
    except NotFound:
        return []  # No secret_id at all.
    return [str(key) for key in listed["data"]["keys"]]


def _lookup(session: VaultSession, role: str, accessor: str) -> SecretIdInfo:
    response = session.call(
        lambda client: client.adapter.post(
            f"/v1/auth/{APPROLE_MOUNT}/role/{role}/secret-id-accessor/lookup",
            json={"secret_id_accessor": accessor},
        )
    )
    data = response.get("data") if isinstance(response, dict) else None
    if not data:
        raise NotFound(f"no secret_id with accessor {accessor} for role {role}")
    metadata = data.get("metadata") or {}
    return SecretIdInfo(
        role=role,
        accessor=accessor,
        host=str(metadata.get("host", "")),
        pid=str(metadata.get("pid", "")),
        created=str(data.get("creation_time", "")),
        expires=str(data.get("expiration_time", "")),
        uses_left=int(data.get("secret_id_num_uses", 0)),
    )


def _check_role(role: str) -> None:
    if role not in IDENTITY_ROLES:
        raise NotFound(f"no service role {role!r}; the roles are {', '.join(IDENTITY_ROLES)}")
