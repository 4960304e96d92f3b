"""The `appliance` command (docs/CONTRACT.md §3). Usage errors exit 2 with a message; nothing
runs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import stack
from ._stack import StackError, operator_token_file
from .audit import audit_cli
from .errors import ApplianceError
from .signatures import sign_request

EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"appliance: error: {message}", err=True)
    sys.exit(code)


def _state(ctx: click.Context) -> Path:
    return Path(ctx.obj["state"]).resolve()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state",
    "state",
    type=click.Path(file_okay=False),
    default=lambda: os.environ.get("APPLIANCE_STATE", ".appliance"),
    show_default=".appliance or $APPLIANCE_STATE",
    help="the stack's state directory",
)
@click.pass_context
def main(ctx: click.Context, state: str) -> None:
    """Run signed Python jobs in a hardened sandbox."""
    ctx.ensure_object(dict)
    ctx.obj.setdefault("state", state)
    # The audit commands find a stack's anchors through this (they do not import the stack).
    ctx.obj.setdefault("audit_anchors", stack.audit_anchors)


def _state_option(fn: Any) -> Any:
    """Let every subcommand take --state too (`appliance up --state DIR`)."""

    def remember(ctx: click.Context, _param: Any, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(dict)["state"] = value

    return click.option(
        "--state",
        type=click.Path(file_okay=False),
        expose_value=False,
        callback=remember,
        help="the stack's state directory",
    )(fn)


@main.command()
@_state_option
@click.option("--api-port", type=int, default=None, help="API port (0: any free port)")
@click.option("--flower-port", type=int, default=None, help="Flower port (0: any free port)")
@click.option("--redis-port", type=int, default=None, help="Redis port (0: any free port)")
@click.option("--bao-port", type=int, default=None, help="OpenBao port (0: any free port)")
@click.option(
    "--metrics-port", type=int, default=None, help="the worker's metrics port (0: any free port)"
)
@click.pass_context
def up(ctx: click.Context, /, **ports: int | None) -> None:
    """Start the whole local stack (idempotent) and print its URLs."""
    requested = {k.removesuffix("_port"): v for k, v in ports.items() if v is not None}
    try:
        st = stack.up(_state(ctx), requested)
    except StackError as exc:
        _fail(str(exc), 1)
    click.echo(f"API     {st['api_url']}")
    click.echo(f"Flower  {st['flower_url']}  (read-only; login: appliance flower-credentials)")
    click.echo(f"Audit   {st['audit_log']}")
    click.echo(f"Client  key id {st['client']['key_id']}, key {st['client']['private_key']}")


@main.command()
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


@main.command()
@_state_option
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop every service of the stack."""
    for name, was_running in stack.down(_state(ctx)).items():
        click.echo(f"{name:<8} {'stopped' if was_running else 'not running'}")


@main.command()
@click.argument("keyid")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True)
def keygen(keyid: str, out: str) -> None:
    """Write an Ed25519 client key pair (PEM): KEYID.key and KEYID.pub."""
    from .registry import validate_keyid

    try:
        validate_keyid(keyid)
    except ApplianceError as exc:
        _fail(exc.detail)
    private, public = stack.write_keypair(Path(out), keyid)
    click.echo(f"private key {private}\npublic key  {public}")


