"""The RFC 9421 profile against in-memory key and nonce stores, with an injected clock."""

from __future__ import annotations

import datetime
import json
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import DependencyUnavailable, Unauthorized
from appliance.signatures import (
    NOT_VERIFIED,
    UnverifiedRequest,
    authority_of,
    sign_request,
    verify_request,
)

from .api.harness import Nonces

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0
#: The authority the test server answers for.
HERE = frozenset({"api.test"})


class Keys:
    def public_key(self, keyid: str):  # type: ignore[no-untyped-def]
        return KEY.public_key() if keyid == "c1" else None


def _signed(
    body: bytes | None = b'{"a": 1}',
    url: str = "http://api.test/v1/tasks",
    offset: int = 0,
    **kw: object,
) -> UnverifiedRequest:
    method = "POST" if body else "GET"
    headers = {"content-type": "application/json"} if body else {}
    req = httpx.Request(method, url, content=body, headers=headers)
    created = datetime.datetime.fromtimestamp(NOW + offset, datetime.UTC)
    sign_request(req, kw.pop("keyid", "c1"), kw.pop("key", KEY), body, created=created, **kw)  # type: ignore[arg-type]
    return UnverifiedRequest(req.method, str(req.url), dict(req.headers))


def _verify(
    req: UnverifiedRequest,
    body: bytes = b'{"a": 1}',
    nonces: Nonces | None = None,
    now: float = NOW,
) -> str:
    return verify_request(req, body, Keys(), nonces or Nonces(), lambda: now, authorities=HERE)


def test_valid_request_verifies() -> None:
    assert _verify(_signed()) == "c1"


def test_get_with_query_covers_query() -> None:
    req = _signed(None, "http://api.test/get-result?key=f_1_" + "0" * 32)
    assert "@query" in req.headers["signature-input"]
    assert _verify(req, b"") == "c1"


@pytest.mark.parametrize(("offset", "ok"), [(-299, True), (-301, False), (29, True), (31, False)])
def test_created_window(offset: int, ok: bool) -> None:
    req = _signed(offset=offset)
    if ok:
        assert _verify(req) == "c1"
    else:
        with pytest.raises(Unauthorized) as exc:
            _verify(req)
        assert exc.value.code == "stale_signature"


def test_expires_in_the_past_is_refused() -> None:
    req = _signed(expires=datetime.datetime.fromtimestamp(NOW - 1, datetime.UTC))
    with pytest.raises(Unauthorized) as exc:
        _verify(req)
    assert exc.value.code == "stale_signature"


def test_replay_is_refused_only_after_the_signature_verifies() -> None:
    nonces = Nonces()
    req = _signed(nonce="fixed")
    _verify(req, nonces=nonces)
    with pytest.raises(Unauthorized) as exc:
        _verify(req, nonces=nonces)
    assert exc.value.code == "replayed_nonce"
    # A forged request with someone's nonce does not burn it.
    fresh = Nonces()
    forged = _signed(nonce="victim", key=Ed25519PrivateKey.generate())
    with pytest.raises(Unauthorized):
        _verify(forged, nonces=fresh)
    assert fresh.seen == set()


def test_body_digest_is_checked() -> None:
    with pytest.raises(Unauthorized) as exc:
        _verify(_signed(), body=b'{"a": 2}')
    assert exc.value.code == "invalid_signature"


def test_other_url_does_not_verify() -> None:
    req = _signed()
    moved = UnverifiedRequest(req.method, "http://api.test/v1/workflows", req.headers)
    with pytest.raises(Unauthorized):
        _verify(moved)


def _refusal(req: UnverifiedRequest) -> Unauthorized:
    with pytest.raises(Unauthorized) as exc:
        _verify(req)
    return exc.value


def test_an_unknown_key_id_answers_as_a_wrong_signature_does() -> None:
    """Issue 12, finding 18: an unauthenticated caller could tell `unknown_key` from
    `invalid_signature`, and so enumerate the registered key ids. Only the audit-only reason
    tells them apart."""
    unknown = _refusal(_signed(keyid="nobody"))
    wrong = _refusal(_signed(key=Ed25519PrivateKey.generate()))
    assert (unknown.status, unknown.code, unknown.detail) == (
        401,
        "invalid_signature",
        NOT_VERIFIED,
    )
    assert (wrong.status, wrong.code, wrong.detail) == (
        unknown.status,
        unknown.code,
        unknown.detail,
    )
    assert (unknown.reason, wrong.reason) == ("unknown_key", "wrong_key")
    assert (unknown.claimed_keyid, wrong.claimed_keyid) == ("nobody", "c1")


