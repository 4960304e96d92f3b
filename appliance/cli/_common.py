"""What every `appliance` command shares: usage errors, the state directory, the stack."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from .. import stack

EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"appliance: error: {message}", err=True)
    sys.exit(code)


def _state(ctx: click.Context) -> Path:
    return Path(ctx.obj["state"]).resolve()


def _state_option(fn: Any) -> Any:
    """Let every subcommand take --state too (`appliance up --state DIR`)."""

    def remember(ctx: click.Context, _param: Any, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(dict)["state"] = value

    return click.option(
        "--state",
        # Search-only (0711) for the services' users: never listed, so not `readable`.
        type=click.Path(file_okay=False, readable=False),
        expose_value=False,
        callback=remember,
        help="the stack's state directory",
    )(fn)


def _require_stack(ctx: click.Context) -> dict[str, Any]:
    if not (_state(ctx) / "stack.json").is_file():
        _fail(f"no stack in {_state(ctx)}: run `appliance up` first")
    return stack.status(_state(ctx))
