"""Property tests of the verifier, which parses untrusted files: any edit, deletion, swap or
insertion is detected, and nothing the file holds makes it fail other than by
`VerificationFailed`."""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.audit import (
    AuditPaths,
    PublicKeys,
    UnsafeInMemorySigner,
    VerificationFailed,
    export_public_keys,
    load_public_keys,
    verify_log,
)

from .helpers import write_sample

_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@cache
def _sample() -> tuple[list[bytes], bytes, bytes]:
    """A 30-event log (checkpoints every 8 events, last one at the very end), its checkpoint file
    and public keys."""
    directory = Path(tempfile.mkdtemp())
    signer = UnsafeInMemorySigner()
    paths = AuditPaths(directory / "audit.jsonl")
    export_public_keys(signer, paths.public_keys)
    write_sample(paths.log, signer, 30, every=8, close=True)
    return (
        paths.log.read_bytes().splitlines(keepends=True),
        paths.checkpoints.read_bytes(),
        paths.public_keys.read_bytes(),
    )


def _verify(lines: list[bytes]) -> None:
    _, side, keys = _sample()
    with tempfile.TemporaryDirectory() as directory:
        paths = AuditPaths(Path(directory) / "audit.jsonl")
        paths.log.write_bytes(b"".join(lines))
        paths.checkpoints.write_bytes(side)
        paths.public_keys.write_bytes(keys)
        public: PublicKeys = load_public_keys(paths.public_keys)
        verify_log(paths.log, public)


def _detected(lines: list[bytes]) -> bool:
    try:
        _verify(lines)
    except VerificationFailed:
        return True
    return False


def test_the_sample_verifies() -> None:
    _verify(_sample()[0])


@_SETTINGS
@given(st.data())
def test_any_edit_is_detected(data: st.DataObject) -> None:
    lines = list(_sample()[0])
    i = data.draw(st.integers(0, len(lines) - 1))
    entry = json.loads(lines[i])
    key = data.draw(st.sampled_from(sorted(entry)))
    value = data.draw(st.one_of(st.integers(), st.text(max_size=20), st.none()))
    if entry[key] == value:
        return
    entry[key] = value
    lines[i] = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    assert _detected(lines)


@_SETTINGS
@given(st.data())
def test_any_deletion_swap_or_copy_is_detected(data: st.DataObject) -> None:
    lines = list(_sample()[0])
    i = data.draw(st.integers(0, len(lines) - 1))
    j = data.draw(st.integers(0, len(lines) - 1))
    action = data.draw(st.sampled_from(["delete", "swap", "copy", "move"]))
    if action == "delete":
        del lines[i]
    elif action == "swap":
        if i == j:
            return
        lines[i], lines[j] = lines[j], lines[i]
    elif action == "copy":
        lines.insert(j, lines[i])
    else:
        if i == j:
            return
        lines.insert(j, lines.pop(i))
    assert _detected(lines)


@_SETTINGS
@given(
    st.lists(st.binary(max_size=200).filter(lambda b: b"\n" not in b), min_size=1, max_size=3),
    st.integers(0, 40),
)
def test_arbitrary_bytes_only_ever_fail_verification(junk: list[bytes], at: int) -> None:
    lines = list(_sample()[0])
    for piece in junk:
        lines.insert(min(at, len(lines)), piece + b"\n")
    assert _detected(lines)
