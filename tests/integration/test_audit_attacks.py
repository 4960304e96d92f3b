"""Issue 12, findings 6, 7 and 9, against a running stack: what a writer of the audit directory
and a holder of a service's OpenBao rights can do to the log, and what `appliance audit verify
--log COPY --state DIR` says about it.

Every attack works on a copy of the stack's log (the live log stays intact for other tests). The
checkpoints are signed with the API's OpenBao rights (a token with the `api` policy, as a thief of
the API's credentials would hold), through the public `AuditLog` and `TransitSigner`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import AuditLog, CheckpointBody, EventType, TransitSigner, merkle_root
from appliance.audit._format import GENESIS_HASH, canonical, entry_hash, format_time
from appliance.vault import Transit, VaultSession

from .conftest import Stack

pytestmark = pytest.mark.integration


def _api_transit(stack: Stack) -> Transit:
    """Transit logged in with exactly the API's policy."""
    root = stack.root_transit()
    token = root.session.call(
        lambda c: c.auth.token.create(policies=["api"], no_default_policy=True, ttl="15m")
    )["auth"]["client_token"]
    return Transit(VaultSession(stack.status["vault_addr"], token))


@pytest.fixture(scope="module")
def signed_log(appliance_stack: Stack) -> Path:
    """The stack's log with a few more events and a checkpoint made with the API's rights."""
    log = AuditLog.open(
        appliance_stack.status["audit_log"],
        TransitSigner(_api_transit(appliance_stack)),
        source="api",
    )
    for i in range(12):
        log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"attack-{i}")
    assert log.maybe_checkpoint(force=True) is not None
    log.close()
    return Path(appliance_stack.status["audit_log"])


def _copy(log: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for name in ("audit.jsonl", "audit.checkpoints.jsonl"):
        shutil.copyfile(log.with_name(name), into / name)
    return into / "audit.jsonl"


def _verify(stack: Stack, copy: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    done = stack.cli("audit", "verify", "--log", str(copy), "--json", *extra)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def _entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in entries))


def test_an_untouched_copy_verifies_with_the_stacks_keys_and_anchors(
    appliance_stack: Stack, signed_log: Path, tmp_path: Path
) -> None:
    code, report = _verify(appliance_stack, _copy(signed_log, tmp_path / "copy"))
    assert code == 0, report
    assert report["checkpoints"] >= 1 and report["key_fingerprints"]
    assert report.get("anchors", 0) >= 1 and report["anchored_through"] >= 12


def test_finding_6_a_fresh_unsigned_history_fails(
    appliance_stack: Stack, signed_log: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "fresh" / "audit.jsonl"
    fresh = AuditLog.open(copy, None, source="api")
    for i in range(5):
        fresh.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"fresh-{i}")
    fresh.close()
    code, report = _verify(appliance_stack, copy)
    assert code == 1 and report["kind"] in {"truncated", "altered", "unsigned"}, report


def test_finding_7_a_rewritten_log_resigned_with_the_apis_rights_fails(
    appliance_stack: Stack, signed_log: Path, tmp_path: Path
) -> None:
    copy = _copy(signed_log, tmp_path / "forged")
    entries = _entries(copy)
    victim = next(e for e in entries if e.get("task_id") == "attack-0")
    victim["task_id"] = "attack-rewritten"
    transit = _api_transit(appliance_stack)
    hashes: list[str] = []
    prev, start = GENESIS_HASH, 0
    for entry in entries:
        entry["prev_hash"] = prev
        if entry["type"] == "checkpoint":
            body = CheckpointBody(
                entry["from_seq"],
                entry["to_seq"],
                hashes[entry["to_seq"] - 1],
                merkle_root(hashes[start : entry["to_seq"]]),
                format_time(1.0),
            )
            entry.update(
                head_hash=body.head_hash,
                merkle_root=body.merkle_root,
                signed_at=body.signed_at,
                signature=transit.sign("audit", body.message()),
            )
            start = entry["to_seq"]
        entry["hash"] = entry_hash(entry)
        prev = entry["hash"]
        hashes.append(prev)
    _write(copy, entries)
    copy.with_name("audit.checkpoints.jsonl").unlink()
    keys = appliance_stack.state / "audit" / "audit-pubkeys.json"  # the genuine key's
    code, report = _verify(appliance_stack, copy, "--public-keys", str(keys))
    assert code == 1 and report["kind"] in {"altered", "truncated"}, report


def test_finding_9_a_cut_tail_fails(
    appliance_stack: Stack, signed_log: Path, tmp_path: Path
) -> None:
    copy = _copy(signed_log, tmp_path / "cut")
    entries = _entries(copy)
    last = max((e for e in entries if e["type"] == "checkpoint"), key=lambda e: e["seq"])
    # The anchored head (entry `to_seq`), the checkpoint and what follows are gone, from the log
    # and from the checkpoint file: only the anchor in OpenBao remembers them.
    _write(copy, entries[: last["to_seq"] - 1])
    side = copy.with_name("audit.checkpoints.jsonl")
    kept = [line for line in side.read_text().splitlines() if json.loads(line)["seq"] < last["seq"]]
    side.write_text("".join(line + "\n" for line in kept))
    code, report = _verify(appliance_stack, copy)
    assert code == 1 and report["kind"] == "truncated", report
