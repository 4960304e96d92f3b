"""Result keys (docs/CONTRACT.md §2): `{function}_{unix_time_ms}_{128 random bits, hex}`.

The records stored under them live in `appliance.store`."""

from __future__ import annotations

import re
import secrets

from .errors import BadRequest

RESULT_KEY_PATTERN = re.compile(
    r"(?P<function>[A-Za-z][A-Za-z0-9_]{0,99})_(?P<ms>\d{1,16})_(?P<rand>[0-9a-f]{32})"
)


def new_result_key(function: str, now_ms: int) -> str:
    """`{function}_{unix_time_ms}_{128 random bits, hex}`."""
    return f"{function}_{now_ms}_{secrets.token_hex(16)}"


def check_result_key(untrusted_key: str) -> str:
    """Return the key if it has the contract's shape, else raise BadRequest."""
    if not isinstance(untrusted_key, str) or not RESULT_KEY_PATTERN.fullmatch(untrusted_key):
        raise BadRequest("key is not a result key", code="invalid_key")
    return untrusted_key
