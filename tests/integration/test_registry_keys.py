"""What the operator can do through the client registry (red team of issue 12, item 2), against
the running stack. `clients add victim --public-key opthief.pub` replaced the victim's key in
silence, and the victim's result, accepted and sealed before, was then the operator's to read.

Now `add` refuses to replace a registered key (only `rotate-key` or `add --replace-key` do), a
result is sealed to the key its client had when the job was accepted (a key swapped in later,
by any registry write, does not open it), and every registry write of the CLI is audited with
the key fingerprints and globs before and after."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from appliance import stack
from appliance.jobs import open_result

from .conftest import Stack, is_problem, submit

pytestmark = pytest.mark.integration

_CANARY = "VICTIM-RESULT-CANARY-7c1e"
_MODULE = f"def f():\n    return {_CANARY!r}\n"


def _thief_key(appliance_stack: Stack, name: str) -> tuple[str, str]:
    """The operator's own key pair: (private key file, public key file)."""
    private, public = stack.write_keypair(appliance_stack.state / "clients", name)
    return str(private), str(public)


def test_add_refuses_to_replace_a_registered_clients_key(appliance_stack: Stack) -> None:
    appliance_stack.add_client("victim-add")
    before = appliance_stack.registry().read("victim-add").public_key_sha256()
    _, thief_pub = _thief_key(appliance_stack, "opthief-add")
    done = appliance_stack.cli(
        "clients", "add", "victim-add", "--public-key", thief_pub, "--allow-function", "*"
    )
    assert done.returncode == 2, done
    assert "rotate-key" in done.stderr and not done.stdout
    assert appliance_stack.registry().read("victim-add").public_key_sha256() == before
    # Said explicitly, the key is replaced (and audited as such).
    done = appliance_stack.cli(
        "clients", "add", "victim-add", "--public-key", thief_pub, "--replace-key"
    )
    assert done.returncode == 0, done.stderr
    assert appliance_stack.registry().read("victim-add").public_key_sha256() != before
    [entry] = [
        e
        for e in appliance_stack.audit_entries()
        if e["type"] == "client.changed" and e["client"] == "victim-add"
    ]
    assert entry["change"] == "replaced_key" and entry["previous_key_sha256"] == before


def test_a_job_accepted_just_before_a_key_swap_stays_sealed_to_the_old_key(
    appliance_stack: Stack,
) -> None:
    victim_key = appliance_stack.add_client("victim-running", rate_per_minute=100_000)
    client = appliance_stack.client("victim-running", victim_key)
    # Some work, so that the swap below usually lands while the job is queued or running.
    slow = "def f():\n    n = 0\n    for i in range(900):\n        for j in range(400):\n"
    slow += "            n += j\n"
    slow += f"    return {_CANARY!r}\n"
    accepted = submit(client, slow, "f")
    assert accepted.status_code == 202, accepted.text
    key = accepted.json()["result_key"]
    thief_private, thief_pub = _thief_key(appliance_stack, "opthief-running")
    registry = appliance_stack.registry()
    entry = registry.read("victim-running")
    old_key = entry.public_key_sha256()
    registry.put(dataclasses.replace(entry, public_key_pem=Path(thief_pub).read_text()))
    thief = appliance_stack.client("victim-running", Path(thief_private))
    read = appliance_stack.wait_result(thief, key)
    assert is_problem(read, 404)["code"] == "result_unavailable", read.text
    assert _CANARY not in read.text
    # The job did run to its value: a key holding the root of transit could still open it.
    stored = json.loads(appliance_stack.admin_redis().get(f"result:{key}"))["sealed"]
    body = open_result(appliance_stack.root_transit(), stored, key, "victim-running", old_key)
    assert body.result == _CANARY


@pytest.mark.parametrize("swap", ["cli-rotate-key", "registry-write"])
def test_a_result_stays_sealed_to_the_key_its_job_was_accepted_under(
    appliance_stack: Stack, swap: str
) -> None:
    victim = f"victim-{swap}"
    victim_key = appliance_stack.add_client(victim, rate_per_minute=100_000)
    client = appliance_stack.client(victim, victim_key)
    accepted = submit(client, _MODULE, "f")
    assert accepted.status_code == 202, accepted.text
    key = accepted.json()["result_key"]
    assert appliance_stack.wait_result(client, key).json()["result"] == _CANARY

    thief_private, thief_pub = _thief_key(appliance_stack, f"opthief-{swap}")
    if swap == "cli-rotate-key":
        done = appliance_stack.cli("clients", "rotate-key", victim, "--public-key", thief_pub)
        assert done.returncode == 0, done.stderr
    else:
        # Whoever holds the operator token can write the entry without the CLI: the binding
        # must not depend on the CLI's refusal.
        registry = appliance_stack.registry()
        entry = registry.read(victim)
        with open(thief_pub) as public:
            registry.put(dataclasses.replace(entry, public_key_pem=public.read()))

    thief = appliance_stack.client(victim, Path(thief_private))
    read = thief.request("GET", "/get-result", params={"key": key})
    assert is_problem(read, 404)["code"] == "result_unavailable", read.text
    assert _CANARY not in read.text
    # The victim's own key is refused from now on: the swap does not go unnoticed.
    assert is_problem(submit(client, _MODULE, "f"), 401)["code"] == "invalid_signature"


def test_every_registry_write_is_audited_with_fingerprints_and_globs(
    appliance_stack: Stack,
) -> None:
    _, first_pub = _thief_key(appliance_stack, "audited")
    _, second_pub = _thief_key(appliance_stack, "audited-next")
    steps = [
        ("clients", "add", "audited", "--public-key", first_pub, "--allow-secret", "team-a/*"),
        # Widening the secret globs of a registered client: the policy change is recorded.
        ("clients", "add", "audited", "--public-key", first_pub, "--allow-secret", "**"),
        ("clients", "rotate-key", "audited", "--public-key", second_pub),
        ("clients", "disable", "audited"),
        ("clients", "enable", "audited"),
    ]
    for args in steps:
        done = appliance_stack.cli(*args)
        assert done.returncode == 0, done.stderr
    entries = [
        e
        for e in appliance_stack.audit_entries()
        if e["type"] == "client.changed" and e["client"] == "audited"
    ]
    assert [(e["change"], e["status"]) for e in entries] == [
        ("added", "requested"),
        ("replaced", "requested"),
        ("rotated_key", "requested"),
        ("disabled", "requested"),
        ("enabled", "requested"),
    ]
    added, widened, rotated = entries[:3]
    assert "previous_key_sha256" not in added and added["secret_globs"] == ["team-a/*"]
    assert widened["previous_secret_globs"] == ["team-a/*"] and widened["secret_globs"] == ["**"]
    assert widened["previous_key_sha256"] == widened["key_sha256"]
    assert rotated["previous_key_sha256"] == widened["key_sha256"] != rotated["key_sha256"]
    assert rotated["key_sha256"] == appliance_stack.registry().read("audited").public_key_sha256()
    assert all(e["source"] == "operator" and e["actor"] == "operator" for e in entries)
    # The log still verifies with the operator's entries in it.
    verified = appliance_stack.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "PRIVATE KEY" not in json.dumps(entries)
