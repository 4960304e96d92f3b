"""`appliance clients add|disable|enable|list`: the client registry."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import stack
from .._stack import operator_token_file
from ..errors import ApplianceError
from ..registry import Client, InvalidRegistryEntry, Registry
from ._common import _fail, _require_stack, _state, _state_option

if TYPE_CHECKING:
    from ..audit import AuditSink


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
@click.option(
    "--replace-key",
    is_flag=True,
    help="replace the public key of a client registered with another (as `rotate-key` does)",
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
    replace_key: bool,
) -> None:
    """Register a client with its public key and what it may do, or replace the policy of a
    registered one. Its key is replaced only with --replace-key (or `rotate-key`).

    Secret globs match segment by segment: `*` never crosses a `/`; a whole segment `**`
    matches one or more segments (`team-a/**`). Every change is written to the audit log."""
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
    registry = stack.operator_registry(_state(ctx))
    previous = _previous(registry, keyid)
    if previous is not None and _key_of(previous) != client.public_key_sha256() and not replace_key:
        # Red team of issue 12, item 2: `add` silently put the operator's key in a client's
        # entry, and the client's next results were the operator's to read.
        _fail(
            f"{keyid} is registered with another public key ({_key_of(previous)[:16]}); "
            f"`appliance clients rotate-key {keyid} --public-key FILE` replaces it"
        )
    change = "added" if previous is None else "replaced"
    if previous is not None and _key_of(previous) != client.public_key_sha256():
        change = "replaced_key"
    _write(ctx, registry, change, previous, client)
    click.echo(
        f"registered {keyid}: functions {list(functions) or 'none'}, "
        f"secrets {list(secrets) or 'none'}, key {client.public_key_sha256()[:16]}"
    )


@clients.command("rotate-key")
@_state_option
@click.argument("keyid")
@click.option("--public-key", type=click.Path(dir_okay=False, exists=True), required=True)
@click.pass_context
def clients_rotate_key(ctx: click.Context, keyid: str, public_key: str) -> None:
    """Replace a registered client's public key, keeping its policy. Results of jobs accepted
    under the old key stay sealed to it: the new key does not read them."""
    import dataclasses

    from ..registry import validate_keyid

    try:
        validate_keyid(keyid)
        pem = Path(public_key).read_text()
    except (ApplianceError, ValueError) as exc:
        _fail(f"cannot rotate the key of {keyid}: {exc}")
    registry, previous = _registered(ctx, keyid)
    client = dataclasses.replace(previous, public_key_pem=pem)
    try:
        client.public_key()
    except (ApplianceError, ValueError) as exc:
        _fail(f"cannot rotate the key of {keyid}: {exc}")
    _write(ctx, registry, "rotated_key", previous, client)
    click.echo(
        f"rotated the key of {keyid}: {previous.public_key_sha256()[:16]} -> "
        f"{client.public_key_sha256()[:16]}; results of jobs accepted before stay sealed to "
        "the old key"
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
    import dataclasses

    from ..registry import validate_keyid

    try:
        validate_keyid(keyid)
    except ApplianceError as exc:
        _fail(exc.detail)
    registry, previous = _registered(ctx, keyid)
    client = dataclasses.replace(previous, enabled=enabled)
    _write(ctx, registry, "enabled" if enabled else "disabled", previous, client)
    click.echo(f"{'enabled' if enabled else 'disabled'} {keyid}")


def _registered(ctx: click.Context, keyid: str) -> tuple[Registry, Client]:
    """The operator's registry and `keyid`'s entry in it; exit 2 when there is none, 1 when
    OpenBao cannot be read."""
    from ..errors import NotFound

    _require_stack(ctx)
    registry = stack.operator_registry(_state(ctx))
    try:
        return registry, registry.read(keyid)
    except NotFound as exc:
        _fail(exc.detail)
    except ApplianceError as exc:
        _fail(exc.detail, 1)


def _previous(registry: Registry, keyid: str) -> Client | InvalidRegistryEntry | None:
    """The entry `keyid` has now: a client, one that does not parse, or None."""
    from ..errors import NotFound

    try:
        return registry.read(keyid)
    except NotFound:
        return None
    except InvalidRegistryEntry as exc:
        return exc
    except ApplianceError as exc:
        _fail(exc.detail, 1)


def _key_of(entry: Client | InvalidRegistryEntry) -> str:
    """The entry's key fingerprint (an entry that does not parse has none we can trust)."""
    return entry.public_key_sha256() if isinstance(entry, Client) else "unreadable entry"


def _write(
    ctx: click.Context,
    registry: Registry,
    change: str,
    previous: Client | InvalidRegistryEntry | None,
    client: Client,
) -> None:
    """Audit the change, then write it: a registry write the audit log could not record is not
    made. The entry holds what the change was (fingerprints and globs before and after, never a
    secret value); a write that then fails is recorded again with `status: failed`."""
    from ..audit import AuditError, EventType

    before = previous if isinstance(previous, Client) else None
    fields = {
        "client": client.keyid,
        "change": change,
        "actor": "operator",
        "key_sha256": client.public_key_sha256(),
        "function_globs": list(client.allowed_functions),
        "secret_globs": list(client.allowed_secrets),
        "previous_key_sha256": before.public_key_sha256() if before else None,
        "previous_function_globs": list(before.allowed_functions) if before else None,
        "previous_secret_globs": list(before.allowed_secrets) if before else None,
    }
    with _operator_audit(ctx) as audit:
        try:
            audit.record(EventType.CLIENT_CHANGED, status="requested", **fields)
        except AuditError as exc:
            _fail(f"the change to {client.keyid} was not made: it cannot be audited ({exc})", 1)
        try:
            registry.put(client)
        except ApplianceError as exc:
            with contextlib.suppress(AuditError):
                audit.record(EventType.CLIENT_CHANGED, status="failed", **fields)
            _fail(exc.detail, 1)


@contextlib.contextmanager
def _operator_audit(ctx: click.Context) -> Iterator[AuditSink]:
    """The stack's audit log, written by the operator (its checkpoints signed by transit)."""
    from ..audit import AuditLog, TransitSigner
    from ..vault import Transit, VaultSession

    st = _require_stack(ctx)
    token_file = operator_token_file(_state(ctx))
    transit = Transit(VaultSession.from_token_file(st["vault_addr"], token_file))
    try:
        audit = AuditLog.open(st["audit_log"], TransitSigner(transit), source="operator")
    except (ApplianceError, OSError) as exc:
        _fail(f"the audit log cannot be opened, so no registry change is made: {exc}", 1)
    try:
        yield audit
    finally:
        audit.close()


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
