"""Per-run resource limits and their validation against the policy's maxima."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._errors import InvalidRequest, LimitNotAllowed

_WHOLE = ("memory_mb", "output_bytes")


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
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"limit {f.name} must be a number")
            if not math.isfinite(value) or value <= 0:
                raise InvalidRequest(f"limit {f.name} must be a positive finite number")
            if f.name in _WHOLE and not isinstance(value, int):
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
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"limit {name} must be a number")
            if not math.isfinite(value) or value <= 0:
                raise InvalidRequest(f"limit {name} must be a positive finite number")
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
