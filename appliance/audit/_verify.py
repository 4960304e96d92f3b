"""Offline verification of an audit log: the hash chain, every checkpoint, and the tail.

`verify_log` reads the log once, front to back, keeping only the hashes of the entries not yet
covered by a checkpoint. At the first anomaly it reads the file once more to tell what happened
there (an entry altered, removed, inserted or moved) and raises `VerificationFailed` naming the
entry. It needs the log, the checkpoint file and the audit key's exported public keys: no
network, no OpenBao.

With the anchors of the stack (`_anchors.py`: every checkpoint's head, kept in OpenBao where no
writer can rewrite it), it also checks that the log holds every anchored head: a history
replaced by a fresh chain, rewritten and re-signed, or cut at the end fails, even when every
checkpoint in it verifies. And it bounds how much of the log may go without a checkpoint: no more
than `max_unsigned_entries` events or `max_unsigned_seconds` (measured between entries' own
times, never against the wall clock, so that an offline copy verifies the same way later).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._anchors import Anchor
from ._errors import PublicKeyError, VerificationFailed
from ._format import (
    CHECKPOINT_TYPE,
    FORMAT_VERSION,
    GENESIS_HASH,
    AuditPaths,
    CheckpointBody,
    canonical,
    entry_hash,
    merkle_root,
    parse_time,
)
from ._signing import PublicKeys, key_version

_HEX = frozenset("0123456789abcdef")

#: How much of the log may go without a checkpoint (anchored, when anchors are compared). The
#: writers checkpoint every 100 events or 60 s, retry a failed signature within 60 s and check
#: the time every 10 s: these bounds leave room for that, and for a burst while one is signed.
DEFAULT_MAX_UNSIGNED_ENTRIES = 1000
DEFAULT_MAX_UNSIGNED_SECONDS = 300.0

#: Entries by which the writers put a gap on the record (it is then a warning, not a failure).
_NOTED_TYPES = frozenset({"checkpoint.failed", "audit.recovered", "audit.truncation_detected"})


@dataclass(frozen=True)
class VerifyReport:
    """What a successful verification established."""

    log: Path
    entries: int
    checkpoints: int
    signed_through: int  # the last seq covered by a verified checkpoint (0: none)
    unsigned: int  # events after the last checkpoint: chained, not yet signed
    key_fingerprints: Mapping[int, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    anchors: int | None = None  # anchors compared (None: none were given)
    anchored_through: int = 0  # the last seq whose head is anchored

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "ok": True,
            "log": str(self.log),
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "signed_through": self.signed_through,
            "unsigned": self.unsigned,
            "key_fingerprints": {str(v): f for v, f in self.key_fingerprints.items()},
            "warnings": list(self.warnings),
            "anchors": self.anchors,
            "anchored_through": self.anchored_through,
        }


@dataclass(frozen=True)
class _Line:
    """One line of the log as parsed, before it is trusted."""

    number: int
    entry: dict[str, Any] | None
    problem: str | None  # why the line is not a well-formed, self-consistent entry

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def seq(self) -> int | None:
        seq = self.entry.get("seq") if self.entry else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    @property
    def hash(self) -> str | None:
        return str(self.entry["hash"]) if self.ok and self.entry else None

    @property
    def prev(self) -> str | None:
        return str(self.entry["prev_hash"]) if self.ok and self.entry else None


def _parse_line(number: int, raw: bytes) -> _Line:
    try:
        entry = json.loads(raw)
    except ValueError:
        return _Line(number, None, "is not valid JSON")
    if not isinstance(entry, dict):
        return _Line(number, None, "is not a JSON object")
    return _Line(number, entry, _shape_problem(entry) or _content_problem(entry, raw))


def _shape_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with the entry's fields, read one by one, or None."""
    for name in ("v", "seq", "time", "type", "prev_hash", "hash"):
        if name not in entry:
            return f"has no {name!r} field"
    if entry["v"] != FORMAT_VERSION:
        return f"has an unknown format version {entry['v']!r}"
    if not isinstance(entry["seq"], int) or isinstance(entry["seq"], bool) or entry["seq"] < 1:
        return "has no valid seq"
    if not _is_hex64(entry["prev_hash"]) or not _is_hex64(entry["hash"]):
        return "has a malformed hash"
    try:
        parse_time(str(entry["time"]))
    except ValueError:
        return "has a malformed time"
    return None


