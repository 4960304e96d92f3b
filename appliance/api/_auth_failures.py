"""Unauthenticated failures: each one recorded, without one synced audit entry per request.

An unauthenticated caller once bought a synced audit entry with every 401 (issue 12, finding 10:
2,000 requests, 2,020 entries). The same holds for the refusals that come before a signature
can be checked at all (a body over the cap, a bad Content-Length): they are counted here too,
their sample being a `submission.rejected` entry. Every failure is still recorded (CONTRACT
§4), as follows:

- The first unauthenticated failure of a *source* in a *window* gets its own `auth.failed`
  entry at once: the sample, with the code, the audit-only reason, the claimed key id, the
  route and the request id.
- The source's further failures in that window are counted (per code, or per reason where the
  client was told less); when the window ends, one `auth.failures` entry records the source,
  the window, the count and the counts per code. A window that ends is written by a background
  flush, and `close()` (the API's shutdown) writes every open one.

A source is the remote address; a failure that names the key id of an enabled client whose key
did not verify it (`reason="wrong_key"`), or whose registry entry does not parse
(`"invalid_registry_entry"`), is counted apart, under that key id, so a flood of
junk from one address cannot hide an attempt on a real client among its counts. Failures whose
signature verified (a replayed nonce) are never aggregated: they are not unauthenticated, and
whoever sends them holds a key. At most `max_sources` sources are tracked per window; failures
of any further source are counted under `other`, so the entries a window costs stay bounded
whatever the number of addresses.

Thread-safe: the API's thread pool calls `refused()` concurrently; entries are written outside
the lock.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..audit import AuditError, AuditSink, EventType

log = logging.getLogger("appliance.api")

#: Seconds a source's window lasts, counted from its first failure (the default of
#: `APPLIANCE_AUTH_FAILURE_WINDOW_SECONDS`): short, so that a flood shows in the log soon.
WINDOW_SECONDS = 10.0
#: Sources tracked at once; the failures of more are counted under `OVERFLOW`.
MAX_SOURCES = 1024
OVERFLOW = "other"


#: Reasons that name a registered key id (its key did not verify, or its entry does not parse):
#: counted apart under that key id. Only registered key ids can have them, so they stay bounded.
_REGISTERED_KEY = frozenset({"wrong_key", "invalid_registry_entry"})


@dataclass(frozen=True)
class Failure:
    """One unauthenticated request refused, as the audit log may hold it (nothing of its body)."""

    code: str
    source: str
    route: str
    status: int = 401
    reason: str | None = None
    claimed_keyid: str | None = None
    request_id: str | None = None

    def bucket(self) -> tuple[str, str | None]:
        """What it is counted under: its source, and the real client's key id it named."""
        return self.source, self.claimed_keyid if self.reason in _REGISTERED_KEY else None


@dataclass
class _Window:
    started: float
    last: float
    counts: Counter[str] = field(default_factory=Counter)


class AuthFailures:
    """Records unauthenticated failures: the first per source and window alone, the rest
    counted into one entry when the window ends."""

    def __init__(
        self,
        audit: AuditSink,
        clock: Callable[[], float],
        window_seconds: float = WINDOW_SECONDS,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self.audit = audit
        self.clock = clock
        self.window_seconds = window_seconds
        self.max_sources = max_sources
        # In order of their windows' start: the ended ones are at the front.
        self._open: OrderedDict[tuple[str, str | None], _Window] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def refused(self, failure: Failure) -> None:
        """Record one failure: its own entry if it opens a window, else a count."""
        now = self.clock()
        with self._lock:
            ended = self._take_ended(now)
            key = failure.bucket()
            if key not in self._open and len(self._open) >= self.max_sources:
                key = (OVERFLOW, None)
            window = self._open.get(key)
            if window is None:
                self._open[key] = _Window(now, now)
            else:
                window.counts[failure.reason or failure.code] += 1
                window.last = now
        self._write_aggregates(ended)
        if window is None:
            self._write(*_single(failure))

    def flush_ended(self) -> None:
        """Write the windows that have ended (the background flush; tests call it)."""
        with self._lock:
            ended = self._take_ended(self.clock())
        self._write_aggregates(ended)

    def start(self) -> None:
        """Flush ended windows on a daemon thread until `close()`."""
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._run, name="auth-failures-flush", daemon=True
            )
            self._flusher.start()

    def close(self) -> None:
        """Stop the flush and write every open window, ended or not (the API's shutdown)."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=10)
        with self._lock:
            every = list(self._open.items())
            self._open.clear()
        self._write_aggregates(every)

    def _run(self) -> None:
        while not self._stop.wait(min(self.window_seconds / 4, 5.0)):
            self.flush_ended()

    def _take_ended(self, now: float) -> list[tuple[tuple[str, str | None], _Window]]:
        ended = []
        while self._open:
            key, window = next(iter(self._open.items()))
            if now - window.started < self.window_seconds:
                break
            del self._open[key]
            ended.append((key, window))
        return ended

    def _write_aggregates(self, windows: list[tuple[tuple[str, str | None], _Window]]) -> None:
        for (source, keyid), window in windows:
            if window.counts:
                self._write(
                    EventType.AUTH_FAILURES,
                    {
                        "remote_addr": source,
                        "claimed_keyid": keyid,
                        "count": sum(window.counts.values()),
                        "codes": dict(window.counts),
                        "from_time": _time(window.started),
                        "to_time": _time(window.last),
                    },
                )

    def _write(self, kind: EventType, fields: dict[str, Any]) -> None:
        try:
            self.audit.record(kind, **fields)
        except AuditError:
            log.warning("could not audit unauthenticated failures", extra={"type": str(kind)})


def _single(failure: Failure) -> tuple[EventType, dict[str, Any]]:
    common = {
        "code": failure.code,
        "http_status": failure.status,
        "request_id": failure.request_id,
        "remote_addr": failure.source,
    }
    if failure.status != 401:
        # A body refused before its signature could be checked (over the cap, a bad
        # Content-Length): a rejected submission of nobody known.
        return EventType.SUBMISSION_REJECTED, common
    return EventType.AUTH_FAILED, {
        **common,
        "reason": failure.reason,
        "claimed_keyid": failure.claimed_keyid,
        "route": failure.route,
    }


def _time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
