"""`appliance audit verify` and `appliance audit show` (docs/CONTRACT.md §3).

Exit codes of `verify`: 0 when the chain and every checkpoint verify, 1 when they do not (the
message names the first bad entry), 2 for a usage error (no log, unreadable public keys).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from ._errors import PublicKeyError, VerificationFailed
from ._format import AuditPaths
from ._show import Filters, format_table, parse_since, select, to_json_lines
from ._signing import load_public_keys
from ._verify import verify_log

EXIT_FAILED = 1
EXIT_USAGE = 2


def _usage_error(message: str) -> NoReturn:
    click.echo(f"appliance audit: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _log_path(ctx: click.Context, state: str | None, log: str | None) -> Path:
    """`--log`, else `<state>/audit/audit.jsonl` with the state from `--state` here, from
    `appliance --state`, from `$APPLIANCE_STATE`, or `.appliance`."""
    if log is not None:
        return Path(log)
    if state is None:
        root = ctx.find_root().obj
        state = root.get("state") if isinstance(root, dict) else None
    if state is None:
        state = os.environ.get("APPLIANCE_STATE", ".appliance")
    return Path(state) / "audit" / "audit.jsonl"


_state_option = click.option(
    "--state",
    type=click.Path(file_okay=False),
    default=None,
    help="the stack's state directory (default: $APPLIANCE_STATE or .appliance)",
)
_log_option = click.option(
    "--log",
    "log",
    type=click.Path(dir_okay=False),
    default=None,
    help="the audit log (default: <state>/audit/audit.jsonl)",
)


@click.group("audit", context_settings={"help_option_names": ["-h", "--help"]})
def audit() -> None:
    """Review and verify the tamper-evident audit log."""


@audit.command()
@_state_option
@_log_option
@click.option(
    "--public-keys",
    type=click.Path(dir_okay=False),
    default=None,
    help="the audit key's exported public keys (default: audit-pubkeys.json next to "
    "the log); keep a trusted copy off this host",
)
@click.option(
    "--checkpoints",
    type=click.Path(dir_okay=False),
    default=None,
    help="the checkpoint file (default: audit.checkpoints.jsonl next to the log)",
)
@click.option("--json", "as_json", is_flag=True, help="print the outcome as one JSON object")
@click.pass_context
def verify(
    ctx: click.Context,
    state: str | None,
    log: str | None,
    public_keys: str | None,
    checkpoints: str | None,
    as_json: bool,
) -> None:
    """Exit 0 only when the chain and every checkpoint verify; else name the first bad entry."""
    paths = AuditPaths(_log_path(ctx, state, log))
    side = Path(checkpoints) if checkpoints else paths.checkpoints
    if not paths.log.exists() and not side.exists():
        _usage_error(f"no audit log at {paths.log}")
    keys_path = Path(public_keys) if public_keys else paths.public_keys
    keys = None
    if public_keys is not None or keys_path.exists():
        try:
            keys = load_public_keys(keys_path)
        except PublicKeyError as exc:
            _usage_error(exc.detail)
    try:
        report = verify_log(paths.log, keys, checkpoints=side)
    except PublicKeyError as exc:
        _usage_error(exc.detail)
    except OSError as exc:
        _usage_error(f"cannot read {exc.filename or paths.log}: {exc.strerror or exc}")
    except VerificationFailed as exc:
        _emit_failure(exc, paths.log, as_json)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(report.as_dict(), sort_keys=True))
    else:
        _emit_report(report.as_dict())


def _emit_failure(exc: VerificationFailed, log: Path, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": False,
                    "log": str(log),
                    "kind": exc.kind,
                    "seq": exc.seq,
                    "line": exc.line,
                    "message": exc.detail,
                },
                sort_keys=True,
            )
        )
        return
    click.echo(f"FAILED {log}", err=True)
    click.echo(f"  {exc.detail}", err=True)


def _emit_report(report: dict[str, Any]) -> None:
    click.echo(f"OK {report['log']}")
    click.echo(f"  {report['entries']} entries, chain intact")
    if report["checkpoints"]:
        keys = ", ".join(f"v{v} sha256:{f[:16]}" for v, f in report["key_fingerprints"].items())
        click.echo(
            f"  {report['checkpoints']} signed checkpoints verified, through seq "
            f"{report['signed_through']} (audit key {keys})"
        )
    else:
        click.echo("  no checkpoint yet: nothing is signed")
    if report["unsigned"]:
        click.echo(
            f"  {report['unsigned']} entries after the last checkpoint are chained but not "
            "yet signed"
        )
    for warning in report["warnings"]:
        click.echo(f"  warning: {warning}")


@audit.command()
@_state_option
@_log_option
@click.option("--since", default=None, help="only entries since: 15m, 2h, 7d, or ISO-8601")
@click.option("--client", default=None, help="only this client (key id)")
@click.option("--status", default=None, help="only this status (accepted, rejected, ok, ...)")
@click.option("--function", default=None, help="only this function")
@click.option(
    "--type",
    "event_type",
    default=None,
    help="only this event type, or family (submission, execution, ...)",
)
@click.option(
    "--limit", type=click.IntRange(min=0), default=None, help="only the last N matching entries"
)
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one entry per line (SIEM)")
@click.pass_context
def show(
    ctx: click.Context,
    state: str | None,
    log: str | None,
    since: str | None,
    client: str | None,
    status: str | None,
    function: str | None,
    event_type: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List audit entries, filtered; a table, or JSON Lines with --json. Does not verify."""
    path = _log_path(ctx, state, log)
    if not path.exists():
        _usage_error(f"no audit log at {path}")
    try:
        moment = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    filters = Filters(
        since=moment, client=client, status=status, function=function, type=event_type
    )
    try:
        reading = select(path, filters, limit)
    except OSError as exc:
        _usage_error(f"cannot read {path}: {exc.strerror or exc}")
    if as_json:
        click.echo(to_json_lines(reading.entries), nl=False)
    else:
        click.echo(format_table(reading.entries), nl=False)
    if reading.skipped:
        click.echo(
            f"appliance audit: {reading.skipped} line(s) are not entries; run "
            "`appliance audit verify`",
            err=True,
        )
