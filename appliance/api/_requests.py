"""The first steps of every signed request: read the body under a cap, verify the signature,
parse the JSON. Each raises an `ApplianceError` before anything else happens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from ..errors import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
)
from ..registry import Client, Registry
from ..signatures import (
    DEFAULT_WINDOW,
    NonceStore,
    UnverifiedRequest,
    Window,
    authority_of,
    verify_request,
)

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refusing more than `limit` bytes before reading them all, and a body that has
    not arrived within `timeout` seconds (a slow client holds a connection and its buffers;
    the server closes it a little later in any case, see `_server`)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length", code="bad_content_length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"the body did not arrive within {timeout:g} s") from exc
    except ClientDisconnect as exc:
        # The client went, or the server cut it at its body deadline: a 4xx nobody receives,
        # rather than a 500 in the logs and the metrics.
        raise BadRequest("the client closed the connection", code="client_disconnected") from exc
    return b"".join(chunks)


class _ResolvedClient:
    """The registry as the signature verifier's key resolver, keeping the client it resolved:
    one registry lookup per request, and the policy checked is the one whose key verified."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.client: Client | None = None

    def public_key(self, keyid: str) -> Ed25519PublicKey | None:
        self.client = self.registry.get(keyid)
        return self.client.public_key() if self.client else None


class Authenticator:
    """Verifies a request's signature against the registry and the nonces seen.

    `authorities` are the `@authority` values a signature may name (the deployment's setting);
    when none are set, only the address and port the connection arrived at, which no client
    chooses (issue 12, finding 19).
    """

    def __init__(
        self,
        registry: Registry,
        nonces: NonceStore,
        clock: Callable[[], float],
        window: Window = DEFAULT_WINDOW,
        authorities: tuple[str, ...] = (),
    ) -> None:
        self.registry = registry
        self.nonces = nonces
        self.clock = clock
        self.window = window
        self.authorities = frozenset(authorities)

    def authenticate(self, request: Request, body: bytes) -> Client:
        """The signing client (or raise Unauthorized)."""
        unverified = UnverifiedRequest(request.method, str(request.url), dict(request.headers))
        resolved = _ResolvedClient(self.registry)
        keyid = verify_request(
            unverified,
            body,
            resolved,
            self.nonces,
            self.clock,
            self.window,
            authorities=self.authorities or _arrived_at(request),
        )
        client = resolved.client
        if client is None or client.keyid != keyid:  # verify_request resolved no other key.
            raise Unauthorized("the signature does not verify", code="invalid_signature")
        request.state.client = client.keyid
        return client


def _arrived_at(request: Request) -> frozenset[str]:
    """The authority of the address and port this connection arrived at (none on a socket
    without one, such as a Unix socket: then every signed request is refused)."""
    server = request.scope.get("server")
    if not server:
        return frozenset()
    host, port = str(server[0]), server[1]
    host = f"[{host}]" if ":" in host else host
    netloc = host if port is None else f"{host}:{int(port)}"
    return frozenset({authority_of(f"{request.url.scheme}://{netloc}/")})


def parse_body(request: Request, body: bytes, model: type[M]) -> M:
    """Parse a JSON body into `model`; 415 when not JSON, 400 when malformed."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    try:
        raw = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="malformed_json") from exc
    if not isinstance(raw, dict):
        raise BadRequest("body must be a JSON object", code="malformed_json")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise BadRequest(_first_error(exc), code="invalid_field") from exc


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key as sent (checked by `Retryable`); one at most."""
    values = request.headers.getlist("idempotency-key")
    if len(values) > 1:
        raise BadRequest("more than one Idempotency-Key", code="invalid_idempotency_key")
    return values[0] if values else None


def request_id(request: Request) -> str | None:
    """The id the middleware gave this request."""
    rid: str | None = getattr(request.state, "request_id", None)
    return rid


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"
