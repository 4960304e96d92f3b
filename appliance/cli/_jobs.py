"""`appliance submit`, `workflow`, `result` and `revoke`: signed requests to the API.

Over HTTPS (issue 15) the API's certificate is always verified, never skipped: against `--ca`
(or APPLIANCE_API_CA) when given, else against the stack's CA (`tls/ca.crt`) when the API
serves the certificate that CA issued, else against the system's trust store (an operator's
certificate).
"""

from __future__ import annotations

import functools
import json
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..signatures import sign_request
from ._common import _fail, _require_stack, _state_option


def _load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        _fail(f"cannot read private key {path}: {exc}")
    if not isinstance(key, Ed25519PrivateKey):
        _fail(f"{path} is not an Ed25519 private key")
    return key


class SignedClient:
    """An HTTP client that signs every request per the appliance's RFC 9421 profile.

    Over HTTPS it verifies the server's certificate and name against `ca` (a PEM file of
    trusted certificates) when given, else against the system's trust store."""

    def __init__(
        self, base_url: str, keyid: str, key: Ed25519PrivateKey, ca: Path | None = None
    ) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30, verify=trust(ca))
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
        """Send a signed request (JSON body when given; of the extra headers, only an
        Idempotency-Key is signed, as CONTRACT §5 requires)."""
        content = json.dumps(body).encode() if body is not None else None
        headers = dict(headers or {})
        if content is not None:
            headers["content-type"] = "application/json"
        req = self.http.build_request(method, path, content=content, headers=headers, params=params)
        sign_request(req, self.keyid, self.key, content)
        return self.http.send(req)


def trust(ca: Path | None) -> ssl.SSLContext:
    """A client TLS context: certificates and host names verified, against `ca` when given (a
    leaf in it is trusted by itself too), else against the system's store; TLS 1.2 or later."""
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if ca is not None:
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _client(ctx: click.Context, key_id: str | None, private_key: str | None) -> SignedClient:
    st = _require_stack(ctx)
    key_id = key_id or st["client"]["key_id"]
    path = Path(private_key or st["client"]["private_key"])
    options = ctx.ensure_object(dict)
    url = options.get("api_url") or st["api_url"]
    given_ca = options.get("api_ca")
    stack_ca = st.get("api_tls", {}).get("ca")
    ca = Path(given_ca) if given_ca else Path(stack_ca) if stack_ca else None
    try:
        return SignedClient(url, key_id, _load_key(path), ca)
    except (OSError, ssl.SSLError) as exc:
        _fail(f"cannot read the CA certificates {ca}: {exc}")


def _api_url(ctx: click.Context, _param: Any, value: str | None) -> None:
    if value is None:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise click.BadParameter("an http:// or https:// URL of a host (and port), no path")
    ctx.ensure_object(dict)["api_url"] = value.rstrip("/")


def _api_ca(ctx: click.Context, _param: Any, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["api_ca"] = value


F = TypeVar("F", bound=Callable[..., Any])


def _reports_unreachable(command: F) -> F:
    """A command that cannot reach the API, or whose TLS verification fails, says so and exits
    1 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except httpx.TransportError as exc:
            url = exc.request.url if _has_request(exc) else "the API"
            _fail(f"cannot reach {url}: {exc}", 1)

    return wrapper  # type: ignore[return-value]


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 - httpx raises RuntimeError when the error has no request
    except RuntimeError:
        return False
    return True


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


#: How long one long-poll asks the API to hold a result read (CONTRACT §5: at most 30 s), kept
#: under the HTTP client's 30 s read timeout.
LONG_POLL_SECONDS = 20


def _wait_for(client: SignedClient, key: str, timeout: float = 120) -> httpx.Response:
    """The result once it is stored, or the last 202 at `timeout`. Each read long-polls
    (`wait=`): the API answers as soon as the result is stored. An API that answers a 202 before
    the wait is over (one without long-polling) is polled with a backoff instead."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        wait = max(1, min(LONG_POLL_SECONDS, int(deadline - time.monotonic())))
        asked = time.monotonic()
        resp = client.request("GET", "/get-result", params={"key": key, "wait": str(wait)})
        if resp.status_code != 202 or time.monotonic() > deadline:
            return resp
        if time.monotonic() - asked < wait:
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _client_options(fn: Any) -> Any:
    """--key-id and --private-key: which client signs a command's requests; --api-url and --ca:
    where the API is and which CA its certificate is verified against (see `_client`)."""
    fn = _reports_unreachable(fn)
    fn = click.option(
        "--ca",
        type=click.Path(dir_okay=False, exists=True),
        envvar="APPLIANCE_API_CA",
        expose_value=False,
        callback=_api_ca,
        help="verify the API's certificate against these CA certificates (PEM) "
        "[default: the stack's CA for its own certificate, else the system's store]",
    )(fn)
    fn = click.option(
        "--api-url",
        envvar="APPLIANCE_API_URL",
        callback=_api_url,
        expose_value=False,
        help="the API's URL [default: the stack's api_url]",
    )(fn)
    fn = click.option(
        "--private-key", type=click.Path(dir_okay=False), help="client private key (PEM)"
    )(fn)
    return click.option("--key-id", help="client key id (default: the stack's local client)")(fn)


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
@_state_option
@click.argument("key")
@_client_options
@click.pass_context
def revoke(ctx: click.Context, key: str, key_id: str | None, private_key: str | None) -> None:
    """Revoke the queued job of KEY (it will not run), or delete its finished result."""
    client = _client(ctx, key_id, private_key)
    sys.exit(_print_response(client.request("DELETE", f"/v1/results/{key}")))
