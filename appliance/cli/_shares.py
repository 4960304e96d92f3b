"""`appliance shares show` and `shares ack`: the encrypted unseal shares of a first boot (red
team M4), and how `init` and `up` print them.

Operator mode's initialisation writes its block (age ciphertext to the operator's recipient,
never the plaintext shares) to `<state>/unseal-shares.age` before anything else can fail.
`init` and `up` print it whenever the file exists, on their failure paths too (an error, or
the SIGTERM of a unit's stop timeout, which `main` turns into `SystemExit`), so that the only
copy of the shares is never lost with a process. The operator deletes it with `shares ack`
once they have saved it elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from .._stack.seal import forget_pending_shares, pending_shares, pending_shares_file
from ._common import _fail, _state, _state_option


class PendingShares:
    """Prints the kept block of a state at most once per command."""

    def __init__(self, state: Path) -> None:
        self._state = state
        self._printed = False

    def print_now(self) -> None:
        """Print the block to stdout if the state keeps one and it was not printed yet."""
        if self._printed:
            return
        try:
            block = pending_shares(self._state)
        except OSError:
            return  # Unreadable here: `appliance shares show` (as root) says why.
        if block is not None:
            click.echo(block, nl=False)
            self._printed = True


@contextmanager
def printing_pending_shares(state: Path) -> Iterator[PendingShares]:
    """Around `init` and `up`: the block is printed on the way out, whatever happened, unless
    the command printed it already (`print_now`)."""
    pending = PendingShares(state)
    try:
        yield pending
    finally:
        pending.print_now()


@click.group()
def shares() -> None:
    """The encrypted unseal shares of a first boot (operator mode), kept until acknowledged."""


@shares.command()
@_state_option
@click.pass_context
def show(ctx: click.Context) -> None:
    """Print the block (age ciphertext to the operator's recipient), as `init` printed it."""
    block = pending_shares(_state(ctx))
    if block is None:
        _fail(f"no unseal shares are kept in {_state(ctx)}: they were acknowledged, or never kept")
    click.echo(block, nl=False)


@shares.command()
@_state_option
@click.option("--yes", is_flag=True, help="do not ask: the block is saved elsewhere")
@click.pass_context
def ack(ctx: click.Context, yes: bool) -> None:
    """Delete the kept block once it is saved elsewhere (and decrypts with your identity):
    after this, this machine holds no copy of the unseal shares, in any form."""
    state = _state(ctx)
    if pending_shares(state) is None:
        _fail(f"no unseal shares are kept in {state}: nothing to acknowledge")
    if not yes and not click.confirm(
        f"Delete {pending_shares_file(state)}? Only if you saved the block and it decrypts"
    ):
        _fail("not acknowledged: the block is kept", 1)
    forget_pending_shares(state)
    click.echo(f"deleted {pending_shares_file(state)}")
