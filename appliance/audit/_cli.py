"""`appliance audit verify` and `appliance audit show` (docs/CONTRACT.md §3).

Exit codes of `verify`: 0 when the chain and every checkpoint verify, 1 when they do not (the
message names the first bad entry), 2 for a usage error (no log, unreadable public keys,
unreachable anchors).

`verify` takes the public keys and the anchors of the stack whose state directory it is given
(`--state`, `appliance --state`, `$APPLIANCE_STATE`), also for a copy of its log (`--log COPY`):
the keys from `<state>/audit/audit-pubkeys.json`, the anchors from that stack's OpenBao with the
operator token, or from a file `export-anchors` wrote.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from ..vault import VaultSession
from ._anchors import Anchor, AnchorStore, VaultAnchorStore
from ._errors import AuditError, PublicKeyError, VerificationFailed
from ._format import AuditPaths
from ._show import Filters, format_table, parse_since, select, to_json_lines
from ._signing import PublicKeys, load_public_keys
from ._verify import DEFAULT_MAX_UNSIGNED_ENTRIES, DEFAULT_MAX_UNSIGNED_SECONDS, verify_log

EXIT_FAILED = 1
_DEFAULT_BAO_PORT = 18200  # `appliance up`'s default, when stack.json does not name one
EXIT_USAGE = 2


def _usage_error(message: str) -> NoReturn:
    click.echo(f"appliance audit: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _state_dir(ctx: click.Context, state: str | None) -> tuple[Path, bool]:
    """The state directory from `--state` here, from `appliance --state`, from
    `$APPLIANCE_STATE`, or `.appliance`; and whether it was named (not the default)."""
    if state is None:
        root = ctx.find_root().obj
        state = root.get("state") if isinstance(root, dict) else None
    if state is None:
        state = os.environ.get("APPLIANCE_STATE")
    return Path(state or ".appliance"), state is not None


def _log_path(ctx: click.Context, state: str | None, log: str | None) -> Path:
    """`--log`, else `<state>/audit/audit.jsonl`."""
    if log is not None:
        return Path(log)
    return _state_dir(ctx, state)[0] / "audit" / "audit.jsonl"


#: The key under which the `appliance` command (which composes the stack) hands the audit
#: commands a function from a state directory to that stack's anchors. The audit package never
#: imports the stack: the stack composes it (tests/unit/test_layers.py).
ANCHOR_FINDER = "audit_anchors"


def _stack_anchors(ctx: click.Context, state: Path) -> AnchorStore | None:
    """The anchors of the stack in `state`, read with its operator token; None without one.

    Through the finder `appliance` hands down (`ANCHOR_FINDER`); without one (the group used on
    its own), from the two files `appliance up` writes (`stack.json` for OpenBao's port,
    `secrets/bao-operator.token`), so that the audit package needs nothing above `vault`.
    """
    root = ctx.find_root().obj
    finder = root.get(ANCHOR_FINDER) if isinstance(root, dict) else None
    if callable(finder):
        found = finder(state)
        return found if isinstance(found, AnchorStore) else None
    token = state / "secrets" / "bao-operator.token"
    if not token.is_file():
        return None
    try:
        ports = json.loads((state / "stack.json").read_text())["ports"]
        port = int(ports.get("bao", _DEFAULT_BAO_PORT))
    except FileNotFoundError:
        port = _DEFAULT_BAO_PORT
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AuditError(f"cannot read {state / 'stack.json'}: {exc}") from exc
    return VaultAnchorStore(VaultSession.from_token_file(f"http://127.0.0.1:{port}", token))


def _load_anchors(
    ctx: click.Context, state: str | None, log: str | None, anchors_file: str | None
) -> list[Anchor] | None:
    """The anchors to compare: from `--anchors FILE`, else from the named stack (or the stack
    whose own log is verified); None when there is no stack to ask."""
    if anchors_file is not None:
        try:
            return [Anchor.parse(a) for a in json.loads(Path(anchors_file).read_text())]
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            _usage_error(f"cannot read the anchors file {anchors_file}: {exc}")
    directory, named = _state_dir(ctx, state)
    if log is not None and not named:
        return None
    try:
        store = _stack_anchors(ctx, directory)
        return store.all() if store is not None else None
    except AuditError as exc:
        _usage_error(
            f"cannot read the anchors of the stack in {directory}: {exc.detail}; start its "
            "OpenBao, pass --anchors FILE, or --no-anchors to verify without them"
        )


def _load_keys(
    ctx: click.Context, state: str | None, log: Path, given: str | None
) -> PublicKeys | None:
    """`--public-keys`, else the named stack's exported keys, else the file next to the log."""
    candidates = [AuditPaths(log).public_keys]
    directory, named = _state_dir(ctx, state)
    if named:
        candidates.insert(0, AuditPaths(directory / "audit" / "audit.jsonl").public_keys)
    path = Path(given) if given else next((p for p in candidates if p.exists()), None)
    if path is None:
        return None
    try:
        return load_public_keys(path)
    except PublicKeyError as exc:
        _usage_error(exc.detail)


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
@click.option(
    "--anchors",
    "anchors_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="anchors exported by `appliance audit export-anchors` (default: read from the "
    "stack's OpenBao)",
)
@click.option("--no-anchors", is_flag=True, help="do not compare with the anchors")
@click.option(
    "--max-unsigned-entries",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_UNSIGNED_ENTRIES,
    show_default=True,
    help="events allowed without an (anchored) checkpoint",
)
@click.option(
    "--max-unsigned-seconds",
    type=click.FloatRange(min=0),
    default=DEFAULT_MAX_UNSIGNED_SECONDS,
    show_default=True,
    help="time allowed without an (anchored) checkpoint, between the entries' own times",
)
@click.option("--json", "as_json", is_flag=True, help="print the outcome as one JSON object")
@click.pass_context
def verify(
    ctx: click.Context,
    state: str | None,
    log: str | None,
    public_keys: str | None,
    checkpoints: str | None,
    anchors_file: str | None,
    no_anchors: bool,
    max_unsigned_entries: int,
    max_unsigned_seconds: float,
    as_json: bool,
) -> None:
    """Exit 0 only when the chain, every checkpoint and every anchor verify, and no more of the
    log than the limits allow is unsigned; else name the first problem."""
    paths = AuditPaths(_log_path(ctx, state, log))
    side = Path(checkpoints) if checkpoints else paths.checkpoints
    if not paths.log.exists() and not side.exists():
        _usage_error(f"no audit log at {paths.log}")
    keys = _load_keys(ctx, state, paths.log, public_keys)
    anchors = None if no_anchors else _load_anchors(ctx, state, log, anchors_file)
    try:
        report = verify_log(
            paths.log,
            keys,
            checkpoints=side,
            anchors=anchors,
            max_unsigned_entries=max_unsigned_entries,
            max_unsigned_seconds=max_unsigned_seconds,
        )
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
    if report["anchors"] is None:
        click.echo("  anchors not compared: a rewritten, re-signed history would pass")
    else:
        click.echo(f"  {report['anchors']} anchors match, through seq {report['anchored_through']}")
    if report["unsigned"]:
        click.echo(
            f"  {report['unsigned']} entries after the last checkpoint are chained but not "
            "yet signed"
        )
    for warning in report["warnings"]:
        click.echo(f"  warning: {warning}")


@audit.command("export-anchors")
@_state_option
@click.pass_context
def export_anchors(ctx: click.Context, state: str | None) -> None:
    """Print the stack's anchors as JSON, for `verify --anchors FILE` elsewhere."""
    directory, _named = _state_dir(ctx, state)
    try:
        store = _stack_anchors(ctx, directory)
        found = store.all() if store is not None else []
    except AuditError as exc:
        _usage_error(f"cannot read the anchors of the stack in {directory}: {exc.detail}")
    click.echo(json.dumps([a.as_dict() for a in found], indent=1))


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
