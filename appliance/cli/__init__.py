"""The `appliance` command (docs/CONTRACT.md §3). Usage errors exit 2 with a message; nothing
runs.

One module per group of commands: `_stack_commands` (the local stack), `_deploy` (the stack
as separate services: prepare, init, serve), `_clients` (the
registry), `_identities` (the services' secret_ids), `_keys` (transit keys), `_jobs` (signed
requests to the API), `_api_cert` (the API's TLS certificate); the audit commands come from
`appliance.audit`.
"""

from __future__ import annotations

import os

import click

from .. import stack
from ..audit import audit_cli
from . import _api_cert, _clients, _day2, _deploy, _identities, _jobs, _keys, _stack_commands
from ._jobs import SignedClient

__all__ = ["SignedClient", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state",
    "state",
    # Search-only (0711) for the services' users: never listed, so not `readable`.
    type=click.Path(file_okay=False, readable=False),
    default=lambda: os.environ.get("APPLIANCE_STATE", ".appliance"),
    show_default=".appliance or $APPLIANCE_STATE",
    help="the stack's state directory",
)
@click.pass_context
def main(ctx: click.Context, state: str) -> None:
    """Run signed Python jobs in a hardened sandbox."""
    ctx.ensure_object(dict)
    ctx.obj.setdefault("state", state)
    # The audit commands find a stack's anchors through this (they do not import the stack).
    ctx.obj.setdefault("audit_anchors", stack.audit_anchors)


for _command in (
    _stack_commands.up,
    _stack_commands.status,
    _stack_commands.down,
    _deploy.prepare,
    _deploy.init,
    _deploy.serve,
    _day2.unseal,
    _day2.backup,
    _day2.restore,
    _day2.upgrade,
    _stack_commands.keygen,
    _stack_commands.flower_credentials,
    _clients.clients,
    _identities.identities,
    _keys.keys,
    _jobs.submit,
    _jobs.workflow,
    _jobs.result,
    _jobs.revoke,
    _api_cert.api_cert,
):
    main.add_command(_command)
main.add_command(audit_cli, "audit")
