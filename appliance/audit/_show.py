"""Reading the audit log for people and for SIEMs: filters, a table, JSON Lines.

`show` does not verify anything (that is `verify`'s job); it reads what is there, skips lines that
are not entries (and says how many), and never prints a field outside the entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ._format import parse_time

_RELATIVE = re.compile(r"(?P<count>\d{1,9})(?P<unit>[smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A moment from `15m`, `2h`, `7d` (before `now`) or an ISO-8601 time (UTC if no zone).

    Raises ValueError for anything else.
    """
    text = text.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        delta = timedelta(**{_UNITS[match["unit"]]: int(match["count"])})
        return (now or datetime.now(UTC)) - delta
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30s, 15m, 2h, 7d, 1w) nor an ISO-8601 time"
        ) from None


@dataclass(frozen=True)
class Filters:
    """Which entries to show; None matches everything."""

    since: datetime | None = None
    client: str | None = None
    status: str | None = None
    function: str | None = None
    type: str | None = None

    def match(self, entry: dict[str, Any]) -> bool:
        """Whether `entry` passes every filter (`type` also matches a prefix: `submission`)."""
        for name in ("client", "status", "function"):
            wanted = getattr(self, name)
            if wanted is not None and entry.get(name) != wanted:
                return False
        kind = str(entry.get("type", ""))
        if self.type is not None and kind != self.type and not kind.startswith(self.type + "."):
            return False
        if self.since is not None:
            try:
                if parse_time(str(entry.get("time"))) < self.since:
                    return False
            except ValueError:
                return False
        return True


@dataclass
class Reading:
    """Entries read from a log, and how many lines were not entries."""

    entries: list[dict[str, Any]]
    skipped: int = 0


def read_entries(path: Path) -> Iterator[dict[str, Any] | None]:
    """Each line of the log as an entry, or None when it is not one."""
    with path.open("rb") as handle:
        for raw in handle:
            try:
                entry = json.loads(raw)
            except ValueError:
                yield None
                continue
            yield entry if isinstance(entry, dict) else None


def select(path: Path, filters: Filters, limit: int | None = None) -> Reading:
    """The entries of `path` that pass `filters`; with `limit`, only the last `limit` of them."""
    reading = Reading([])
    for entry in read_entries(path):
        if entry is None:
            reading.skipped += 1
        elif filters.match(entry):
            reading.entries.append(entry)
    if limit is not None:
        reading.entries = reading.entries[-limit:] if limit > 0 else []
    return reading


def to_json_lines(entries: Iterable[dict[str, Any]]) -> str:
    """One compact JSON object per line, keys sorted: what a SIEM ingests."""
    return "".join(
        json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"
        for e in entries
    )


_COLUMNS = ("SEQ", "TIME", "TYPE", "CLIENT", "FUNCTION", "STATUS", "DETAIL")
_WIDTHS = {"CLIENT": 16, "FUNCTION": 20, "STATUS": 14}


def _detail(entry: dict[str, Any]) -> str:
    parts = []
    for name in ("code", "reason", "http_status", "task_id", "result_key", "remote_addr"):
        if name in entry:
            parts.append(f"{name}={entry[name]}")
    if "usage" in entry and isinstance(entry["usage"], dict):
        parts.append("usage=" + ",".join(f"{k}:{v}" for k, v in sorted(entry["usage"].items())))
    if "module_sha256" in entry:
        parts.append(f"module={str(entry['module_sha256'])[:12]}")
    if entry.get("type") == "checkpoint":
        parts.append(
            f"seq {entry.get('from_seq')}..{entry.get('to_seq')} key v{entry.get('key_version')}"
        )
    if "key_name" in entry or "credential" in entry:
        parts.append(str(entry.get("key_name") or entry.get("credential")))
    return " ".join(parts)


def _printable(text: str) -> str:
    # A tampered log may hold terminal escape sequences: never send them to a terminal.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(entries: list[dict[str, Any]]) -> str:
    """A fixed-width table for a person reading a terminal."""
    rows: list[tuple[str, ...]] = []
    for e in entries:
        when = str(e.get("time", ""))
        rows.append(
            (
                str(e.get("seq", "")),
                when[:19].replace("T", " ") + ("Z" if when else ""),
                str(e.get("type", "")),
                _clip(str(e.get("client", "-")), _WIDTHS["CLIENT"]),
                _clip(str(e.get("function", "-")), _WIDTHS["FUNCTION"]),
                _clip(str(e.get("status", "-")), _WIDTHS["STATUS"]),
                _detail(e),
            )
        )
    rows = [tuple(_printable(v) for v in r) for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(_COLUMNS)]
    widths[-1] = 0  # the last column is not padded
    lines = ["  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"
