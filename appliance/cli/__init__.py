"""The `appliance` command (docs/CONTRACT.md §3). Usage errors exit 2 with a message; nothing
runs.

One module per group of commands: `_stack_commands` (the local stack), `_deploy` (the stack
as separate services: prepare, init, serve), `_clients` (the
registry), `_identities` (the services' secret_ids), `_keys` (transit keys), `_jobs` (signed
requests to the API), `_api_cert` (the API's TLS certificate); the audit commands come from
`appliance.audit`; `_shares` (the first boot's encrypted unseal shares).

A SIGTERM (a unit's stop, or its start timeout) raises `SystemExit` in the command, so that its
`finally` blocks run: the first boot's shares get printed and its root token revoked (red team
M4) instead of the process dying between two steps.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import click

from .. import stack
from ..audit import audit_cli
from . import (
    _api_cert,
    _clients,
    _day2,
    _deploy,
    _identities,
    _jobs,
    _keys,
    _shares,
    _stack_commands,
)
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
    _exit_on_sigterm(ctx)
    ctx.ensure_object(dict)
    ctx.obj.setdefault("state", state)
    # The audit commands find a stack's anchors through this (they do not import the stack).
    ctx.obj.setdefault("audit_anchors", stack.audit_anchors)


#: 128 + SIGTERM, the code a shell reports for a process that SIGTERM ended.
_SIGTERM_EXIT = 128 + signal.SIGTERM


def _exit_on_sigterm(ctx: click.Context) -> None:
    """Turn SIGTERM into `SystemExit(143)` for this command (its previous handler back when
    it ends: the CLI may run inside another program, e.g. a test). Only the main thread may
    set a handler; elsewhere the caller's stays."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        # Once: a second SIGTERM must not cut the `finally` blocks the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(_SIGTERM_EXIT)

    signal.signal(signal.SIGTERM, stop)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


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
    _shares.shares,
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