def test_a_malformed_request_answers_the_same_for_known_and_unknown_key_ids() -> None:
    """A failure after the key lookup but before the signature check (a covered header that is
    absent) must not differ either."""

    def without_digest(keyid: str) -> UnverifiedRequest:
        req = _signed(keyid=keyid)
        headers = {k: v for k, v in req.headers.items() if k.lower() != "content-digest"}
        return UnverifiedRequest(req.method, req.url, headers)

    known, unknown = _refusal(without_digest("c1")), _refusal(without_digest("nobody"))
    assert (known.code, known.detail) == (unknown.code, unknown.detail)


def test_two_appliance_tagged_signatures_are_refused() -> None:
    """Issue 12, finding 20: only the first tagged signature got the time and nonce checks; a
    second one, stale or replayed, rode along. Exactly one may carry the tag."""
    req = httpx.Request("GET", "http://api.test/x")
    sign_request(req, "c1", KEY, None, created=datetime.datetime.fromtimestamp(NOW, datetime.UTC))
    first_input, first_sig = req.headers["signature-input"], req.headers["signature"]
    stale = datetime.datetime.fromtimestamp(NOW - 3600, datetime.UTC)
    sign_request(req, "c1", KEY, None, created=stale, nonce="old")
    headers = dict(req.headers)
    headers["signature-input"] = (
        first_input + ", " + req.headers["signature-input"].replace("sig1=", "sig2=", 1)
    )
    headers["signature"] = first_sig + ", " + req.headers["signature"].replace("sig1=", "sig2=", 1)
    twice = UnverifiedRequest("GET", str(req.url), headers)
    assert _refusal(twice).code == "invalid_signature"
    # Each signature alone is what it is: the first verifies, the second is stale.
    alone = {"signature-input": first_input, "signature": first_sig}
    assert _verify(UnverifiedRequest("GET", str(req.url), alone), b"") == "c1"


def test_another_servers_authority_is_refused() -> None:
    """Issue 12, finding 19: a request signed for another server verified here."""
    elsewhere = _signed(url="http://other.example:8080/v1/tasks")
    assert _refusal(elsewhere).code == "wrong_authority"
    here = _signed(url="http://API.test:80/v1/tasks")
    assert _verify(here) == "c1"  # the same authority as RFC 9421 normalises it


@pytest.mark.parametrize(
    ("url", "authority"),
    [
        ("http://API.test:80/x", "api.test"),
        ("https://api.test:443/x", "api.test"),
        ("https://api.test:80/x", "api.test:80"),
        ("http://127.0.0.1:8000/x?y", "127.0.0.1:8000"),
        ("http://[::1]:8000/x", "[::1]:8000"),
        ("http://[::1]/x", "[::1]"),
    ],
)
def test_authority_of(url: str, authority: str) -> None:
    assert authority_of(url) == authority


def test_registry_down_is_503_not_a_bad_signature() -> None:
    """A key lookup that fails because OpenBao is down or sealed (cold registry cache during an
    outage) is a dependency failure (503 with Retry-After), never a 401 the client would not
    retry."""

    class DownKeys:
        def public_key(self, keyid: str) -> None:
            raise DependencyUnavailable("OpenBao is unreachable")

    with pytest.raises(DependencyUnavailable):
        verify_request(_signed(), b'{"a": 1}', DownKeys(), Nonces(), lambda: NOW, authorities=HERE)


@settings(max_examples=200, deadline=None)
@given(sig_input=st.text(max_size=200), sig=st.text(max_size=200), body=st.binary(max_size=64))
def test_arbitrary_signature_headers_never_crash(sig_input: str, sig: str, body: bytes) -> None:
    headers = {"signature-input": sig_input, "signature": sig, "content-type": "application/json"}
    req = UnverifiedRequest("POST", "http://api.test/v1/tasks", headers)
    with pytest.raises(Unauthorized):
        _verify(req, body=body)


@settings(max_examples=100, deadline=None)
@given(
    params=st.dictionaries(
        st.sampled_from(["created", "keyid", "nonce", "tag", "alg", "expires"]),
        st.one_of(st.integers(), st.text(max_size=20)),
        max_size=6,
    )
)
def test_arbitrary_parameters_never_crash(params: dict[str, object]) -> None:
    rendered = ";".join(f"{k}={json.dumps(v)}" for k, v in params.items())
    headers = {"signature-input": f'sig1=("@method");{rendered}', "signature": "sig1=:AAAA:"}
    with pytest.raises(Unauthorized):
        _verify(UnverifiedRequest("GET", "http://api.test/x", headers), body=b"", now=time.time())
