"""Every kind of tampering is detected and located: altered, removed, inserted, reordered,
truncated, forged checkpoints, and a rewrite of the chain after an edit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit import (
    PublicKeyError,
    PublicKeys,
    UnsafeInMemorySigner,
    VerificationFailed,
    export_public_keys,
    verify_log,
)

from .helpers import entry, paths, read_lines, rehash_from, sealed, write_lines, write_sample

# 35 submissions, checkpoint every 10: checkpoints at seq 11 (1..10), 22 (11..21), 33 (22..32);
# line n holds seq n; seq 34..37 follow, unsigned.
COUNT = 35


@pytest.fixture
def signer() -> UnsafeInMemorySigner:
    return UnsafeInMemorySigner()


@pytest.fixture
def keys(signer: UnsafeInMemorySigner, tmp_path: Path) -> PublicKeys:
    return export_public_keys(signer, tmp_path / "audit" / "audit-pubkeys.json")


@pytest.fixture
def log(signer: UnsafeInMemorySigner, keys: PublicKeys, tmp_path: Path) -> Path:
    path = tmp_path / "audit" / "audit.jsonl"
    write_sample(path, signer, COUNT)
    return path


def failure(log: Path, keys: PublicKeys) -> VerificationFailed:
    with pytest.raises(VerificationFailed) as info:
        verify_log(log, keys)
    return info.value


def test_an_intact_log_verifies(log: Path, keys: PublicKeys) -> None:
    report = verify_log(log, keys)
    assert (report.entries, report.checkpoints, report.signed_through, report.unsigned) == (
        38,
        3,
        32,
        5,
    )
    assert report.warnings == ()


def test_an_edited_field_is_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    lines[4] = lines[4].replace(b'"client":"client1"', b'"client":"mallory"')
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.seq, error.line) == ("altered", 5, 5)
    assert "entry seq 5 (line 5)" in str(error)


def test_a_reformatted_line_is_altered(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    lines[6] = json.dumps(entry(lines[6]), indent=1).replace("\n", " ").encode() + b"\n"
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.seq) == ("altered", 7) and "canonical" in str(error)


def test_an_edit_then_rehash_of_the_rest_is_caught_by_the_checkpoint(
    log: Path, keys: PublicKeys
) -> None:
    lines = read_lines(log)
    forged = entry(lines[13])
    forged["status"] = "rejected"
    lines[13] = sealed(forged)
    write_lines(log, rehash_from(lines, 13))
    error = failure(log, keys)
    assert error.kind == "altered" and error.seq == 11
    assert "entries seq 11..21 no longer match the signed checkpoint seq 22" in str(error)


def test_an_edit_rehashing_only_that_entry_is_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    forged = entry(lines[2])
    forged["function"] = "other"
    lines[2] = sealed(forged)
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.seq, error.line) == ("altered", 3, 3)


def test_a_deleted_line_is_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    del lines[4]
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.seq, error.line) == ("removed", 5, 5)
    assert "entry seq 5 is missing" in str(error)


def test_several_deleted_lines_are_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    del lines[4:7]
    write_lines(log, lines)
    error = failure(log, keys)
    assert error.kind == "removed" and "seq 5..7 is missing" in str(error)


def test_a_forged_line_chained_in_is_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    forged = entry(lines[5])  # seq 6, copied then changed: it chains to seq 5
    forged["client"] = "mallory"
    lines.insert(5, sealed(forged))
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.seq, error.line) == ("inserted", 6, 6)


def test_a_copied_line_is_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    lines.insert(8, lines[2])
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.line) == ("inserted", 9)
    assert "copy of entry seq 3 (line 3)" in str(error)


def test_an_inserted_garbage_line_is_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    lines.insert(3, b'{"note": "nothing to see"}\n')
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.line) == ("inserted", 4)


def test_an_inserted_entry_with_an_invented_seq_is_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    forged = entry(lines[0])
    forged["seq"], forged["prev_hash"] = 9999, "f" * 64
    lines.insert(3, sealed(forged))
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.line) == ("inserted", 4)


def test_two_swapped_lines_are_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    lines[4], lines[5] = lines[5], lines[4]
    write_lines(log, lines)
    error = failure(log, keys)
    assert (error.kind, error.seq, error.line) == ("reordered", 5, 6)
    assert "entry seq 5 is at line 6, after entry seq 6 at line 5" in str(error)


def test_a_line_moved_far_is_named(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    moved = lines.pop(2)
    lines.insert(20, moved)
    write_lines(log, lines)
    error = failure(log, keys)
    assert error.kind == "reordered" and error.seq == 3 and error.line == 21


def test_a_tail_cut_before_the_last_checkpoint_is_reported(log: Path, keys: PublicKeys) -> None:
    write_lines(log, read_lines(log)[:30])
    error = failure(log, keys)
    assert error.kind == "truncated"
    assert str(error) == "truncated: log ends at seq 30 but checkpoint covers up to seq 32"


def test_a_tail_cut_just_before_the_checkpoint_entry_is_reported(
    log: Path, keys: PublicKeys
) -> None:
    write_lines(log, read_lines(log)[:32])
    error = failure(log, keys)
    assert error.kind == "truncated" and "checkpoint entry seq 33" in str(error)


def test_a_log_emptied_is_truncated(log: Path, keys: PublicKeys) -> None:
    log.write_bytes(b"")
    assert failure(log, keys).kind == "truncated"


def test_a_tail_cut_after_the_last_checkpoint_only_shortens_the_unsigned_part(
    log: Path, keys: PublicKeys
) -> None:
    write_lines(log, read_lines(log)[:35])
    report = verify_log(log, keys)
    assert report.entries == 35 and report.unsigned == 2


def test_a_checkpoint_signed_by_another_key_is_forged(log: Path, keys: PublicKeys) -> None:
    lines = read_lines(log)
    checkpoint = entry(lines[21])
    other = UnsafeInMemorySigner()
    from appliance.audit import CheckpointBody

    checkpoint["signature"] = other.sign(CheckpointBody.from_entry(checkpoint).message())
    lines[21] = sealed(checkpoint)
    write_lines(log, rehash_from(lines, 21))
    error = failure(log, keys)
    assert (error.kind, error.seq, error.line) == ("forged", 22, 22)
    assert "does not verify with audit key version 1" in str(error)


def test_a_checkpoint_by_an_unexported_key_version_says_so(log: Path, tmp_path: Path) -> None:
    other = export_public_keys(UnsafeInMemorySigner(version=2), tmp_path / "other.json")
    error = failure(log, other)
    assert error.kind == "forged" and "export them again" in str(error)


def test_a_forged_checkpoint_record_does_not_pass_for_truncation(
    log: Path, keys: PublicKeys
) -> None:
    side = paths(log).checkpoints
    record = json.loads(side.read_bytes().splitlines()[-1])
    record.update(seq=99, to_seq=98)
    side.write_bytes(side.read_bytes() + json.dumps(record).encode() + b"\n")
    error = failure(log, keys)
    assert error.kind == "forged"


def test_a_checkpoint_record_that_disagrees_with_the_log_is_altered(
    log: Path, keys: PublicKeys
) -> None:
    side = paths(log).checkpoints
    records = side.read_bytes().splitlines()
    first = json.loads(records[0])
    first["hash"] = "0" * 64
    side.write_bytes(b"\n".join([json.dumps(first).encode(), *records[1:]]) + b"\n")
    assert failure(log, keys).kind == "altered"


def test_checkpoints_need_public_keys(log: Path) -> None:
    with pytest.raises(PublicKeyError):
        verify_log(log, None)


def test_a_log_without_checkpoints_verifies_without_keys(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path, None, 5)
    report = verify_log(path, None)
    assert (report.entries, report.checkpoints, report.unsigned) == (5, 0, 5)


def test_an_incomplete_last_line_is_a_warning(log: Path, keys: PublicKeys) -> None:
    log.write_bytes(log.read_bytes() + b'{"v":1,"seq":')
    report = verify_log(log, keys)
    assert report.entries == 38 and "incomplete" in report.warnings[0]