@main.group()
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
) -> None:
    """Register (or replace) a client with its public key and what it may do.

    Secret globs match segment by segment: `*` never crosses a `/`; a whole segment `**`
    matches one or more segments (`team-a/**`)."""
    import dataclasses

    from .registry import make_client

    try:
        client = make_client(keyid, Path(public_key).read_text(), functions, secrets, imports)
        client = dataclasses.replace(
            client, rate_per_minute=rate_per_minute, daily_quota=daily_quota
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
    from .errors import NotFound
    from .registry import validate_keyid

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
    """List the registered clients, enabled or not, with their policies."""
    _require_stack(ctx)
    registry = stack.operator_registry(_state(ctx))
    try:
        rows = [
            {
                "key_id": c.keyid,
                "enabled": c.enabled,
                "allowed_functions": list(c.allowed_functions),
                "allowed_secrets": list(c.allowed_secrets),
                "allowed_imports": list(c.allowed_imports),
                "rate_per_minute": c.rate_per_minute,
                "daily_quota": c.daily_quota,
                "public_key_sha256": c.public_key_sha256(),
            }
            for c in map(registry.read, registry.keyids())
        ]
    except ApplianceError as exc:
        _fail(exc.detail, 1)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(
            f"{row['key_id']:<24} {'enabled' if row['enabled'] else 'DISABLED':<9} "
            f"functions {row['allowed_functions'] or 'none'} "
            f"secrets {row['allowed_secrets'] or 'none'}"
        )


@main.group()
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
    type=click.Choice(["results", "jobs", "task-signing", "audit"]),
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
    from .vault import Transit, VaultSession

    st = _require_stack(ctx)
    token_file = operator_token_file(_state(ctx))
    transit = Transit(VaultSession.from_token_file(st["vault_addr"], token_file))
    from .audit import AuditLog, EventType, TransitSigner

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
    except ApplianceError as exc:
        _fail(exc.detail, 1)
    finally:
        audit.close()


@main.command("flower-credentials")
@_state_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def flower_credentials(ctx: click.Context, as_json: bool) -> None:
    """Show Flower's URL and login, read from OpenBao with the operator token.

    The password goes to this terminal only: the stack writes it to no file and no log.
    """
    from .vault import VaultSession, read_flower_credential

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


def _require_stack(ctx: click.Context) -> dict[str, Any]:
    if not (_state(ctx) / "stack.json").is_file():
        _fail(f"no stack in {_state(ctx)}: run `appliance up` first")
    return stack.status(_state(ctx))


def _load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        _fail(f"cannot read private key {path}: {exc}")
    if not isinstance(key, Ed25519PrivateKey):
        _fail(f"{path} is not an Ed25519 private key")
    return key


class SignedClient:
    """An HTTP client that signs every request per the appliance's RFC 9421 profile."""

    def __init__(self, base_url: str, keyid: str, key: Ed25519PrivateKey) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.keyid = keyid
        self.key = key

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send a signed request (JSON body when given; extra headers are not signed)."""
        content = json.dumps(body).encode() if body is not None else None
        headers = dict(headers or {})
        if content is not None:
            headers["content-type"] = "application/json"
        req = self.http.build_request(method, path, content=content, headers=headers, params=params)
        sign_request(req, self.keyid, self.key, content)
        return self.http.send(req)


def _client(ctx: click.Context, key_id: str | None, private_key: str | None) -> SignedClient:
    st = _require_stack(ctx)
    key_id = key_id or st["client"]["key_id"]
    path = Path(private_key or st["client"]["private_key"])
    return SignedClient(st["api_url"], key_id, _load_key(path))


def _json_option(text: str | None, what: str, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except ValueError as exc:
        _fail(f"--{what} is not valid JSON: {exc}")
    if not isinstance(value, kind):
        _fail(f"--{what} must be a JSON {'list' if kind is list else 'object'}")
    return value


def _json_body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return {"status": resp.status_code, "detail": resp.text}


def _print_response(resp: httpx.Response) -> int:
    click.echo(json.dumps(_json_body(resp), indent=2))
    if resp.status_code >= 400:
        return 1
    return 0


def _wait_for(client: SignedClient, key: str, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        resp = client.request("GET", "/get-result", params={"key": key})
        if resp.status_code != 202 or time.monotonic() > deadline:
            return resp
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _client_options(fn: Any) -> Any:
    """--key-id and --private-key: which client signs a command's requests (see `_client`)."""
    fn = click.option(
        "--private-key", type=click.Path(dir_okay=False), help="client private key (PEM)"
    )(fn)
    return click.option("--key-id", help="client key id (default: the stack's local client)")(fn)


@main.command()
@_state_option
@click.argument("module", type=click.Path(dir_okay=False))
@click.argument("function")
@click.option("--args", "args_json", help="positional arguments as a JSON list")
@click.option("--kwargs", "kwargs_json", help="keyword arguments as a JSON object")
@click.option("--limits", "limits_json", help="limits as a JSON object")
@_client_options
@click.option("--wait", is_flag=True, help="wait for the result and print it")
@click.pass_context
def submit(
    ctx: click.Context,
    module: str,
    function: str,
    args_json: str | None,
    kwargs_json: str | None,
    limits_json: str | None,
    key_id: str | None,
    private_key: str | None,
    wait: bool,
) -> None:
    """Submit FUNCTION from MODULE.py; print the result key (or the result with --wait)."""
    try:
        source = Path(module).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {module}: {exc}")
    body = {
        "module": source,
        "function": function,
        "args": _json_option(args_json, "args", list),
        "kwargs": _json_option(kwargs_json, "kwargs", dict),
        "limits": _json_option(limits_json, "limits", dict),
    }
    client = _client(ctx, key_id, private_key)
    resp = client.request("POST", "/v1/tasks", body)
    if resp.status_code != 202 or not wait:
        sys.exit(_print_response(resp))
    sys.exit(_print_response(_wait_for(client, resp.json()["result_key"])))


def _read_steps(path: Path) -> list[dict[str, Any]]:
    """Steps from STEPS.json: `{"steps": [...]}` or a bare list; a step may name its module by
    `module_file` (relative to STEPS.json) instead of giving its source as `module`."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        _fail(f"cannot read {path}: {exc}")
    steps = raw.get("steps") if isinstance(raw, dict) else raw
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        _fail(f'{path}: expected a non-empty list of steps (objects), or {{"steps": [...]}}')
    out = []
    for i, step in enumerate(steps):
        step = dict(step)
        if "module_file" in step:
            if "module" in step:
                _fail(f"{path}: step {i} has both module and module_file")
            source = path.parent / str(step.pop("module_file"))
            try:
                step["module"] = source.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                _fail(f"{path}: step {i}: cannot read {source}: {exc}")
        out.append(step)
    return out


@main.command()
@_state_option
@click.argument("steps_file", metavar="STEPS.json", type=click.Path(dir_okay=False))
@_client_options
@click.option("--wait", is_flag=True, help="wait for every step and print their results")
@click.pass_context
def workflow(
    ctx: click.Context, steps_file: str, key_id: str | None, private_key: str | None, wait: bool
) -> None:
    """Submit a workflow: each step's result is the next step's first argument."""
    steps = _read_steps(Path(steps_file))
    client = _client(ctx, key_id, private_key)
    resp = client.request("POST", "/v1/workflows", {"steps": steps})
    if resp.status_code != 202 or not wait:
        sys.exit(_print_response(resp))
    accepted = resp.json()
    results = [_json_body(_wait_for(client, step["result_key"])) for step in accepted["steps"]]
    click.echo(json.dumps({"workflow_id": accepted["workflow_id"], "steps": results}, indent=2))
    sys.exit(0 if all(r.get("status") == "succeeded" for r in results) else 1)


@main.command()
@_state_option
@click.argument("key")
@_client_options
@click.option("--wait", is_flag=True, help="wait while the job is queued or running")
@click.pass_context
def result(
    ctx: click.Context, key: str, key_id: str | None, private_key: str | None, wait: bool
) -> None:
    """Print the result stored under KEY."""
    client = _client(ctx, key_id, private_key)
    if wait:
        sys.exit(_print_response(_wait_for(client, key)))
    sys.exit(_print_response(client.request("GET", "/get-result", params={"key": key})))


@main.command()
@_state_option
@click.argument("key")
@_client_options
@click.pass_context
def revoke(ctx: click.Context, key: str, key_id: str | None, private_key: str | None) -> None:
    """Revoke the queued job of KEY (it will not run), or delete its finished result."""
    client = _client(ctx, key_id, private_key)
    sys.exit(_print_response(client.request("DELETE", f"/v1/results/{key}")))


main.add_command(audit_cli, "audit")


if __name__ == "__main__":
    main()
