"""`appliance identities list|destroy`: the services' secret_ids (SECURITY.md, "Service
identities"). The operator sees and destroys them; it never mints one."""

from __future__ import annotations

import json

import click

from .. import stack
from ..errors import ApplianceError, NotFound
from ..identities import IDENTITY_ROLES, destroy_secret_id, list_secret_ids, revoke_tokens
from ..vault import VaultSession
from ._common import _fail, _require_stack, _state, _state_option


@click.group()
def identities() -> None:
    """See and destroy the services' OpenBao secret_ids (their AppRole identities)."""


@identities.command("list")
@_state_option
@click.option("--role", "roles", multiple=True, type=click.Choice(IDENTITY_ROLES))
@click.option("--json", "as_json", is_flag=True, help="print one JSON array")
@click.pass_context
def identities_list(ctx: click.Context, roles: tuple[str, ...], as_json: bool) -> None:
    """List every live secret_id of the service roles: one per running service is normal, and
    one of `enrol-worker` (the worker replicas' enrolment credential) after `appliance init`."""
    session = _operator_session(ctx)
    try:
        found = list_secret_ids(session, roles or IDENTITY_ROLES)
    except ApplianceError as exc:
        _fail(exc.detail, 1)
    if as_json:
        click.echo(json.dumps([info.as_json() for info in found]))
        return
    for info in found:
        click.echo(
            f"{info.role:<12} {info.accessor}  host {info.host or '?'} pid {info.pid or '?'}  "
            f"expires {info.expires}  uses left {info.uses_left}"
        )


@identities.command("destroy")
@_state_option
@click.argument("role", type=click.Choice(IDENTITY_ROLES))
@click.argument("accessors", nargs=-1)
@click.option("--all", "every", is_flag=True, help="every secret_id of ROLE")
@click.pass_context
def identities_destroy(
    ctx: click.Context, role: str, accessors: tuple[str, ...], every: bool
) -> None:
    """Destroy secret_ids of ROLE by accessor, or with `--all` every secret_id and every token of
    ROLE: nothing of that identity works any more, the running service included, until
    `appliance down` and `appliance up` enrol it again."""
    if every == bool(accessors):
        _fail("name the accessors to destroy, or give --all (not both)")
    session = _operator_session(ctx)
    try:
        # --all: the role's tokens first (a live token mints new secret_ids), then its
        # secret_ids, then both again for what was minted in between.
        rounds = 2 if every else 1
        targets: list[str] = []
        for _ in range(rounds):
            if every:
                revoke_tokens(session, role)
            batch = (
                [info.accessor for info in list_secret_ids(session, (role,))]
                if every
                else list(accessors)
            )
            for accessor in batch:
                destroy_secret_id(session, role, accessor)
            targets += batch
    except NotFound as exc:
        _fail(exc.detail)
    except ApplianceError as exc:
        _fail(exc.detail, 1)
    click.echo(f"destroyed {len(targets)} secret_id(s) of {role}")


def _operator_session(ctx: click.Context) -> VaultSession:
    _require_stack(ctx)
    return stack.operator_session(_state(ctx))
