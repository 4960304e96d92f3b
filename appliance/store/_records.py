"""Reading the JSON records the store keeps in Redis: exact shapes, or `RecordLost`.

Threat (red team of issue 12, item 5). Whoever may write a key (the API's or the worker's Redis
user, or an operator by hand) may put anything there: `{"v":1}` or `[]` at `result:<key>`,
`junk` at `pending:<key>`. Read with `json.loads(raw)["client"]`, such a value raised a
JSONDecodeError, KeyError or TypeError out of the store: the API answered 500 and the worker
crashed on the job. Every reader of a stored JSON record goes through `load()` and the typed
field readers here, which return the value the appliance wrote or raise `RecordLost` (410, a
defined error that the API and the worker handle), and log which kind of record was refused
and why (never its content). A value of the wrong Redis type (WRONGTYPE) is translated the same
way at the store's seam (`_errors`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from typing import Any

from ..errors import RecordLost

log = logging.getLogger("appliance.store")


def lost(kind: str, why: str, code: str = "record_lost") -> RecordLost:
    """The error for a record of `kind` that is not one the appliance writes; logs why."""
    log.warning("refused a stored %s record: %s", kind, why)
    return RecordLost(f"a stored {kind} record is not one the appliance writes", code=code)


def load(raw: bytes | str, kind: str, code: str = "record_lost") -> dict[str, Any]:
    """The JSON object in `raw`; RecordLost when it is not valid JSON or not an object."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError.
        raise lost(kind, f"not JSON ({type(exc).__name__})", code) from None
    if not isinstance(value, dict):
        raise lost(kind, f"a JSON {type(value).__name__}, not an object", code)
    return value


def text(
    record: dict[str, Any],
    field: str,
    kind: str,
    code: str = "record_lost",
    *,
    default: str | None = None,
    one_of: Collection[str] | None = None,
) -> str:
    """The string `field` of `record` (one of `one_of` when given); RecordLost otherwise."""
    value = record.get(field, default)
    if type(value) is not str:
        raise lost(kind, f"field {field!r} is not a string", code)
    if one_of is not None and value not in one_of:
        raise lost(kind, f"field {field!r} has an unknown value", code)
    return value


def count(record: dict[str, Any], field: str, kind: str, *, default: int = 0) -> int:
    """The non-negative integer `field` of `record` (never a bool); RecordLost otherwise."""
    value = record.get(field, default)
    if type(value) is not int or value < 0:
        raise lost(kind, f"field {field!r} is not a non-negative integer")
    return value
