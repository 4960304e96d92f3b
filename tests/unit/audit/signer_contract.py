"""The contract every checkpoint signer must meet: run against the in-memory stub (unit tests)
and against OpenBao's transit engine (integration tests).

A subclass provides two fixtures: `signer` (a `Signer`) and `public_source` (what the operator
exports the public keys from).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from appliance.audit import (
    AuditLog,
    EventType,
    PublicKeySource,
    Signer,
    UnsafeInMemorySigner,
    VerificationFailed,
    export_public_keys,
    key_version,
    load_public_keys,
    verify_log,
)

from .helpers import records, write_sample


class SignerContract:
    """The tests; not collected by itself (its name does not start with `Test`)."""

    def test_signature_format(self, signer: Signer) -> None:
        signature = signer.sign(b"message")
        prefix, version, b64 = signature.split(":")
        assert prefix == "vault" and key_version(signature) >= 1 and version.startswith("v")
        assert len(base64.b64decode(b64)) == 64  # a raw Ed25519 signature

    def test_verifies_offline_with_exported_keys(
        self, signer: Signer, public_source: PublicKeySource, tmp_path: Path
    ) -> None:
        keys = export_public_keys(public_source, tmp_path / "audit-pubkeys.json")
        loaded = load_public_keys(tmp_path / "audit-pubkeys.json")
        assert sorted(loaded.keys) == sorted(keys.keys)
        assert all(loaded.fingerprint(v) == keys.fingerprint(v) for v in keys.keys)
        message = b"checkpoint body"
        signature = signer.sign(message)
        keys.check(message, signature)
        with pytest.raises(ValueError, match="does not verify"):
            keys.check(message + b"!", signature)

    def test_signs_checkpoints_that_verify(
        self, signer: Signer, public_source: PublicKeySource, tmp_path: Path
    ) -> None:
        log = tmp_path / "audit" / "audit.jsonl"
        keys = export_public_keys(public_source, tmp_path / "audit" / "audit-pubkeys.json")
        write_sample(log, signer, 25, every=10, close=True)
        report = verify_log(log, keys)
        assert report.checkpoints == 3 and report.unsigned == 0
        assert [r["type"] for r in records(log)].count("checkpoint") == 3

    def test_a_checkpoint_by_another_key_fails(
        self, signer: Signer, public_source: PublicKeySource, tmp_path: Path
    ) -> None:
        log = tmp_path / "audit" / "audit.jsonl"
        keys = export_public_keys(public_source, tmp_path / "audit" / "audit-pubkeys.json")
        version = key_version(signer.sign(b"x"))
        write_sample(log, UnsafeInMemorySigner(version=version), 12, every=10)
        with pytest.raises(VerificationFailed, match=r"checkpoint seq 11 \(line 11\)") as info:
            verify_log(log, keys)
        assert info.value.kind == "forged" and info.value.seq == 11

    def test_entries_survive_a_signer_that_is_down(
        self, signer: Signer, public_source: PublicKeySource, tmp_path: Path
    ) -> None:
        class Down:
            def sign(self, message: bytes) -> str:
                raise OSError("signer unreachable")

        log_path = tmp_path / "audit" / "audit.jsonl"
        keys = export_public_keys(public_source, tmp_path / "audit" / "audit-pubkeys.json")
        log = AuditLog.open(log_path, Down(), checkpoint_every=5, durable=False)
        for i in range(12):
            log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"t{i}")
        log._signer = signer  # OpenBao is back
        assert log.maybe_checkpoint(force=True) is not None
        log.close()
        report = verify_log(log_path, keys)
        kinds = [r["type"] for r in records(log_path)]
        assert kinds.count("task.rejected") == 12 and kinds.count("checkpoint.failed") == 1
        assert report.checkpoints == 1 and report.unsigned == 0
