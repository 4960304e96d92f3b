"""The RFC 9421 request-signature profile of docs/CONTRACT.md §2, on http-message-signatures.

`verify_request()` returns the verified key id or raises `Unauthorized`; it never returns a bool.
The replay check (a nonce seen for that key within the window) runs only after the signature
verifies, so nobody can burn another client's nonces.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import http_sf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from .errors import DependencyUnavailable, Unauthorized

TAG = "appliance"
MAX_AGE_SECONDS = 300
MAX_FUTURE_SECONDS = 30


@dataclass(frozen=True)
class Window:
    """How old a signature's `created` may be, and how far in the future (seconds)."""

    max_age: int = MAX_AGE_SECONDS
    future_skew: int = MAX_FUTURE_SECONDS


#: CONTRACT §2's window: 300 s old at most, 30 s ahead at most.
DEFAULT_WINDOW = Window()


Clock = Callable[[], float]


class NonceStore(Protocol):
    """Remembers nonces per key for the signature window."""

    def claim(self, keyid: str, nonce: str, ttl_seconds: int) -> bool:
        """Record the nonce; False if it was already recorded (a replay)."""


class PublicKeys(Protocol):
    """Resolves a key id to an enabled client's Ed25519 public key, or None."""

    def public_key(self, keyid: str) -> Ed25519PublicKey | None:
        """The key, or None when the key id is unknown or disabled."""


@dataclass(frozen=True)
class UnverifiedRequest:
    """A request as received: nothing in it is trusted until `verify_request` returns."""

    method: str
    url: str
    headers: Mapping[str, str]


class _Keys(HTTPSignatureKeyResolver):
    def __init__(self, keys: PublicKeys) -> None:
        self.keys = keys

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey:
        key = self.keys.public_key(key_id)
        if key is None:
            raise Unauthorized(f"unknown or disabled key {key_id!r}", code="unknown_key")
        return key

    def resolve_private_key(self, key_id: str) -> Any:
        raise NotImplementedError


class _Verifier(HTTPMessageVerifier):
    # Time checks are done by the profile below, against an injected clock.
    require_created = True

    def validate_created_and_expires(self, sig_input: Any, max_age: Any = None) -> None:
        return None


def _selected_params(headers: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Parameters and component names of the signature tagged "appliance" (or raise)."""
    lower = {k.lower(): v for k, v in headers.items()}
    if "signature-input" not in lower or "signature" not in lower:
        raise Unauthorized("the request is not signed", code="missing_signature")
    try:
        parsed = http_sf.parse(lower["signature-input"].encode(), tltype="dictionary")
    except (ValueError, TypeError) as exc:
        raise Unauthorized("malformed Signature-Input", code="invalid_signature") from exc
    # http_sf types the result as any structured value; with tltype="dictionary" it is a dict
    # whose members are (value, params) pairs. A member that is not an inner list is skipped.
    signatures: dict[str, tuple[Any, Any]] = cast(dict[str, tuple[Any, Any]], parsed)
    for _label, (members, params) in signatures.items():
        if isinstance(members, list) and params.get("tag") == TAG:
            return dict(params), [str(value) for value, _ in members]
    raise Unauthorized('no signature carries tag="appliance"', code="missing_tag")


def required_components(has_query: bool, has_body: bool, covered: list[str]) -> list[str]:
    """The components the profile demands for this request."""
    need = ["@method"]
    need += ["@target-uri"] if "@target-uri" in covered else ["@authority", "@path"]
    if has_query:
        need.append("@query")
    if has_body:
        need += ["content-type", "content-digest"]
    return need


def _check_times(params: Mapping[str, Any], now: float, window: Window) -> None:
    created = params.get("created")
    if type(created) is not int:
        raise Unauthorized('signature needs an integer "created"', code="invalid_signature")
    if created < now - window.max_age:
        raise Unauthorized("signature is too old", code="stale_signature")
    if created > now + window.future_skew:
        raise Unauthorized("signature is created in the future", code="stale_signature")
    expires = params.get("expires")
    if expires is not None and (type(expires) is not int or expires < now):
        raise Unauthorized("signature has expired", code="stale_signature")
    for name in ("keyid", "nonce"):
        if not isinstance(params.get(name), str) or not params[name]:
            raise Unauthorized(f'signature needs a "{name}"', code="invalid_signature")
    if "alg" in params and params["alg"] != "ed25519":
        raise Unauthorized("only ed25519 signatures are accepted", code="invalid_signature")


def verify_request(
    unverified: UnverifiedRequest,
    body: bytes,
    keys: PublicKeys,
    nonces: NonceStore,
    clock: Clock,
    window: Window = DEFAULT_WINDOW,
) -> str:
    """Verify a request against the profile; return the client's key id or raise Unauthorized."""
    params, covered = _selected_params(unverified.headers)
    now = clock()
    _check_times(params, now, window)
    query = unverified.url.partition("?")[2]
    need = required_components(bool(query), bool(body), covered)
    verifier = _Verifier(signature_algorithm=algorithms.ED25519, key_resolver=_Keys(keys))
    try:
        verifier.verify(
            unverified,
            expect_tag=TAG,
            require_components=need,
            body=body if body else None,
            max_age=None,
        )
    except Unauthorized:
        raise
    except (InvalidSignature, HTTPMessageSignaturesException) as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, Unauthorized):
            raise cause from None
        if isinstance(cause, DependencyUnavailable):
            # The key could not be looked up (OpenBao down or sealed): 503, not a bad signature.
            raise cause from None
        raise Unauthorized(f"signature does not verify: {exc}", code="invalid_signature") from exc
    keyid = str(params["keyid"])
    # A nonce is remembered as long as a signature carrying it could still be accepted.
    if not nonces.claim(keyid, str(params["nonce"]), window.max_age + window.future_skew):
        raise Unauthorized("nonce already used (replay)", code="replayed_nonce")
    return keyid


class _PrivateKey(HTTPSignatureKeyResolver):
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        return self.key

    def resolve_public_key(self, key_id: str) -> Any:
        raise NotImplementedError


def sign_request(
    request: Any,
    keyid: str,
    private_key: Ed25519PrivateKey,
    body: bytes | None,
    created: datetime.datetime | None = None,
    expires: datetime.datetime | None = None,
    nonce: str | None = None,
) -> None:
    """Sign an httpx-style request in place per the profile (used by the CLI and tests)."""
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_PrivateKey(private_key)
    )
    components = ["@method", "@target-uri"]
    if request.url.query:
        components.append("@query")
    if body:
        components.append("content-type")
    signer.sign(
        request,
        key_id=keyid,
        created=created or datetime.datetime.now(datetime.UTC),
        expires=expires,
        nonce=nonce or secrets.token_urlsafe(16),
        tag=TAG,
        label="sig1",
        covered_component_ids=components,
        body=body if body else None,
    )
