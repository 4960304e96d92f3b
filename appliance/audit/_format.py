"""The byte-level format of the audit log: canonical JSON, entry hashes, Merkle roots, time.

Everything that a verifier must recompute bit for bit lives here, so that the writer and the
verifier cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: Format version, written in every entry as `v`.
FORMAT_VERSION = 1

#: `prev_hash` of the first entry (seq 1).
GENESIS_HASH = "0" * 64

#: Domain separation of what the audit key signs: nothing else signed by the key can pass for a
#: checkpoint.
CHECKPOINT_CONTEXT = "appliance.audit.checkpoint.v1"

CHECKPOINT_TYPE = "checkpoint"


def canonical(value: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8, no NaN (what every hash is taken over)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical encoding of `entry` without its `hash` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def encode_entry(entry: Mapping[str, Any]) -> bytes:
    """The exact line written for a sealed entry (canonical JSON and a newline)."""
    return canonical(entry) + b"\n"


def _leaf(entry_hash_hex: str) -> bytes:
    return hashlib.sha256(b"\x00" + bytes.fromhex(entry_hash_hex)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(entry_hashes: Sequence[str]) -> str:
    """RFC 9162 Merkle Tree Hash (hex) over entry hashes as leaves.

    Leaf = SHA-256(0x00 || entry hash bytes), node = SHA-256(0x01 || left || right); the left
    subtree of n leaves holds the largest power of two below n. Folding level by level and
    carrying an odd last node up unchanged builds exactly that tree.
    """
    if not entry_hashes:
        return hashlib.sha256(b"").hexdigest()
    level = [_leaf(h) for h in entry_hashes]
    while len(level) > 1:
        paired = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0].hex()


@dataclass(frozen=True)
class CheckpointBody:
    """What a checkpoint attests: entries `from_seq..to_seq`, their chain head and Merkle root."""

    from_seq: int
    to_seq: int
    head_hash: str
    merkle_root: str
    signed_at: str

    def message(self) -> bytes:
        """The exact bytes the audit key signs."""
        return canonical(
            {
                "context": CHECKPOINT_CONTEXT,
                "from_seq": self.from_seq,
                "to_seq": self.to_seq,
                "head_hash": self.head_hash,
                "merkle_root": self.merkle_root,
                "signed_at": self.signed_at,
            }
        )

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> CheckpointBody:
        """The body recorded in a checkpoint entry (or a checkpoint-file line)."""
        return cls(
            from_seq=int(entry["from_seq"]),
            to_seq=int(entry["to_seq"]),
            head_hash=str(entry["head_hash"]),
            merkle_root=str(entry["merkle_root"]),
            signed_at=str(entry["signed_at"]),
        )


def format_time(epoch: float) -> str:
    """ISO-8601 UTC with microseconds and `Z`, e.g. `2025-01-31T12:00:00.000001Z`."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """An aware datetime from an entry's `time` (ValueError if it is not ISO-8601)."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class AuditPaths:
    """The files of one audit log, all in the log's directory."""

    log: Path

    @property
    def checkpoints(self) -> Path:
        """Signed checkpoints, one per line: shows a tail cut before the last checkpoint."""
        return self.log.with_name(f"{self.log.stem}.checkpoints.jsonl")

    @property
    def checkpoint_lock(self) -> Path:
        """Taken (non-blocking) by the one process that signs the next checkpoint."""
        return self.log.with_name(f"{self.log.stem}.checkpoint.lock")

    @property
    def digest_key(self) -> Path:
        """The local key of the keyed digests of arguments and results (0600)."""
        return self.log.with_name(f"{self.log.stem}.digest.key")

    @property
    def public_keys(self) -> Path:
        """The exported public keys of the audit signing key, for offline verification."""
        return self.log.with_name(f"{self.log.stem}-pubkeys.json")
