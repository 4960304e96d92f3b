"""`appliance unseal`, `backup`, `restore` and `upgrade`: the day-2 commands (issue 15).

Shares and age identities are read from where the operator points (stdin or a path) and never
copied; shares are checked before anything is submitted (malformed: exit 2, nothing done).
Exit 1 when OpenBao refuses the shares, a backup does not verify, or a downgrade is refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from .. import maintenance
from .._stack import (
    OPERATOR_MODE,
    Shares,
    SharesMalformed,
    StackError,
    parse_shares,
    seal_mode,
)
from .._stack.age import AgeError, read_recipient
from .._stack.backup import MAX_RESTORE_BYTES
from .._stack.seal import MAX_SHARES_INPUT
from ._common import _fail, _state, _state_option


def shares_to_option(fn: Callable[..., None]) -> Callable[..., None]:
    """`--shares-to RECIPIENT_FILE` of `init` and `up`: the operator-held seal."""
    return click.option(
        "--shares-to",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=(
            "an age X25519 recipient file (age1...): a new OpenBao's unseal shares (5, "
            "threshold 3) are printed encrypted to it; the plaintext is stored nowhere, the "
            "ciphertext in <state>/unseal-shares.age until `appliance shares ack`"
        ),
    )(fn)


def read_recipient_option(path: Path | None) -> str | None:
    """The recipient of `--shares-to`, checked (exit 2 when it is not one)."""
    if path is None:
        return None
    try:
        return read_recipient(path)
    except AgeError as exc:
        _fail(exc.detail)


def _shares_file_option(fn: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--shares-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="read the unseal shares from FILE (e.g. a read-only seed disk) instead of stdin",
    )(fn)


def _read_shares(shares_file: Path | None) -> Shares:
    """The operator's shares, checked (exit 2 when malformed: nothing was submitted)."""
    try:
        if shares_file is not None:
            with shares_file.open("rb") as handle:
                raw = handle.read(MAX_SHARES_INPUT + 1)
        else:
            raw = sys.stdin.buffer.read(MAX_SHARES_INPUT + 1)
    except OSError as exc:
        _fail(f"cannot read the shares: {exc.strerror}")
    try:
        return parse_shares(raw)
    except SharesMalformed as exc:
        _fail(exc.detail)


def _require_prepared(state: Path) -> None:
    if not (state / "stack.json").is_file():
        _fail(f"no prepared stack in {state}: run `appliance prepare` or `appliance up` first")


def _say(line: str) -> None:
    click.echo(line, err=True)


@click.command()
@_state_option
@_shares_file_option
@click.option("--reenrol", is_flag=True, help="re-run the bootstrap and enrolment in any case")
@click.option("--reset", is_flag=True, help="forget the shares an earlier unseal submitted")
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="seconds to wait for OpenBao to answer (at boot it may still be starting)",
)
@click.pass_context
def unseal(
    ctx: click.Context, shares_file: Path | None, reenrol: bool, reset: bool, timeout: float
) -> None:
    """Unseal OpenBao with the operator's shares (stdin or --shares-file), then re-enrol the
    services whose credentials are no longer live (or all, with --reenrol).

    Shares: one base64 share per line, or the JSON of the decrypted block printed by
    `init --shares-to`. In file mode (the local stack) the state's own share file is used.
    """
    state = _state(ctx)
    _require_prepared(state)
    supplied = _read_shares(shares_file) if seal_mode(state) == OPERATOR_MODE else None
    try:
        outcome = maintenance.unseal(
            state, supplied, reenrol=reenrol, report=_say, reset=reset, timeout=timeout
        )
    except StackError as exc:
        _fail(exc.detail, 1)
    click.echo(
        json.dumps(
            {
                "sealed": outcome.progress.sealed,
                "reenrolled": outcome.enrolment is not None,
                "why": outcome.why,
                **(outcome.enrolment or {}),
            }
        )
    )


@click.command()
@_state_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--recipient",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="an age X25519 recipient file; default: <state>/operator-recipient",
)
@click.pass_context
def backup(ctx: click.Context, out: Path, recipient: Path | None) -> None:
    """Write an encrypted backup (OpenBao raft snapshot, audit log, stack.json) to --out.

    Not included, on purpose: the unseal shares, secrets/ and tls/ (back them up separately).
    Works while the services run.
    """
    state = _state(ctx)
    _require_prepared(state)
    if out.exists():
        _fail(f"{out} exists: choose a new file")
    try:
        done = maintenance.backup(state, out, recipient)
    except AgeError as exc:
        _fail(exc.detail)
    except StackError as exc:
        _fail(exc.detail, 1)
    if done["skipped"]:
        _say(
            "skipped in the audit directory (not the log's own regular files): "
            + ", ".join(done["skipped"])
        )
    _say("not included, back up separately: " + "; ".join(done["manifest"]["not_included"]))
    click.echo(json.dumps({"out": done["out"], "members": done["manifest"]["members"]}))


@click.command()
@_state_option
@click.argument("archive", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--identity",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="the operator's age identity file (read, never stored)",
)
@_shares_file_option
@click.option(
    "--max-bytes",
    type=click.IntRange(min=1),
    default=MAX_RESTORE_BYTES,
    show_default=True,
    help="refuse an archive whose members add up to more than this",
)
@click.pass_context
def restore(
    ctx: click.Context, archive: Path, identity: Path, shares_file: Path | None, max_bytes: int
) -> None:
    """Restore a backup of this appliance: check it (signed by this appliance, of this OpenBao
    cluster, every member as its manifest says), stop the API, worker and Flower and check they
    are down, restore OpenBao's storage and the audit log (the replaced log is kept in
    <state>/audit-replaced/), re-enrol, record the restore in the audit log, start the services.

    The unseal shares are needed (a root token is generated from them): in operator mode read
    from stdin or --shares-file. The services are systemd units when systemd runs this state's
    units (APPLIANCE_SERVICE_MANAGER=systemd|pid-files overrides), else the local stack's.
    """
    state = _state(ctx)
    _require_prepared(state)
    shares: list[Shares] = []
    if seal_mode(state) == OPERATOR_MODE:
        shares.append(_read_shares(shares_file))  # Checked before anything is stopped.
    try:
        done = maintenance.restore(
            state,
            archive,
            identity,
            lambda: shares[0] if shares else None,
            _say,
            max_bytes=max_bytes,
        )
    except StackError as exc:
        _fail(exc.detail, 1)
    click.echo(json.dumps(done))


@click.command()
@_state_option
@click.option("--check", is_flag=True, help="say what would be done, do nothing")
@click.pass_context
def upgrade(ctx: click.Context, check: bool) -> None:
    """Bring the state (data disk) to this image's version: refuse a downgrade; before
    migrating, write an offline backup to <state>/backups/. Run at every boot."""
    state = _state(ctx)
    if not state.is_dir():
        _fail(f"no state directory {state}")
    try:
        done = maintenance.upgrade(state, check=check, report=_say)
    except StackError as exc:
        _fail(exc.detail, 1)
    click.echo(json.dumps(done))