def _content_problem(entry: dict[str, Any], raw: bytes) -> str | None:
    """Whether the well-shaped entry is the one its hash and bytes say, or None."""
    if entry["hash"] != entry_hash(entry):
        return "does not match its own hash (its content was changed)"
    if canonical(entry) != raw:
        # Same values, different bytes (spacing, key order, a duplicated key that a JSON parser
        # silently collapses): a reader other than this one could see different content.
        return "is not in canonical form (its bytes were changed)"
    return None


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _snapshot(paths: AuditPaths, checkpoints: Path) -> tuple[int, bytes]:
    """(log size, checkpoint file) read at one instant: under a shared lock when possible.

    Writers append a log entry and its checkpoint line under one exclusive lock, so the pair is
    consistent; afterwards the log's first `size` bytes never change while writers only append.
    """
    try:
        fd = os.open(paths.log, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:
                pass  # A read-only copy elsewhere: nobody writes it.
        size = os.fstat(fd).st_size if fd is not None else 0
        try:
            side = checkpoints.read_bytes()
        except FileNotFoundError:
            side = b""
        return size, side
    finally:
        if fd is not None:
            os.close(fd)


def _lines(path: Path, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, complete) for the first `size` bytes of `path`."""
    if size == 0:
        return
    with path.open("rb") as handle:
        remaining = size
        number = 0
        carry = b""
        while remaining > 0:
            chunk = handle.read(min(1 << 20, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            *complete, carry = (carry + chunk).split(b"\n")
            for raw in complete:
                number += 1
                yield number, raw, True
        if carry:
            yield number + 1, carry, False


class _Walk:
    """The state of the front-to-back walk."""

    def __init__(
        self,
        path: Path,
        size: int,
        public_keys: PublicKeys | None,
        anchors: Sequence[Anchor] | None = None,
        limits: tuple[int, float] = (DEFAULT_MAX_UNSIGNED_ENTRIES, DEFAULT_MAX_UNSIGNED_SECONDS),
    ) -> None:
        self.path = path
        self.anchors = anchors
        self.anchored: dict[int, set[str]] = {}
        for anchor in anchors or ():
            self.anchored.setdefault(anchor.to_seq, set()).add(anchor.head_hash)
        self.found: dict[int, str] = {}  # anchored seq -> the hash the log holds there
        self.truncations: list[tuple[int, int, int]] = []  # (seq, lost from, lost to) recorded
        self.limits = limits
        self.range_start = 1
        self.since = 0  # events since the last (anchored) checkpoint
        self.first_unsigned: float | None = None
        self.last_time = 0.0
        self.noted = False
        self.gaps: list[str] = []
        self.size = size
        self.public_keys = public_keys
        self.expected = 1
        self.prev_hash = GENESIS_HASH
        self.last: _Line | None = None  # the last accepted line
        self.last_prev_hash = GENESIS_HASH  # its prev_hash
        self.checkpointed_to = 0
        self.pending: list[str] = []  # hashes of entries checkpointed_to+1 .. expected-1
        self.pending_events: list[bool] = []  # whether each of those is an event (not a checkpoint)
        self.checkpoint_entries: dict[int, str] = {}  # seq -> hash
        self.versions: set[int] = set()
        self.warnings: list[str] = []

    def run(self) -> None:
        for number, raw, complete in _lines(self.path, self.size):
            if not complete:
                self.warnings.append(
                    f"line {number} is incomplete (a write in progress or a crash) and was "
                    "not checked"
                )
                break
            line = _parse_line(number, raw)
            if not line.ok or line.seq != self.expected or line.prev != self.prev_hash:
                raise _classify(self, line)
            assert line.entry is not None and line.hash is not None  # noqa: S101 - narrows a type; an invariant, not a check
            is_checkpoint = line.entry["type"] == CHECKPOINT_TYPE
            if is_checkpoint:
                self._check_checkpoint(line)
            self.pending.append(line.hash)
            self.pending_events.append(not is_checkpoint)
            self._track(line, line.entry, is_checkpoint)
            self.last, self.last_prev_hash = line, self.prev_hash
            self.expected, self.prev_hash = self.expected + 1, line.hash

    def _track(self, line: _Line, entry: dict[str, Any], is_checkpoint: bool) -> None:
        """Count what goes without a checkpoint, and collect the hashes at anchored seqs."""
        seq, digest = int(entry["seq"]), str(entry["hash"])
        moment = parse_time(str(entry["time"])).timestamp()
        self.last_time = moment
        kind = entry["type"]
        if kind in _NOTED_TYPES:
            self.noted = True
        if kind == "audit.truncation_detected":
            lost = (entry.get("lost_from_seq"), entry.get("lost_to_seq"))
            if all(isinstance(n, int) for n in lost):
                self.truncations.append((seq, int(lost[0] or 0), int(lost[1] or 0)))
        if not is_checkpoint:
            self.since += 1
            if self.first_unsigned is None:
                self.first_unsigned = moment
        if seq in self.anchored:
            self.found[seq] = digest
        point = digest in self.anchored.get(seq, ()) if self.anchors is not None else is_checkpoint
        if point:
            problem = self.overdue(moment)
            if problem is not None:
                where = f"seq {self.range_start}..{seq}: {problem}"
                if self.noted:
                    self.warnings.append(f"{where} (the writers recorded why)")
                else:
                    self.gaps.append(where)
            self.range_start, self.since, self.first_unsigned = seq + 1, 0, None
            self.noted = False

    def overdue(self, until: float) -> str | None:
        """What exceeds the limits since the last checkpoint, up to the time `until`, or None."""
        entries, seconds = self.limits
        span = until - self.first_unsigned if self.first_unsigned is not None else 0.0
        if self.since > entries or span > seconds:
            return f"{self.since} events over {span:.0f} s without a checkpoint"
        return None

    def _check_checkpoint(self, line: _Line) -> None:
        entry, seq = line.entry, line.seq
        assert entry is not None and seq is not None  # noqa: S101 - narrows a type; an invariant, not a check
        where = f"checkpoint seq {seq} (line {line.number})"
        try:
            body = CheckpointBody.from_entry(entry)
            signature = str(entry["signature"])
        except (KeyError, TypeError, ValueError):
            raise VerificationFailed(
                "altered", f"{where} lacks its checkpoint fields", seq=seq, line=line.number
            ) from None
        covered = f"seq {body.from_seq}..{body.to_seq}"
        _check_signature(
            self.public_keys,
            body,
            signature,
            entry.get("key_version"),
            f"{where} covering {covered}",
            seq=seq,
            line=line.number,
        )
        self.versions.add(key_version(signature))
        if body.from_seq != self.checkpointed_to + 1 or not body.from_seq <= body.to_seq < seq:
            raise VerificationFailed(
                "forged",
                f"{where} covers {covered}, but the previous checkpoint ended at seq "
                f"{self.checkpointed_to}",
                seq=seq,
                line=line.number,
            )
        hashes = self.pending[: body.to_seq - self.checkpointed_to]
        if hashes[-1] != body.head_hash or merkle_root(hashes) != body.merkle_root:
            raise VerificationFailed(
                "altered",
                f"entries {covered} no longer match the signed {where}: an entry in that range "
                "was changed and the chain after it rehashed",
                seq=body.from_seq,
                line=None,
            )
        self.pending = self.pending[len(hashes) :]
        self.pending_events = self.pending_events[len(hashes) :]
        self.checkpointed_to = body.to_seq
        self.checkpoint_entries[seq] = str(entry["hash"])


def _check_signature(
    public_keys: PublicKeys | None,
    body: CheckpointBody,
    signature: str,
    recorded_version: Any,
    where: str,
    *,
    seq: int | None,
    line: int | None,
) -> None:
    if public_keys is None:
        raise PublicKeyError(
            f"{where} needs the audit key's public keys: pass --public-keys or export them"
        )
    try:
        public_keys.check(body.message(), signature)
        if recorded_version is not None and recorded_version != key_version(signature):
            raise ValueError("its key_version does not match its signature")
    except ValueError as exc:
        raise VerificationFailed(
            "forged",
            f"{where} does not verify: {exc}; the checkpoint is forged or altered",
            seq=seq,
            line=line,
        ) from None


def _classify(walk: _Walk, line: _Line) -> VerificationFailed:  # noqa: C901 - one decision table
    """Tell what happened at the first line that does not continue the chain.

    One decision table, read top to bottom: each branch is one tamper class (inserted, altered,
    reordered, removed) recognised by how the line relates to its neighbours. The branches are
    ordered (an earlier, more specific explanation wins), which splitting them across functions
    would hide; the module docstring says why the file is read a second time here.
    """
    lines = [_parse_line(n, raw) for n, raw, complete in _lines(walk.path, walk.size) if complete]
    i = line.number - 1
    nxt = lines[i + 1] if i + 1 < len(lines) else None
    expected, prev = walk.expected, walk.prev_hash

    def is_next(candidate: _Line | None) -> bool:
        return bool(
            candidate and candidate.ok and candidate.seq == expected and candidate.prev == prev
        )

    here = f"line {line.number}"
    if not line.ok:
        if is_next(nxt):
            return VerificationFailed(
                "inserted",
                f"{here} {line.problem} and is not part of the chain (seq {expected} "
                f"follows at line {line.number + 1})",
                seq=line.seq,
                line=line.number,
            )
        seq = line.seq if line.seq is not None else expected
        return VerificationFailed(
            "altered", f"entry seq {seq} ({here}) {line.problem}", seq=seq, line=line.number
        )

    copies = [c for c in lines if c.ok and c.number != line.number and c.hash == line.hash]
    if copies:
        return VerificationFailed(
            "inserted",
            f"{here} is a copy of entry seq {line.seq} (line {copies[0].number})",
            seq=line.seq,
            line=line.number,
        )

    last = walk.last
    if last is not None and line.seq == expected - 1 and line.prev == walk.last_prev_hash:
        # Two different entries claim the same seq and predecessor: one was inserted. The one
        # the next entry chains to is genuine.
        if nxt is not None and nxt.ok and nxt.prev == line.hash:
            return VerificationFailed(
                "inserted",
                f"line {last.number} (seq {last.seq}) is not part of the chain: "
                f"seq {nxt.seq} (line {nxt.number}) follows the seq {line.seq} at {here}",
                seq=last.seq,
                line=last.number,
            )
        return VerificationFailed(
            "inserted",
            f"{here} is a second entry for seq {line.seq} (line {last.number}) and "
            "is not part of the chain",
            seq=line.seq,
            line=line.number,
        )

    later = next((c for c in lines[i + 1 :] if is_next(c)), None)
    if later is not None:
        assert line.seq is not None  # noqa: S101 - narrows a type; an invariant, not a check
        belongs_elsewhere = line.seq > expected and any(
            c.ok and c.seq == line.seq - 1 and c.hash == line.prev for c in lines
        )
        if belongs_elsewhere:
            return VerificationFailed(
                "reordered",
                f"entry seq {expected} is at line {later.number}, after entry seq "
                f"{line.seq} at {here}",
                seq=expected,
                line=later.number,
            )
        return VerificationFailed(
            "inserted",
            f"{here} (claiming seq {line.seq}) is not part of the chain: seq "
            f"{expected} follows at line {later.number}",
            seq=line.seq,
            line=line.number,
        )

    assert line.seq is not None  # noqa: S101 - narrows a type; an invariant, not a check
    if line.seq > expected:
        if line.prev == prev:
            return VerificationFailed(
                "altered",
                f"entry at {here} claims seq {line.seq} but follows seq "
                f"{expected - 1}: its seq was changed",
                seq=line.seq,
                line=line.number,
            )
        gap = f"seq {expected}" if line.seq == expected + 1 else f"seq {expected}..{line.seq - 1}"
        return VerificationFailed(
            "removed",
            f"entry {gap} is missing: {here} holds seq {line.seq} after seq {expected - 1}",
            seq=expected,
            line=line.number,
        )
    if (
        line.seq == expected
        and last is not None
        and nxt is not None
        and nxt.ok
        and nxt.prev == line.hash
        and nxt.seq == expected + 1
    ):
        return VerificationFailed(
            "altered",
            f"entry seq {last.seq} (line {last.number}) was changed and rehashed: "
            f"seq {expected} ({here}) does not chain to it",
            seq=last.seq,
            line=last.number,
        )
    if line.seq == expected:
        return VerificationFailed(
            "altered",
            f"entry seq {expected} ({here}) does not chain to seq {expected - 1}: "
            "its prev_hash was changed",
            seq=expected,
            line=line.number,
        )
    return VerificationFailed(
        "inserted",
        f"{here} claims seq {line.seq}, already in the chain, and is not part of it",
        seq=line.seq,
        line=line.number,
    )


def _check_checkpoint_file(walk: _Walk, side: bytes, checkpoints: Path) -> None:
    """Every line of the checkpoint file matches a checkpoint in the log, and none is beyond
    its end (which would mean the log's tail was cut)."""
    last_seq = walk.expected - 1
    seen: set[int] = set()
    for number, raw in enumerate(side.split(b"\n"), 1):
        if not raw:
            continue
        where = f"line {number} of {checkpoints.name}"
        try:
            record = json.loads(raw)
            seq, digest = int(record["seq"]), str(record["hash"])
            body = CheckpointBody.from_entry(record)
            signature = str(record["signature"])
        except (ValueError, KeyError, TypeError):
            raise VerificationFailed("altered", f"{where} is not a checkpoint record") from None
        if seq <= last_seq:
            if walk.checkpoint_entries.get(seq) != digest:
                raise VerificationFailed(
                    "altered",
                    f"{where} records checkpoint seq {seq}, which the log does not "
                    "hold: the checkpoint or the log was altered",
                    seq=seq,
                )
            seen.add(seq)
            continue
        _check_signature(
            walk.public_keys, body, signature, record.get("key_version"), where, seq=seq, line=None
        )
        if body.to_seq > last_seq:
            message = f"log ends at seq {last_seq} but checkpoint covers up to seq {body.to_seq}"
        else:
            message = (
                f"log ends at seq {last_seq} but the checkpoint entry seq {seq} (covering "
                f"up to seq {body.to_seq}) was written after it"
            )
        raise VerificationFailed("truncated", message, seq=last_seq + 1)
    missing = sorted(set(walk.checkpoint_entries) - seen)
    if missing:
        walk.warnings.append(
            f"{checkpoints.name} lacks checkpoint(s) seq {', '.join(map(str, missing))} (the next "
            "writer adds a checkpoint lost in a crash)"
        )


def _check_anchors(walk: _Walk, anchors: Sequence[Anchor]) -> int:
    """Every anchor continues the one before and its head is in the log; the last anchored seq."""
    last_seq = walk.expected - 1
    previous: Anchor | None = None
    for number, anchor in enumerate(sorted(anchors, key=lambda a: a.number), 1):
        if anchor.number != number:
            raise VerificationFailed(
                "forged", f"anchor {number} is missing: the next one is anchor {anchor.number}"
            )
        if not (anchor.extends(previous) or anchor.recovers):
            raise VerificationFailed(
                "forged",
                f"anchor {number} (seq {anchor.from_seq}..{anchor.to_seq}) does not continue "
                f"anchor {number - 1}",
            )
        if number == 1 and anchor.recovers:
            walk.warnings.append(f"anchoring began at seq {anchor.from_seq}")
        if walk.found.get(anchor.to_seq) != anchor.head_hash:
            raise _lost(walk, anchor, last_seq)
        previous = anchor
    return previous.to_seq if previous else 0


def _lost(walk: _Walk, anchor: Anchor, last_seq: int) -> VerificationFailed:
    recorded = next((seq for seq, lo, hi in walk.truncations if lo <= anchor.to_seq <= hi), None)
    note = (
        f"; the writers recorded it at seq {recorded} (audit.truncation_detected)"
        if recorded
        else "; no writer recorded it"
    )
    where = f"anchor {anchor.number} (seq {anchor.from_seq}..{anchor.to_seq})"
    if anchor.to_seq > last_seq:
        message = f"log ends at seq {last_seq} but {where} covers up to seq {anchor.to_seq}"
        return VerificationFailed("truncated", message + note, seq=last_seq + 1)
    kind = "truncated" if recorded else "altered"
    return VerificationFailed(
        kind,
        f"entry seq {anchor.to_seq} is not the head anchored by {where}: the history up to it "
        f"was replaced or rewritten{note}",
        seq=anchor.to_seq,
    )


def verify_log(
    log: Path,
    public_keys: PublicKeys | None,
    *,
    checkpoints: Path | None = None,
    anchors: Sequence[Anchor] | None = None,
    max_unsigned_entries: int = DEFAULT_MAX_UNSIGNED_ENTRIES,
    max_unsigned_seconds: float = DEFAULT_MAX_UNSIGNED_SECONDS,
) -> VerifyReport:
    """Verify the chain, every checkpoint, the checkpoint file, the anchors (when given) and the
    checkpoint interval; raise at the first problem.

    Raises `VerificationFailed` (naming the first entry altered, removed, inserted or
    reordered, a forged checkpoint, a tail cut before the last checkpoint or anchor, a history
    that does not hold an anchored head, or `unsigned`/`gap`: more of the log than the limits
    allow without a checkpoint) and `PublicKeyError` when a checkpoint must be checked and
    `public_keys` is None.
    """
    paths = AuditPaths(Path(log))
    side_path = checkpoints or paths.checkpoints
    size, side = _snapshot(paths, side_path)
    walk = _Walk(
        paths.log, size, public_keys, anchors, (max_unsigned_entries, max_unsigned_seconds)
    )
    walk.run()
    _check_checkpoint_file(walk, side, side_path)
    anchored_through = _check_anchors(walk, anchors) if anchors is not None else 0
    if walk.gaps:
        raise VerificationFailed(
            "gap",
            f"{walk.gaps[0]}, and no entry says why (the writers went on silently)",
        )
    overdue = walk.overdue(walk.last_time)
    if overdue is not None:
        what = "anchored checkpoint" if anchors is not None else "checkpoint"
        raise VerificationFailed(
            "unsigned",
            f"the log ends with {overdue} (seq {walk.range_start}..{walk.expected - 1}, no "
            f"{what}): an unsigned history, or one whose checkpoints were removed",
            seq=walk.range_start,
        )
    if walk.checkpoint_entries and not side.strip():
        walk.warnings.append(f"{side_path.name} is empty: a cut tail would go unnoticed")
    fingerprints = (
        {v: public_keys.fingerprint(v) for v in sorted(walk.versions)} if public_keys else {}
    )
    return VerifyReport(
        paths.log,
        walk.expected - 1,
        len(walk.checkpoint_entries),
        walk.checkpointed_to,
        sum(walk.pending_events),
        fingerprints,
        tuple(walk.warnings),
        len(anchors) if anchors is not None else None,
        anchored_through,
    )
