"""Per-run resource limits and their validation against the policy's maxima."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._errors import InvalidRequest, LimitNotAllowed

_WHOLE = ("memory_mb", "output_bytes")


def _check_number(name: str, value: Any) -> None:
    """Raise InvalidRequest unless `value` is an exact, positive, finite int or float.

    Exact types only (no bool, no subclass); an int is compared as an int, never converted to a
    float, so that `10**400` is a number too large for the policy, not an OverflowError.
    """
    kind = type(value)
    if kind is not int and kind is not float:
        raise InvalidRequest(f"limit {name} must be a number")
    if (kind is float and not math.isfinite(value)) or value <= 0:
        raise InvalidRequest(f"limit {name} must be a positive finite number")


@dataclass(frozen=True)
class Limits:
    """What one run may use. Defaults follow Judge0's (5 s CPU, 10 s wall, 128 MB)."""

    cpu_seconds: float = 5
    wall_seconds: float = 10
    memory_mb: int = 128
    output_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _check_number(f.name, value)
            if f.name in _WHOLE and type(value) is not int:
                raise InvalidRequest(f"limit {f.name} must be a whole number")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], defaults: Limits | None = None) -> Limits:
        """Build limits from untrusted JSON, filling gaps from `defaults`; raises InvalidRequest."""
        if not isinstance(raw, Mapping):
            raise InvalidRequest("limits must be a JSON object")
        base = (defaults or cls()).to_dict()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidRequest(f"unknown limit {', '.join(map(str, unknown))}")
        for name, value in raw.items():
            _check_number(name, value)
            if name in _WHOLE:
                if value != int(value):
                    raise InvalidRequest(f"limit {name} must be a whole number")
                value = int(value)
            base[name] = value
        return cls(**base)

    def check_within(self, maxima: Limits) -> None:
        """Raise LimitNotAllowed if any limit exceeds the policy's maximum."""
        for f in fields(self):
            if getattr(self, f.name) > getattr(maxima, f.name):
                raise LimitNotAllowed(
                    f"limit {f.name}={getattr(self, f.name)} exceeds the policy maximum "
                    f"{getattr(maxima, f.name)}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The limits as a JSON object."""
        # Not dataclasses.asdict, which deep-copies every field: this runs twice per run.
        return {f.name: getattr(self, f.name) for f in fields(self)}
