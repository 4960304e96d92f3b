"""Secret names and globs: a name is refused unless every segment is plain, so it is read from
OpenBao exactly as authorised; a glob matches segment by segment, `*` never crossing a `/`."""

from __future__ import annotations

import posixpath
import re
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import BadRequest
from appliance.registry import Client, make_client
from appliance.secret_names import (
    MAX_LENGTH,
    MAX_SEGMENTS,
    check_secret_glob,
    check_secret_name,
    glob_allows,
)

NAME_ALPHABET = "abcAZ09._-"
segment = st.text(NAME_ALPHABET, min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
valid_names = st.lists(segment, min_size=1, max_size=6).map("/".join)


@pytest.mark.parametrize(
    "name",
    [
        "db",
        "team-a/token",
        "team_a/v1.2/db-password",
        ".hidden",
        "a/...",
        "x" * MAX_LENGTH,
        "/".join("s" * MAX_SEGMENTS),
    ],
)
def test_plain_names_pass(name: str) -> None:
    assert check_secret_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "team-a/../team-b/token",
        "../team-b/token",
        "team-a/..",
        "..",
        ".",
        "team-a/./token",
        "team-a//token",
        "/team-a/token",
        "team-a/token/",
        "",
        "team-a/%2e%2e/team-b/token",
        "team-a\\..\\team-b\\token",
        "team-a/token?version=1",
        "team-a/token#x",
        "team a/token",
        "team-a/tökén",
        "team-a/token\n",
        "team-a/*",
        "x" * (MAX_LENGTH + 1),
        "/".join("s" * (MAX_SEGMENTS + 1)),
    ],
)
def test_traversal_and_odd_names_are_refused(name: str) -> None:
    with pytest.raises(BadRequest) as exc:
        check_secret_name(name)
    assert exc.value.code == "invalid_secret_name"


@pytest.mark.parametrize("value", [None, 1, ["db"], {"db": 1}, b"db"])
def test_a_name_that_is_not_a_string_is_refused(value: object) -> None:
    with pytest.raises(BadRequest):
        check_secret_name(value)


@settings(max_examples=500, deadline=None)
@given(untrusted=st.one_of(st.text(max_size=300), st.text("ab./\\%?#-_~ *", max_size=40)))
def test_an_accepted_name_is_read_exactly_as_authorised(untrusted: str) -> None:
    """Whatever comes in: either refused, or a name that no path normalisation and no URL
    encoding changes (so OpenBao reads the very path the policy was checked against)."""
    try:
        name = check_secret_name(untrusted)
    except BadRequest as exc:
        assert exc.code == "invalid_secret_name"
        return
    assert len(name) <= MAX_LENGTH and name.count("/") < MAX_SEGMENTS
    assert posixpath.normpath(name) == name and not name.startswith("/")
    assert quote(name, safe="/") == name
    assert ".." not in name.split("/") and "." not in name.split("/")


@pytest.mark.parametrize(
    ("glob", "name", "allowed"),
    [
        ("team-a/*", "team-a/token", True),
        ("team-a/*", "team-a/x/token", False),  # `*` does not cross a `/` (fnmatch's would)
        ("team-a/*", "team-a", False),
        ("team-a/*", "team-a/../team-b/token", False),  # not a name at all
        ("team-a*", "team-a/token", False),
        ("*", "db", True),
        ("*", "team-a/token", False),
        ("db", "db", True),
        ("db", "DB", False),
        ("reports/?", "reports/1", True),
        ("reports/?", "reports/10", False),
        ("reports/[0-9]*", "reports/2026", True),
        ("reports/[!0-9]*", "reports/2026", False),
        ("team-a/**", "team-a/token", True),
        ("team-a/**", "team-a/x/y/token", True),
        ("team-a/**", "team-a", False),  # one or more segments: never the parent itself
        ("team-a/**", "team-b/token", False),
        ("team-a/**/token", "team-a/x/token", True),
        ("team-a/**/token", "team-a/x/y/token", True),
        ("team-a/**/token", "team-a/token", False),
        ("**", "anything/at/all", True),
        ("**/token", "team-b/token", True),
    ],
)
def test_globs_match_segment_by_segment(glob: str, name: str, allowed: bool) -> None:
    assert glob_allows(glob, name) is allowed


@pytest.mark.parametrize(
    "glob",
    [
        "",
        "/team-a/*",
        "team-a/",
        "team-a//*",
        "team-a/../*",
        "./*",
        "team-a/**x",
        "a**",
        "team-a/%2e%2e",
        "team-a\\*",
        "team a/*",
        "x" * (MAX_LENGTH + 1),
    ],
)
def test_malformed_globs_are_refused_and_allow_nothing(glob: str) -> None:
    with pytest.raises(BadRequest) as exc:
        check_secret_glob(glob)
    assert exc.value.code == "invalid_secret_glob"
    assert not glob_allows(glob, "team-a/token")


def _reference(glob: str) -> re.Pattern[str]:
    """The intended meaning, written independently: a regex where `*` and `?` stay inside
    one segment and a `**` segment is one or more segments."""
    parts = []
    for seg in glob.split("/"):
        if seg == "**":
            parts.append(r"[^/]+(?:/[^/]+)*")
        else:
            parts.append(
                "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in seg)
            )
    return re.compile("/".join(parts))


glob_segment = st.one_of(
    st.just("**"),
    st.just("*"),
    st.text("ab*?", min_size=1, max_size=4).filter(lambda s: "**" not in s),
    st.sampled_from(["a", "b", "ab", ".a"]),
)
globs = st.lists(glob_segment, min_size=1, max_size=5).map("/".join)
small_names = st.lists(
    st.text("ab.", min_size=1, max_size=3).filter(lambda s: s not in (".", "..")),
    min_size=1,
    max_size=6,
).map("/".join)


@settings(max_examples=1000, deadline=None)
@given(glob=globs, name=small_names)
def test_matcher_agrees_with_the_reference(glob: str, name: str) -> None:
    assert glob_allows(glob, name) is bool(_reference(glob).fullmatch(name))


@settings(max_examples=300, deadline=None)
@given(prefix=valid_names, rest=st.lists(st.one_of(segment, st.just("..")), min_size=1, max_size=4))
def test_nothing_outside_a_prefix_glob_matches(prefix: str, rest: list[str]) -> None:
    """`P/*` and `P/**` allow only names below P: with `..` in the name it is no name at all."""
    name = "/".join([prefix, *rest])
    for glob in (f"{prefix}/*", f"{prefix}/**"):
        if glob_allows(glob, name):
            assert ".." not in rest
            assert posixpath.normpath(name).startswith(prefix + "/")


def test_a_stored_policy_with_a_bad_glob_allows_nothing_by_it() -> None:
    client = Client("c", "pem", allowed_secrets=("team-a/../*", "db"))
    assert client.may_read_secret("db")
    assert not client.may_read_secret("team-a/../x")
    assert not client.may_read_secret("x")


def test_registering_a_client_checks_its_secret_globs() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert make_client("c", pem, ["*"], ["team-a/*", "team-a/**"]).allowed_secrets == (
        "team-a/*",
        "team-a/**",
    )
    with pytest.raises(BadRequest) as exc:
        make_client("c", pem, ["*"], ["team-a/../team-b/*"])
    assert exc.value.code == "invalid_secret_glob"
