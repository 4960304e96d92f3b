"""`appliance up`, `status`, `down`, `keygen` and `flower-credentials`: the local stack."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import stack
from .._stack import StackError, operator_token_file
from ..errors import ApplianceError
from ._common import _fail, _require_stack, _state, _state_option
from ._day2 import read_recipient_option, shares_to_option
from ._shares import printing_pending_shares


@click.command()
@_state_option
@click.option("--api-port", type=int, default=None, help="API port (0: any free port)")
@click.option("--flower-port", type=int, default=None, help="Flower port (0: any free port)")
@click.option("--redis-port", type=int, default=None, help="Redis port (0: any free port)")
@click.option("--bao-port", type=int, default=None, help="OpenBao port (0: any free port)")
@click.option(
    "--metrics-port", type=int, default=None, help="the worker's metrics port (0: any free port)"
)
@shares_to_option
@click.pass_context
def up(ctx: click.Context, /, shares_to: Path | None, **ports: int | None) -> None:
    """Start the whole local stack (idempotent) and print its URLs."""
    requested = {k.removesuffix("_port"): v for k, v in ports.items() if v is not None}
    recipient = read_recipient_option(shares_to)
    # The first boot's encrypted shares are printed even when `up` fails or is stopped.
    with printing_pending_shares(_state(ctx)) as pending:
        try:
            st = stack.up(_state(ctx), requested, recipient=recipient)
        except StackError as exc:
            _fail(str(exc), 1)
        pending.print_now()
        click.echo(f"API     {st['api_url']}")
        click.echo(f"Flower  {st['flower_url']}  (read-only; login: appliance flower-credentials)")
        click.echo(f"Audit   {st['audit_log']}")
        click.echo(f"Client  key id {st['client']['key_id']}, key {st['client']['private_key']}")


@click.command()
@_state_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the stack's services and URLs."""
    if not (_state(ctx) / "stack.json").is_file():
        _fail(f"no stack in {_state(ctx)}: run `appliance up` first")
    st = stack.status(_state(ctx))
    if as_json:
        click.echo(json.dumps(st))
        return
    for name, svc in st["services"].items():
        click.echo(f"{name:<8} {svc['state']:<8} {svc['pid'] or ''}")
    click.echo(f"API {st['api_url']}  Flower {st['flower_url']}")


@click.command()
@_state_option
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop every service of the stack."""
    for name, was_running in stack.down(_state(ctx)).items():
        click.echo(f"{name:<8} {'stopped' if was_running else 'not running'}")


@click.command()
@click.argument("keyid")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True)
def keygen(keyid: str, out: str) -> None:
    """Write an Ed25519 client key pair (PEM): KEYID.key and KEYID.pub."""
    from ..registry import validate_keyid

    try:
        validate_keyid(keyid)
    except ApplianceError as exc:
        _fail(exc.detail)
    private, public = stack.write_keypair(Path(out), keyid)
    click.echo(f"private key {private}\npublic key  {public}")


@click.command("flower-credentials")
@_state_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def flower_credentials(ctx: click.Context, as_json: bool) -> None:
    """Show Flower's URL and login, read from OpenBao with the operator token.

    The password goes to this terminal only: the stack writes it to no file and no log.
    """
    from ..vault import VaultSession, read_flower_credential

    st = _require_stack(ctx)
    session = VaultSession.from_token_file(st["vault_addr"], operator_token_file(_state(ctx)))
    try:
        credential = read_flower_credential(session)
    except ApplianceError as exc:
        _fail(f"cannot read Flower's login from OpenBao: {exc.detail}", 1)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "url": st["flower_url"],
                    "username": credential.username,
                    "password": credential.password,
                }
            )
        )
        return
    click.echo(
        f"url      {st['flower_url']}\nusername {credential.username}\n"
        f"password {credential.password}"
    )
