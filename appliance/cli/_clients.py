"""`appliance clients add|disable|enable|list`: the client registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .. import stack
from ..errors import ApplianceError
from ..registry import InvalidRegistryEntry, Registry
from ._common import _fail, _require_stack, _state, _state_option


@click.group()
def clients() -> None:
    """Manage the client registry (in OpenBao)."""


@clients.command("add")
@_state_option
@click.argument("keyid")
@click.option("--public-key", type=click.Path(dir_okay=False, exists=True), required=True)
@click.option("--allow-function", "functions", multiple=True, help="glob of callable functions")
@click.option("--allow-secret", "secrets", multiple=True, help="glob of readable secret paths")
@click.option("--allow-import", "imports", multiple=True, help="module the client may import")
@click.option(
    "--rate-per-minute",
    type=click.IntRange(min=1),
    default=120,
    show_default=True,
    help="jobs the client may submit per minute (a workflow step counts as one)",
)
@click.option(
    "--daily-quota",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="jobs per UTC day (0: no daily quota)",
)
@click.option(
    "--storage-bytes",
    type=click.IntRange(min=0),
    default=64 * 1024 * 1024,
    show_default=True,
    help="bytes of sealed results the client may keep stored before submissions get 429",
)
@click.pass_context
def clients_add(
    ctx: click.Context,
    keyid: str,
    public_key: str,
    functions: tuple[str, ...],
    secrets: tuple[str, ...],
    imports: tuple[str, ...],
    rate_per_minute: int,
    daily_quota: int,
    storage_bytes: int,
) -> None:
    """Register (or replace) a client with its public key and what it may do.

    Secret globs match segment by segment: `*` never crosses a `/`; a whole segment `**`
    matches one or more segments (`team-a/**`)."""
    import dataclasses

    from ..registry import make_client

    try:
        client = make_client(keyid, Path(public_key).read_text(), functions, secrets, imports)
        client = dataclasses.replace(
            client,
            rate_per_minute=rate_per_minute,
            daily_quota=daily_quota,
            storage_bytes=storage_bytes,
        )
    except (ApplianceError, ValueError) as exc:
        _fail(f"cannot register {keyid}: {exc}")
    _require_stack(ctx)
    try:
        stack.operator_registry(_state(ctx)).put(client)
    except ApplianceError as exc:
        _fail(exc.detail, 1)
    click.echo(
        f"registered {keyid}: functions {list(functions) or 'none'}, "
        f"secrets {list(secrets) or 'none'}"
    )


@clients.command("disable")
@_state_option
@click.argument("keyid")
@click.pass_context
def clients_disable(ctx: click.Context, keyid: str) -> None:
    """Disable a client: from when this returns, every API process refuses its key (401)."""
    _set_enabled(ctx, keyid, enabled=False)


@clients.command("enable")
@_state_option
@click.argument("keyid")
@click.pass_context
def clients_enable(ctx: click.Context, keyid: str) -> None:
    """Enable a disabled client again, with the policy it had."""
    _set_enabled(ctx, keyid, enabled=True)


def _set_enabled(ctx: click.Context, keyid: str, enabled: bool) -> None:
    from ..errors import NotFound
    from ..registry import validate_keyid

    try:
        validate_keyid(keyid)
    except ApplianceError as exc:
        _fail(exc.detail)
    _require_stack(ctx)
    try:
        stack.operator_registry(_state(ctx)).set_enabled(keyid, enabled)
    except NotFound as exc:
        _fail(exc.detail)
    except ApplianceError as exc:
        _fail(exc.detail, 1)
    click.echo(f"{'enabled' if enabled else 'disabled'} {keyid}")


@clients.command("list")
@_state_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON array")
@click.pass_context
def clients_list(ctx: click.Context, as_json: bool) -> None:
    """List the registered clients, enabled or not, with their policies; an entry that does not
    parse (edited by hand) is listed as invalid, with why: the API refuses its key id."""
    _require_stack(ctx)
    registry = stack.operator_registry(_state(ctx))
    try:
        rows = [_row(registry, keyid) for keyid in registry.keyids()]
    except ApplianceError as exc:
        _fail(exc.detail, 1)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        if "invalid" in row:
            click.echo(f"{row['key_id']:<24} {'INVALID':<9} {row['invalid']}")
            continue
        click.echo(
            f"{row['key_id']:<24} {'enabled' if row['enabled'] else 'DISABLED':<9} "
            f"functions {row['allowed_functions'] or 'none'} "
            f"secrets {row['allowed_secrets'] or 'none'} "
            f"key {row['public_key_sha256'][:16]}"
        )


def _row(registry: Registry, keyid: str) -> dict[str, Any]:
    try:
        c = registry.read(keyid)
    except InvalidRegistryEntry as exc:
        return {"key_id": keyid, "enabled": False, "invalid": exc.detail}
    return {
        "key_id": c.keyid,
        "enabled": c.enabled,
        "allowed_functions": list(c.allowed_functions),
        "allowed_secrets": list(c.allowed_secrets),
        "allowed_imports": list(c.allowed_imports),
        "rate_per_minute": c.rate_per_minute,
        "daily_quota": c.daily_quota,
        "storage_bytes": c.storage_bytes,
        "public_key_sha256": c.public_key_sha256(),
    }
