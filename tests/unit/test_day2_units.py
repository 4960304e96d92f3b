"""Unit tests of the day-2 pieces that need no service (issue 15): the unseal-share parser
(untrusted operator input, Hypothesis) and the upgrade plan and migrations."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance._stack import upgrade
from appliance._stack.seal import Shares, SharesMalformed, parse_shares


def _share() -> str:
    return base64.b64encode(os.urandom(33)).decode()


def test_lines_and_json_parse_to_the_same_shares() -> None:
    keys = [_share() for _ in range(3)]
    by_lines = parse_shares(("\n".join(keys) + "\n").encode())
    by_json = parse_shares(json.dumps({"keys": keys, "threshold": 2}).encode())
    assert by_lines.keys == by_json.keys == tuple(keys)
    assert by_json.quorum() == tuple(keys[:2]) and by_lines.threshold is None
    assert keys[0] not in repr(by_json)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not base64!!",
        b'{"keys": "abc"}',
        b'{"keys": [1]}',
        b'{"keys": ["AAAA"], "threshold": 2}',
        b'{"keys": ["AAAA"], "threshold": true}',
        b"AAAA\nAAAA\n",
        b"\xff\xfe",
        b"-----BEGIN AGE ENCRYPTED FILE-----\nabc\n",
        b"A" * 70_000,
    ],
)
def test_malformed_shares_are_refused(raw: bytes) -> None:
    with pytest.raises(SharesMalformed):
        parse_shares(raw)


@given(st.binary(max_size=2048))
def test_any_bytes_parse_or_raise_malformed(raw: bytes) -> None:
    try:
        shares = parse_shares(raw)
    except SharesMalformed as exc:
        assert exc.code == "shares_malformed" and exc.detail
        return
    assert isinstance(shares, Shares) and shares.keys


def test_upgrade_plan_and_migrations_in_order(tmp_path: Path) -> None:
    ran: list[str] = []
    steps = (
        upgrade.Migration("0.2.0", lambda _: ran.append("0.2.0")),
        upgrade.Migration("0.3.0", lambda _: ran.append("0.3.0")),
        upgrade.Migration("0.4.0", lambda _: ran.append("0.4.0")),
    )
    assert upgrade.plan(tmp_path, "0.3.0", steps).action == upgrade.NEW
    upgrade.record_version(tmp_path, "0.1.0")
    plan = upgrade.plan(tmp_path, "0.3.0", steps)
    assert plan.action == upgrade.UPGRADE and [m.version for m in plan.migrations] == [
        "0.2.0",
        "0.3.0",
    ]
    assert upgrade.migrate(tmp_path, plan) == ["0.2.0", "0.3.0"] == ran
    assert upgrade.data_version(tmp_path) == "0.3.0"
    assert upgrade.plan(tmp_path, "0.3.0", steps).action == upgrade.SAME
    with pytest.raises(upgrade.DowngradeRefused):
        upgrade.plan(tmp_path, "0.2.9", steps)
    (tmp_path / "version.json").write_text('{"version": "x"}')
    with pytest.raises(upgrade.StackError):
        upgrade.plan(tmp_path, "0.3.0", steps)
