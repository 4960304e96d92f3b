"""The RFC 9421 request-signature profile of docs/CONTRACT.md §2, on http-message-signatures.

`verify_request()` returns the verified key id or raises `Unauthorized`; it never returns a bool.
The replay check (a nonce seen for that key within the window) runs only after the signature
verifies, so nobody can burn another client's nonces.

What an unauthenticated caller learns is the same for every key id (issue 12, finding 18): a
signature over an unknown or disabled key id is checked against a key nobody holds, and fails
as a wrong signature does, with the same code and detail (`invalid_signature`); only the audit
log is told which it was (`reason="unknown_key"`). Exactly one signature may carry the
profile's tag (finding 20): it alone is checked for time, authority, key and nonce, so a second
tagged signature could only be one that escaped those checks. The signed authority must be one
this server answers for (finding 19).
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import http_sf
from cryptography.exceptions import InvalidSignature as BadEd25519Signature
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
        """The key, or None when the key id is unknown or disabled; may raise Unauthorized
        (with an audit-only `reason`) when the key id's entry exists but cannot be used."""


@dataclass(frozen=True)
class UnverifiedRequest:
    """A request as received: nothing in it is trusted until `verify_request` returns."""

    method: str
    url: str
    headers: Mapping[str, str]


#: What a signature is checked against when its key id is unknown or disabled: a key whose
#: private half was never kept, so that such a request costs and answers what a wrong signature
#: does (no distinct code, detail or shortcut for an enumerator to tell apart).
_NOBODYS_KEY = Ed25519PrivateKey.generate().public_key()

#: The one detail of a signature that does not verify, whatever its key id.
NOT_VERIFIED = "the signature does not verify with an enabled key of that key id"


class _Keys(HTTPSignatureKeyResolver):
    def __init__(self, keys: PublicKeys) -> None:
        self.keys = keys
        self.unknown = False
        self.known = False
        #: Why a key id that is registered cannot be used (its entry does not parse), if so.
        self.unknown_reason: str | None = None

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey:
        try:
            key = self.keys.public_key(key_id)
        except Unauthorized as exc:
            # The key id's entry exists but cannot be used (a registry entry that does not
            # parse): refused as an unknown key id is, with the finer reason for the audit log.
            self.unknown_reason = exc.reason
            key = None
        if key is None:
            self.unknown = True
            return _NOBODYS_KEY
        self.known = True
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
    tagged = [
        (dict(params), [str(value) for value, _ in members])
        for members, params in signatures.values()
        if isinstance(members, list) and params.get("tag") == TAG
    ]
    if not tagged:
        raise Unauthorized('no signature carries tag="appliance"', code="missing_tag")
    if len(tagged) > 1:
        raise Unauthorized(
            'more than one signature carries tag="appliance"', code="invalid_signature"
        )
    return tagged[0]


#: A header the signature must cover whenever the request carries it (CONTRACT §5): a retry is
#: answered from the record of that key, so whoever could change it could redirect the answer.
IDEMPOTENCY_HEADER = "idempotency-key"


def required_components(
    has_query: bool, has_body: bool, covered: list[str], has_idempotency_key: bool = False
) -> list[str]:
    """The components the profile demands for this request."""
    need = ["@method"]
    need += ["@target-uri"] if "@target-uri" in covered else ["@authority", "@path"]
    if has_query:
        need.append("@query")
    if has_body:
        need += ["content-type", "content-digest"]
    if has_idempotency_key:
        need.append(IDEMPOTENCY_HEADER)
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


def authority_of(url: str) -> str:
    """The `@authority` a signature over `url` covers (RFC 9421 §2.2.3): the host in lower case,
    and the port unless it is the scheme's default."""
    parts = urlsplit(url)
    authority = parts.netloc.rpartition("@")[2].lower()
    host, colon, port = authority.rpartition(":")
    default = {"http": "80", "https": "443"}.get(parts.scheme.lower())
    if colon and "]" not in port and port == default:
        return host
    return authority


