"""Canonical encoding, entry hashes and the RFC 9162 Merkle tree hash."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from appliance.audit import canonical, entry_hash, merkle_root
from appliance.audit._format import format_time, parse_time


def _reference_mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1, written as the RFC writes it (recursive)."""
    n = len(leaves)
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(
        b"\x01" + _reference_mth(leaves[:k]) + _reference_mth(leaves[k:])
    ).digest()


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70))
def test_merkle_root_is_rfc9162(leaves: list[bytes]) -> None:
    assert merkle_root([leaf.hex() for leaf in leaves]) == _reference_mth(leaves).hex()


def test_merkle_root_small_trees_by_hand() -> None:
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    la, lb, lc = (hashlib.sha256(b"\x00" + x).digest() for x in (a, b, c))
    node = hashlib.sha256(b"\x01" + la + lb).digest()
    assert merkle_root([a.hex()]) == la.hex()
    assert merkle_root([a.hex(), b.hex()]) == node.hex()
    assert (
        merkle_root([a.hex(), b.hex(), c.hex()]) == hashlib.sha256(b"\x01" + node + lc).hexdigest()
    )


def test_canonical_is_sorted_compact_utf8() -> None:
    assert canonical({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_entry_hash_ignores_only_the_hash_field() -> None:
    entry = {"seq": 1, "prev_hash": "0" * 64}
    assert entry_hash(entry) == entry_hash({**entry, "hash": "whatever"})
    assert entry_hash(entry) != entry_hash({**entry, "seq": 2})
    assert entry_hash(entry) == hashlib.sha256(canonical(entry)).hexdigest()


def test_time_round_trip() -> None:
    text = format_time(1_700_000_000.25)
    assert text == "2023-11-14T22:13:20.250000Z"
    assert parse_time(text).timestamp() == 1_700_000_000.25
