"""`appliance prepare`, `init` and `serve SERVICE`: the stack as separate services (issue 14).

A container engine (or the VM's systemd) runs them in this order: `prepare` once (files only),
`serve redis`, `serve relay` and `serve openbao`, then `init` once (the bootstrap), then `serve
worker` (any number of replicas), `serve api` and `serve flower`. `appliance up` is the same
parts on one host, each service started in the background.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import stack
from .._stack import StackError, exec_service
from ..vault import EnrolmentLost
from ._common import _fail, _state, _state_option
from ._day2 import read_recipient_option, shares_to_option
from ._shares import printing_pending_shares

F = TypeVar("F", bound=Callable[..., Any])


def _port_options(fn: Any) -> Any:
    for name, help_text in reversed(
        (
            ("api", "API port"),
            ("flower", "Flower port"),
            ("redis", "Redis port"),
            ("bao", "OpenBao port"),
            ("metrics", "the worker's metrics port"),
        )
    ):
        fn = click.option(
            f"--{name}-port", type=int, default=None, help=f"{help_text} (0: any free port)"
        )(fn)
    return fn


def _export_option(services: tuple[str, ...]) -> Callable[[F], F]:
    return click.option(
        "--export",
        "export",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=(
            f"also write DIR/SERVICE/tls and DIR/SERVICE/secrets for {', '.join(services)}: only "
            "that service's own files, for a container engine to mount in its container alone"
        ),
    )


@click.command()
@_state_option
@_port_options
@_export_option(stack.EXPORTED_BY_PREPARE)
@click.pass_context
def prepare(ctx: click.Context, /, export: Path | None, **ports: int | None) -> None:
    """Write the stack's files (PKI, Redis ACL, OpenBao configuration); idempotent, no network.

    The ports are recorded on the first run and kept after that.
    """
    requested = {k.removesuffix("_port"): v for k, v in ports.items() if v is not None}
    if any(port is not None and not 0 <= port <= 65535 for port in requested.values()):
        _fail("a port is a number from 0 to 65535")
    try:
        prepared = stack.prepare(_state(ctx), requested)
        if export is not None:
            stack.export_service_files(_state(ctx), stack.EXPORTED_BY_PREPARE, export)
    except StackError as exc:
        _fail(str(exc), 1)
    click.echo(json.dumps({"state_dir": str(_state(ctx)), "ports": vars(prepared.ports)}))


@click.command()
@_state_option
@click.option("--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True)
@_export_option(stack.EXPORTED_BY_INIT)
@shares_to_option
@click.pass_context
def init(ctx: click.Context, timeout: float, export: Path | None, shares_to: Path | None) -> None:
    """Bootstrap a prepared stack whose Redis, relay and OpenBao run; idempotent.

    Initialises or unseals OpenBao, configures it from the packaged policies, enrols the API and
    Flower (unless their credentials are still good), keeps the worker enrolment credential,
    and revokes the root token. With --shares-to, a new OpenBao's unseal shares are printed
    encrypted to the operator (`appliance unseal` opens it); the plaintext is stored nowhere,
    the ciphertext in <state>/unseal-shares.age until `appliance shares ack`.
    """
    if not (_state(ctx) / "stack.json").is_file():
        _fail(f"no prepared stack in {_state(ctx)}: run `appliance prepare` first")
    recipient = read_recipient_option(shares_to)
    # The first boot's encrypted shares are printed (after the JSON) whenever the state keeps
    # them, also when `init` fails or is stopped (red team M4).
    with printing_pending_shares(_state(ctx)):
        try:
            done = stack.init(_state(ctx), timeout, recipient=recipient)
            if export is not None:
                stack.export_service_files(_state(ctx), stack.EXPORTED_BY_INIT, export)
        except StackError as exc:
            _fail(str(exc), 1)
        done.pop("unseal_shares", None)
        click.echo(json.dumps(done))


@click.command()
@_state_option
@click.argument("service", type=click.Choice(stack.SERVABLE))
@click.option(
    "--replica",
    default=None,
    help="the worker replica's name (its login directory); default: the host name",
)
@click.pass_context
def serve(ctx: click.Context, service: str, replica: str | None) -> None:
    """Run one service of a prepared stack in the foreground (it replaces this process).

    As root, the service runs as its own user (the worker drops to it itself, after starting
    its sandbox launcher). The caller's APPLIANCE_* settings are passed on, except the
    service's credentials. A worker without a secret_id of its own enrols first.
    """
    overrides = {
        k: v for k, v in os.environ.items() if k.startswith("APPLIANCE_") and k != "APPLIANCE_STATE"
    }
    state = _state(ctx)
    if not (state / "stack.json").is_file():
        _fail(f"no prepared stack in {state}: run `appliance prepare` first")
    if replica is not None and service != "worker":
        _fail("--replica names a worker replica only")
    try:
        command = stack.serve_command(state, service, overrides, replica)
    except EnrolmentLost as exc:
        _fail(f"the worker cannot enrol: {exc.detail}", 1)
    except StackError as exc:
        _fail(str(exc))
    exec_service(command.argv, env=command.env, cwd=command.cwd, run_as=command.run_as)
