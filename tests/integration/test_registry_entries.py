"""Registry entries edited by hand in OpenBao (red team of issue 12, item 6), against the running
stack: an entry whose `enabled` is the string "false" left the client enabled (202), a limit cap
"x" gave a 500 and a `rate_per_minute` "lots" reset the connection. Each such entry is now
unusable: its key id is refused as an unknown one (401 `invalid_signature`), and the audit log
and the API's log say why."""

from __future__ import annotations

from typing import Any

import pytest

from appliance import stack

from .conftest import Stack, is_problem, submit

pytestmark = pytest.mark.integration

_F = "def f():\n    return 1\n"


def _write_by_hand(appliance_stack: Stack, keyid: str, **change: Any) -> None:
    """What an operator does in OpenBao's UI or CLI: write the entry, not through `clients`."""
    appliance_stack.add_client(keyid, rate_per_minute=100_000)
    session = stack.operator_session(appliance_stack.state)
    entry = {**appliance_stack.registry().read(keyid).to_dict(), **change}
    session.call(
        lambda c: c.secrets.kv.v2.create_or_update_secret(
            path=f"appliance/clients/{keyid}", secret=entry, mount_point="kv"
        )
    )
    # A hand edit renews no generation; the API sees it within its cache TTL. Renewing it here
    # spares the test that wait.
    generation = appliance_stack.registry().generation
    assert generation is not None
    generation.renew()


@pytest.mark.parametrize(
    ("keyid", "change"),
    [
        ("hand-enabled", {"enabled": "false"}),
        ("hand-limits", {"limits": {"cpu_seconds": "x"}}),
        ("hand-rate", {"rate_per_minute": "lots"}),
        ("hand-funcs", {"allowed_functions": "*"}),
    ],
)
def test_a_hand_written_entry_that_does_not_parse_is_refused(
    appliance_stack: Stack, keyid: str, change: dict[str, Any]
) -> None:
    key_file = appliance_stack.state / "clients" / f"{keyid}.key"
    _write_by_hand(appliance_stack, keyid, **change)
    client = appliance_stack.client(keyid, key_file)
    for _ in range(2):  # The second request is answered from the API's cache.
        resp = submit(client, _F, "f")
        assert is_problem(resp, 401)["code"] == "invalid_signature", resp.text
        assert "registry" not in resp.text
    failed = [
        e
        for e in appliance_stack.audit_entries()
        if e["type"] == "auth.failed" and e.get("claimed_keyid") == keyid
    ]
    assert failed and failed[0]["reason"] == "invalid_registry_entry", failed
    assert f"registry entry refused: registry entry {keyid}:" in appliance_stack.logs()
    # `clients list` shows the entry as unusable instead of failing.
    listed = appliance_stack.cli("clients", "list")
    assert listed.returncode == 0, listed.stderr
    assert any(line.startswith(keyid) and "INVALID" in line for line in listed.stdout.splitlines())
