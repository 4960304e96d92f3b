"""The outcome of a run: one JSON object, the same from the CLI and the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal[
    "ok",
    "compile_error",
    "runtime_error",
    "denied",
    "timeout",
    "memory_limit",
    "output_limit",
    "crashed",
]
STATUSES: frozenset[str] = frozenset(Status.__args__)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Usage:
    """Resources the child used, measured by the parent (never reported by the child)."""

    cpu_ms: int = 0
    wall_ms: int = 0
    max_rss_kb: int = 0


@dataclass(frozen=True)
class Outcome:
    """What happened to one run. `value` is set only for `ok`; `error` for every other status."""

    status: Status
    value: Any = None
    stdout: str = ""
    error: dict[str, str] | None = None
    usage: Usage = field(default_factory=Usage)
    degraded: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The outcome as the contract's JSON object (`degraded` only when layers were off)."""
        body: dict[str, Any] = {
            "status": self.status,
            "value": self.value,
            "stdout": self.stdout,
            "error": self.error,
            "usage": {
                "cpu_ms": self.usage.cpu_ms,
                "wall_ms": self.usage.wall_ms,
                "max_rss_kb": self.usage.max_rss_kb,
            },
        }
        if self.degraded:
            body["degraded"] = list(self.degraded)
        return body


def error(kind: str, message: str) -> dict[str, str]:
    """An error object: a type name and a one-line message, capped in length."""
    return {"type": kind[:100], "message": message[:2000]}


def outcome_from_dict(body: dict[str, Any]) -> Outcome:
    """Rebuild an outcome from the JSON the fork server (a trusted, credential-free peer) sent."""
    usage = body.get("usage") or {}
    return Outcome(
        status=body["status"],
        value=body.get("value"),
        stdout=body.get("stdout", ""),
        error=body.get("error"),
        usage=Usage(
            int(usage.get("cpu_ms", 0)),
            int(usage.get("wall_ms", 0)),
            int(usage.get("max_rss_kb", 0)),
        ),
        degraded=tuple(body.get("degraded", ())),
    )
