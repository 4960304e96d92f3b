"""Anchors: every checkpoint's head, kept where no writer of the log can rewrite it.

A signed checkpoint proves only that someone allowed to use the audit key signed it, and the API,
the worker and the operator all may (issue 12, finding 7). So each checkpoint is also written as
a new, numbered entry of an append-only store: in OpenBao, a KV v2 secret
`kv/appliance/audit/anchors/<number>` that the services' policies may *create* but never update
or delete (KV v2 tells the two apart by its existence check: a write to an existing path needs
`update`; checked against a real `bao`), written with check-and-set `cas=0` as well. Whoever
rewrites the log afterwards cannot rewrite its anchors, and `verify_log` compares the two.

Anchors are numbered 1, 2, 3, ... and each continues the one before it: its `from_seq` is the
previous anchor's `to_seq + 1`. The one exception is an anchor with `recovers` set, written after
a writer found its log cut and recorded that in the log (`audit.truncation_detected`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..errors import ApplianceError, DependencyUnavailable, NotFound
from ._errors import AuditError, AuditUnavailable
from ._format import CheckpointBody

#: Where the anchors live in the KV v2 mount (policies/api.hcl, worker.hcl, operator.hcl).
ANCHOR_PATH = "appliance/audit/anchors"
_NAME = re.compile(r"[0-9]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


class AnchorConflict(AuditError):
    """Raised when an anchor of that number exists already (made by another writer, or forged)."""

    code = "audit_anchor_conflict"

    def __init__(self, existing: Anchor | None, message: str) -> None:
        super().__init__(message)
        self.existing = existing


@dataclass(frozen=True)
class Anchor:
    """One anchored checkpoint: entries `from_seq..to_seq` ending in the entry `head_hash`."""

    number: int
    from_seq: int
    to_seq: int
    head_hash: str
    merkle_root: str
    signed_at: str
    signature: str
    recovers: bool = False  # written after a recorded truncation: does not continue the last one

    @classmethod
    def of(cls, number: int, body: CheckpointBody, signature: str, *, recovers: bool) -> Anchor:
        """The anchor of a signed checkpoint body."""
        return cls(
            number,
            body.from_seq,
            body.to_seq,
            body.head_hash,
            body.merkle_root,
            body.signed_at,
            signature,
            recovers,
        )

    def extends(self, previous: Anchor | None) -> bool:
        """Whether this anchor continues `previous` (None: there is none; it starts the log)."""
        return self.from_seq == (previous.to_seq if previous else 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """The stored document."""
        return asdict(self)

    @classmethod
    def parse(cls, untrusted: Mapping[str, Any]) -> Anchor:
        """An anchor from a stored document; ValueError when malformed."""
        try:
            anchor = cls(
                number=_positive(untrusted["number"]),
                from_seq=_positive(untrusted["from_seq"]),
                to_seq=_positive(untrusted["to_seq"]),
                head_hash=str(untrusted["head_hash"]),
                merkle_root=str(untrusted["merkle_root"]),
                signed_at=str(untrusted["signed_at"]),
                signature=str(untrusted["signature"]),
                recovers=bool(untrusted.get("recovers", False)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed anchor: {exc}") from None
        if not (_HEX64.fullmatch(anchor.head_hash) and anchor.from_seq <= anchor.to_seq):
            raise ValueError("malformed anchor: bad head_hash or range")
        return anchor


def _positive(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TypeError(f"{value!r} is not a positive integer")
    return value


@runtime_checkable
class AnchorStore(Protocol):
    """An append-only, numbered store of anchors: create, never update or delete."""

    def create(self, anchor: Anchor) -> None:
        """Store `anchor` under its number; AnchorConflict if that number exists."""
        ...

    def get(self, number: int) -> Anchor | None:
        """The anchor of that number, or None."""
        ...

    def latest(self) -> Anchor | None:
        """The anchor of the highest number, or None when there is none."""
        ...

    def all(self) -> list[Anchor]:
        """Every anchor, by number."""
        ...


class UnsafeMemoryAnchorStore:
    """An `AnchorStore` in a dict: for unit tests only (anyone holding it may call `unsafe_*`)."""

    def __init__(self) -> None:
        self._anchors: dict[int, Anchor] = {}

    def create(self, anchor: Anchor) -> None:
        """Store `anchor` unless its number is taken."""
        existing = self._anchors.get(anchor.number)
        if existing is not None:
            raise AnchorConflict(existing, f"anchor {anchor.number} exists")
        self._anchors[anchor.number] = anchor

    def get(self, number: int) -> Anchor | None:
        """The anchor of that number, or None."""
        return self._anchors.get(number)

    def latest(self) -> Anchor | None:
        """The anchor of the highest number, or None."""
        return self._anchors[max(self._anchors)] if self._anchors else None

    def all(self) -> list[Anchor]:
        """Every anchor, by number."""
        return [self._anchors[n] for n in sorted(self._anchors)]

    def unsafe_remove(self, number: int) -> None:
        """What no real store allows (the tests' time machine)."""
        del self._anchors[number]


class _SessionLike(Protocol):
    def call(self, fn: Callable[[Any], T]) -> T: ...


class VaultAnchorStore:
    """Anchors in OpenBao's KV v2 (`kv/appliance/audit/anchors/<12-digit number>`).

    `session` is an `appliance.vault.VaultSession`: a service's AppRole (create and read), or the
    operator's token (read and list).
    """

    def __init__(self, session: _SessionLike, mount: str = "kv", path: str = ANCHOR_PATH) -> None:
        self.session = session
        self.mount = mount
        self.path = path

    def _key(self, number: int) -> str:
        return f"{self.path}/{number:012d}"

    def create(self, anchor: Anchor) -> None:
        """Create the anchor's secret with `cas=0`; AnchorConflict if it exists."""
        document = anchor.as_dict()
        try:
            self.session.call(
                lambda c: c.secrets.kv.v2.create_or_update_secret(
                    path=self._key(anchor.number), secret=document, cas=0, mount_point=self.mount
                )
            )
        except NotFound as exc:
            raise AuditUnavailable(f"cannot anchor a checkpoint: {exc}") from exc
        except ApplianceError as exc:
            # A create-only policy answers 403 for an existing path, cas=0 answers 400: either
            # way, look at what is there.
            existing = self._read(anchor.number)
            if existing is None:
                raise AuditUnavailable(f"cannot anchor a checkpoint: {exc}") from exc
            raise AnchorConflict(existing, f"anchor {anchor.number} exists") from exc

    def _read(self, number: int) -> Anchor | None:
        try:
            response = self.session.call(
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=self._key(number), mount_point=self.mount, raise_on_deleted_version=True
                )
            )
        except NotFound:
            return None
        except DependencyUnavailable:
            raise
        except ApplianceError as exc:
            raise AuditUnavailable(f"cannot read audit anchor {number}: {exc}") from exc
        try:
            return Anchor.parse(response["data"]["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AuditUnavailable(f"audit anchor {number} is malformed: {exc}") from exc

    def get(self, number: int) -> Anchor | None:
        """The anchor of that number, or None."""
        return self._read(number)

    def _numbers(self) -> list[int]:
        try:
            response = self.session.call(
                lambda c: c.secrets.kv.v2.list_secrets(path=self.path, mount_point=self.mount)
            )
        except NotFound:
            return []
        except DependencyUnavailable:
            raise
        except ApplianceError as exc:
            raise AuditUnavailable(f"cannot list the audit anchors: {exc}") from exc
        return sorted(int(k) for k in response["data"]["keys"] if _NAME.fullmatch(k))

    def latest(self) -> Anchor | None:
        """The anchor of the highest number (one list and one read), or None."""
        numbers = self._numbers()
        return self._read(numbers[-1]) if numbers else None

    def all(self) -> list[Anchor]:
        """Every anchor, by number (one list, one read each)."""
        found = [self._read(n) for n in self._numbers()]
        return [a for a in found if a is not None]
