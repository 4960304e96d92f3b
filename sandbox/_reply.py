"""The child's reply: three length-prefixed parts, each checked against its cap before parsing.

After its isolation marker (see `_child.ISOLATED`) a child writes exactly three frames (the
4-byte big-endian length of `_framing`, then the bytes):

1. a header, JSON: `{"status": ..., "error": null | {"type": str, "message": str}}`;
2. the value, as the JSON text the child encoded (empty unless the status is `ok`);
3. stdout, as UTF-8 (with lone surrogates passed through), not JSON-escaped.

Everything in it is untrusted. The parent reads at most `raw_cap(output_bytes)` bytes, then
checks each part's size against the run's cap before it parses anything: the value and stdout
may each hold `output_bytes`, the header 64 KiB. Parsing JSON costs the parent about twenty
times its size in memory for the smallest values (`[],` is three bytes and a list object), so
the value's containers are counted (a fast scan of its bytes) and bounded before it is parsed.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from ._outcome import STATUSES

_LENGTH = struct.Struct(">I")
#: The largest header a child may send (a status and an error of at most 2100 characters).
HEADER_LIMIT = 64 * 1024
#: The most arrays and objects a returned value may hold (a list of a million dicts is fine).
MAX_VALUE_CONTAINERS = 1_000_000
#: Deepest nesting accepted in a returned value.
MAX_VALUE_DEPTH = 100


class ReplyTooLarge(Exception):
    """Raised when a part of a reply is over its cap: the run's outcome is `output_limit`."""


def raw_cap(output_bytes: int) -> int:
    """The most bytes of reply worth reading for a run with this output cap."""
    return 2 * output_bytes + HEADER_LIMIT + 3 * _LENGTH.size


def encode(status: str, error: dict[str, str] | None, value_json: str, stdout: str) -> bytes:
    """The reply a child sends (`value_json` is already JSON text, empty unless `ok`)."""
    parts = (
        json.dumps({"status": status, "error": error}).encode(),
        value_json.encode("utf-8", "surrogatepass"),
        stdout.encode("utf-8", "surrogatepass"),
    )
    return b"".join(_LENGTH.pack(len(part)) + part for part in parts)


def split(untrusted: bytes | memoryview) -> tuple[bytes, bytes, bytes] | None:
    """The three parts of a whole reply; None when it is not exactly three frames."""
    view = memoryview(untrusted)
    parts: list[bytes] = []
    for _ in range(3):
        if len(view) < _LENGTH.size:
            return None
        (size,) = _LENGTH.unpack(view[: _LENGTH.size])
        view = view[_LENGTH.size :]
        if size > len(view):
            return None
        parts.append(bytes(view[:size]))
        view = view[size:]
    if len(view):
        return None
    return parts[0], parts[1], parts[2]


def decode(untrusted: bytes | memoryview, output_bytes: int) -> dict[str, Any] | None:
    """The reply as an outcome's fields; None when malformed; ReplyTooLarge when over a cap."""
    parts = split(untrusted)
    if parts is None:
        return None
    header, value_json, stdout_bytes = parts
    if len(header) > HEADER_LIMIT:
        return None
    if len(value_json) > output_bytes or len(stdout_bytes) > output_bytes:
        raise ReplyTooLarge("a part of the reply is over the run's output cap")
    head = _json(header)
    if not _well_formed_header(head):
        return None
    status = head["status"]
    value: Any = None
    if status == "ok":
        if value_json.count(b"[") + value_json.count(b"{") > MAX_VALUE_CONTAINERS:
            raise ReplyTooLarge("the returned value holds too many arrays and objects")
        value = _json(value_json)
        if value is _MALFORMED:
            return None
    elif value_json:
        return None
    try:
        stdout = stdout_bytes.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    return {"status": status, "value": value, "stdout": stdout, "error": head["error"]}


_MALFORMED = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e999 parses to inf, which no JSON encoder may emit again.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _json(untrusted: bytes) -> Any:
    try:
        return json.loads(untrusted, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError, UnicodeDecodeError, MemoryError):
        return _MALFORMED


def _well_formed_header(head: Any) -> bool:
    if type(head) is not dict or set(head) != {"status", "error"}:
        return False
    if head["status"] not in STATUSES:
        return False
    err = head["error"]
    if head["status"] == "ok":
        return err is None
    return (
        type(err) is dict
        and set(err) == {"type", "message"}
        and all(type(v) is str for v in err.values())
    )


def check_depth(value: Any) -> bool:
    """Whether a parsed value nests no deeper than MAX_VALUE_DEPTH."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_VALUE_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True