def _check_authority(url: str, authorities: Collection[str]) -> None:
    if authority_of(url) not in authorities:
        # A signature made for another server is not accepted here (issue 12, finding 19): the
        # authorities this server answers for are a deployment setting.
        raise Unauthorized("the signed authority is not this server's", code="wrong_authority")


def verify_request(
    unverified: UnverifiedRequest,
    body: bytes,
    keys: PublicKeys,
    nonces: NonceStore,
    clock: Clock,
    window: Window = DEFAULT_WINDOW,
    *,
    authorities: Collection[str],
) -> str:
    """Verify a request against the profile; return the client's key id or raise Unauthorized.

    `authorities` are the `@authority` values this server answers for; any other is refused. A
    refusal carries the claimed key id (`Unauthorized.claimed_keyid`) for the audit log.
    """
    params, covered = _selected_params(unverified.headers)
    claimed = params.get("keyid")
    try:
        _check_times(params, clock(), window)
        _check_authority(unverified.url, authorities)
        _verify_signature(unverified, body, keys, params, covered)
    except Unauthorized as exc:
        exc.claimed_keyid = claimed if isinstance(claimed, str) else None
        raise
    keyid = str(params["keyid"])
    # A nonce is remembered as long as a signature carrying it could still be accepted.
    if not nonces.claim(keyid, str(params["nonce"]), window.max_age + window.future_skew):
        raise Unauthorized(
            "nonce already used (replay)", code="replayed_nonce", claimed_keyid=keyid, verified=True
        )
    return keyid


def _verify_signature(
    unverified: UnverifiedRequest,
    body: bytes,
    keys: PublicKeys,
    params: Mapping[str, Any],
    covered: list[str],
) -> None:
    """Check the one tagged signature against the key of its key id (or raise)."""
    query = unverified.url.partition("?")[2]
    has_key = any(name.lower() == IDEMPOTENCY_HEADER for name in unverified.headers)
    need = required_components(bool(query), bool(body), covered, has_key)
    resolver = _Keys(keys)
    verifier = _Verifier(signature_algorithm=algorithms.ED25519, key_resolver=resolver)
    try:
        results = verifier.verify(
            unverified,
            expect_tag=TAG,
            require_components=need,
            body=body if body else None,
            max_age=None,
        )
    except (InvalidSignature, HTTPMessageSignaturesException) as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, DependencyUnavailable):
            # The key could not be looked up (OpenBao down or sealed): 503, not a bad signature.
            raise cause from None
        # The detail depends on the failure alone, never on whether the key id was known.
        crypto = isinstance(cause, BadEd25519Signature)
        detail = NOT_VERIFIED if crypto else f"signature does not verify: {exc}"
        raise _refusal(detail, resolver) from exc
    if resolver.unknown:
        raise _refusal(NOT_VERIFIED, resolver)  # Unreachable with a key nobody holds.
    # The library parses the headers on its own: it must have verified exactly the signature
    # whose times and key id were checked above, and no other.
    if len(results) != 1 or any(
        results[0].parameters.get(name) != params.get(name)
        for name in ("keyid", "nonce", "created", "expires", "tag")
    ):
        raise Unauthorized(
            'exactly one signature may carry tag="appliance"', code="invalid_signature"
        )


def _refusal(detail: str, resolver: _Keys) -> Unauthorized:
    """A signature that does not verify: the same for the client whatever its key id; the audit
    log alone learns whether the key id was unknown or disabled, or an enabled client's."""
    if resolver.unknown and resolver.unknown_reason:
        return Unauthorized(detail, code="invalid_signature", reason=resolver.unknown_reason)
    if resolver.unknown:
        return Unauthorized(detail, code="invalid_signature", reason="unknown_key")
    if resolver.known:
        return Unauthorized(detail, code="invalid_signature", reason="wrong_key")
    return Unauthorized(detail, code="invalid_signature")


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
    if IDEMPOTENCY_HEADER in request.headers:
        components.append(IDEMPOTENCY_HEADER)
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
