"""The contract every anchor store must meet, and the attacks anchors stop (issue 12, findings
6, 7 and 9): run against the in-memory stub (unit tests) and against OpenBao's KV v2
(tests/integration/test_audit_anchors.py).

A subclass provides the fixture `store` (an empty `AnchorStore`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit import (
    Anchor,
    AnchorConflict,
    AnchorStore,
    AuditLog,
    CheckpointBody,
    EventType,
    PublicKeys,
    Signer,
    UnsafeInMemorySigner,
    VerificationFailed,
    merkle_root,
    verify_log,
)
from appliance.audit._format import GENESIS_HASH, format_time
from appliance.audit._signing import parse_public_keys

from .helpers import SEED, read_lines, records, sealed, write_lines

HEAD = "ab" * 32


def _anchor(number: int, from_seq: int, to_seq: int, head: str = HEAD) -> Anchor:
    return Anchor(number, from_seq, to_seq, head, "cd" * 32, "2026-01-01T00:00:00.000000Z", "x")


def _write(path: Path, store: AnchorStore | None, count: int, signer: Signer | None = None) -> None:
    signer = signer or UnsafeInMemorySigner.from_seed(SEED)
    log = AuditLog.open(path, signer, source="api", anchors=store, checkpoint_every=10)
    for i in range(count):
        log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"t{i}")
    log.close()


class AnchorStoreContract:
    """The tests; not collected by itself (its name does not start with `Test`)."""

    def test_create_get_latest_all(self, store: AnchorStore) -> None:
        assert store.latest() is None and store.all() == [] and store.get(1) is None
        first, second = _anchor(1, 1, 10), _anchor(2, 11, 20, "ef" * 32)
        store.create(first)
        store.create(second)
        assert store.get(1) == first and store.latest() == second
        assert store.all() == [first, second]

    def test_an_anchor_cannot_be_rewritten(self, store: AnchorStore) -> None:
        store.create(_anchor(1, 1, 10))
        with pytest.raises(AnchorConflict) as info:
            store.create(_anchor(1, 1, 10, "ef" * 32))
        assert info.value.existing == _anchor(1, 1, 10)
        assert store.get(1) == _anchor(1, 1, 10)

    def test_the_writer_anchors_every_checkpoint_and_verify_compares(
        self, store: AnchorStore, tmp_path: Path
    ) -> None:
        path = tmp_path / "audit" / "audit.jsonl"
        _write(path, store, 35)
        anchors = store.all()
        assert [a.number for a in anchors] == [1, 2, 3, 4]
        assert all(b.extends(a) for a, b in zip(anchors, anchors[1:], strict=False))
        checkpoints = [r for r in records(path) if r["type"] == "checkpoint"]
        assert [a.head_hash for a in anchors] == [c["head_hash"] for c in checkpoints]
        report = verify_log(path, _keys(), anchors=anchors)
        assert report.anchors == 4 and report.anchored_through == anchors[-1].to_seq

    def test_a_history_rewritten_and_resigned_fails(
        self, store: AnchorStore, tmp_path: Path
    ) -> None:
        # Finding 7: whoever may use the audit key re-signs a rewritten log.
        path = tmp_path / "audit" / "audit.jsonl"
        _write(path, store, 35)
        forged = tmp_path / "forged" / "audit.jsonl"
        lines = read_lines(path)
        # Rewrite entry 3 and every later line, then re-sign all checkpoints with the same key.
        _rewrite_and_resign(lines, forged)
        assert verify_log(forged, _keys()).checkpoints >= 3  # passes without anchors
        with pytest.raises(VerificationFailed) as info:
            verify_log(forged, _keys(), anchors=store.all())
        assert info.value.kind == "altered" and "anchor 1" in str(info.value)

    def test_a_fresh_unsigned_history_fails(self, store: AnchorStore, tmp_path: Path) -> None:
        # Finding 6: the whole log replaced by a fresh chain with no checkpoint.
        path = tmp_path / "audit" / "audit.jsonl"
        _write(path, store, 35)
        path.unlink()
        (tmp_path / "audit" / "audit.checkpoints.jsonl").unlink()
        log = AuditLog.open(path, None, source="api")
        for i in range(5):
            log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"f{i}")
        log.close()
        with pytest.raises(VerificationFailed) as info:
            verify_log(path, _keys(), anchors=store.all())
        assert info.value.kind in {"truncated", "altered"}

    def test_a_cut_tail_is_recorded_by_the_next_writer_and_reported(
        self, store: AnchorStore, tmp_path: Path
    ) -> None:
        # Finding 9: the log and the checkpoint file both cut back to seq 12.
        path = tmp_path / "audit" / "audit.jsonl"
        _write(path, store, 35)
        write_lines(path, read_lines(path)[:12])
        side = tmp_path / "audit" / "audit.checkpoints.jsonl"
        write_lines(side, read_lines(side)[:1])
        last = store.latest()
        assert last is not None
        with pytest.raises(VerificationFailed, match="no writer recorded it") as info:
            verify_log(path, _keys(), anchors=store.all())
        assert info.value.kind == "truncated"
        _write(path, store, 3)  # a writer starts on the cut log
        found = [r for r in records(path) if r["type"] == "audit.truncation_detected"]
        assert len(found) == 1 and found[0]["seq"] == 13
        assert (found[0]["lost_from_seq"], found[0]["lost_to_seq"]) == (13, last.to_seq)
        assert found[0]["anchor"] == last.number and found[0]["anchored_head"] == last.head_hash
        assert store.latest() is not None and store.latest().recovers  # type: ignore[union-attr]
        with pytest.raises(VerificationFailed, match="recorded it at seq 13") as info:
            verify_log(path, _keys(), anchors=store.all())
        assert info.value.kind == "truncated"


def _keys() -> PublicKeys:
    return parse_public_keys({"keys": UnsafeInMemorySigner.from_seed(SEED).public_keys()})


def _rewrite_and_resign(lines: list[bytes], out: Path) -> None:
    """An attacker with the sign right: new content from seq 3, every checkpoint re-signed."""
    signer = UnsafeInMemorySigner.from_seed(SEED)
    values = [json.loads(line) for line in lines]
    values[2]["task_id"] = "forged"
    hashes: list[str] = []
    rebuilt: list[bytes] = []
    prev = GENESIS_HASH
    start = 0
    for value in values:
        value["prev_hash"] = prev
        if value["type"] == "checkpoint":
            body = CheckpointBody(
                value["from_seq"],
                value["to_seq"],
                hashes[value["to_seq"] - 1],
                merkle_root(hashes[start : value["to_seq"]]),
                format_time(1.0),
            )
            value.update(
                head_hash=body.head_hash,
                merkle_root=body.merkle_root,
                signed_at=body.signed_at,
                signature=signer.sign(body.message()),
            )
            start = value["to_seq"]
        line = sealed(value)
        prev = json.loads(line)["hash"]
        hashes.append(prev)
        rebuilt.append(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_lines(out, rebuilt)
