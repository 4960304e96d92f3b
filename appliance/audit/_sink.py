"""The protocol callers depend on, and an in-memory stub of it for unit tests of callers."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Protocol

from ._events import EventType, make_event
from ._writer import AuditRecord


class AuditSink(Protocol):
    """Where the API and the worker send audit events (`AuditLog` in services)."""

    def record(self, event_type: EventType | str, /, **fields: Any) -> AuditRecord:
        """Validate and durably record one event."""
        ...


class UnsafeMemoryAuditSink:
    """An `AuditSink` that keeps validated events in a list: no file, no chain, no signature.

    For unit tests of code that records events; the same validation as `AuditLog` applies, so a
    field refused here is refused in production too.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._seq = itertools.count(1)

    def record(self, event_type: EventType | str, /, **fields: Any) -> AuditRecord:
        """Validate the event and keep its stored fields (digests in place of plaintext)."""
        event = make_event(event_type, **fields)
        stored = {
            "type": str(event.type),
            **event.fields,
            **{name: digest.hex() for name, digest in event.blind.items()},
        }
        self.events.append(stored)
        seq = next(self._seq)
        return AuditRecord(seq, hashlib.sha256(repr(stored).encode()).hexdigest(), "")

    def of_type(self, event_type: EventType | str) -> list[dict[str, Any]]:
        """The recorded events of one type."""
        return [e for e in self.events if e["type"] == str(EventType(event_type))]
