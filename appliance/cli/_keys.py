"""`appliance keys rotate`: the transit keys."""

from __future__ import annotations

import click

from .. import stack
from .._stack import operator_token_file
from ..errors import ApplianceError
from ._common import _fail, _require_stack, _state, _state_option


@click.group()
def keys() -> None:
    """Rotate and retire the transit keys that seal jobs and results."""


@keys.command("rotate")
@_state_option
@click.option(
    "--key",
    "names",
    multiple=True,
    default=("results", "jobs"),
    show_default=True,
    type=click.Choice(["results", "jobs", "task-signing", "task-messages", "audit"]),
)
@click.option(
    "--min-decryption-version",
    type=click.IntRange(min=1),
    default=None,
    help="refuse to open anything sealed under an older version (retires old keys)",
)
@click.pass_context
def keys_rotate(
    ctx: click.Context, names: tuple[str, ...], min_decryption_version: int | None
) -> None:
    """Rotate transit keys: new seals use the new version; old ones stay readable until the
    minimum decryption version is raised."""
    from ..vault import Transit, VaultSession

    st = _require_stack(ctx)
    token_file = operator_token_file(_state(ctx))
    transit = Transit(VaultSession.from_token_file(st["vault_addr"], token_file))
    from ..audit import AuditLog, EventType, TransitSigner

    audit = AuditLog.open(st["audit_log"], TransitSigner(transit), source="operator")
    try:
        for name in names:
            if min_decryption_version is None:
                version = transit.rotate(name)
                click.echo(f"{name}: now at version {version}")
            else:
                transit.set_min_decryption_version(name, min_decryption_version)
                version = min_decryption_version
                click.echo(f"{name}: versions below {min_decryption_version} retired")
            audit.record(
                EventType.KEY_ROTATED, key_name=name, key_version=version, actor="operator"
            )
            if name == "audit":
                stack.export_audit_keys(
                    _state(ctx), st["vault_addr"], token_file.read_text().strip()
                )
        _renew_keys_generation(ctx)
    except ApplianceError as exc:
        _fail(exc.detail, 1)
    finally:
        audit.close()


def _renew_keys_generation(ctx: click.Context) -> None:
    """Tell the services that the keys changed: they drop their cached data keys on the next
    job or request (issue 16; SECURITY.md, "Envelope keys")."""
    from ..store import RedisGeneration, keys

    try:
        RedisGeneration(stack.admin_redis(_state(ctx)), keys.KEYS_GENERATION_KEY).renew()
    except (ApplianceError, OSError):
        _fail(
            "the keys are changed in OpenBao, but their generation could not be renewed in "
            "Redis: services may keep using the data keys they cached for up to "
            "APPLIANCE_DATA_KEY_MAX_AGE_SECONDS (60 s by default)",
            1,
        )
