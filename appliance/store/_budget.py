"""Per-client byte budgets of stored results (issue 12, finding 8: one client at its default
rate could hold about 7.6 GB of results in Redis).

How the bytes are counted: every write of a sealed result also writes its size into the
client's `storage:<keyid>` hash, in the same transaction (`_results._put`), so a result and its
bytes appear together. They count for as long as the `result:` key exists: its expiry and its
deletion (`DELETE`, revocation of a finished job) release them with no second write and no clock.
Reading the use (`ResultStore.storage_use`) drops the entries whose result is gone. The check on
each submission (`storage_over`) first adds up the recorded sizes, an upper bound: within the
budget that one read decides, and the gone entries are swept only when it does not, or when the
hash has doubled since its last sweep (issue 16: no PTTL per stored result on every submission).

How the budget is enforced: a submission is refused (`429 storage_quota`) while the client's
stored bytes are over its budget, before it is counted against the rate limits; `Retry-After`
is when enough of its results will have expired to bring it back under. Jobs accepted before
the budget filled still store their results, so a client can go over by what its jobs in flight
produce; Redis's `maxmemory` with `noeviction` bounds the whole (see SECURITY.md, "Redis memory").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ..errors import StorageQuotaExceeded


@dataclass(frozen=True)
class StoredBytes:
    """One stored result of a client: its size in Redis and the time until it expires."""

    size: int
    ttl_ms: int


class Budgeted(Protocol):
    """What a budget is checked against (a registry `Client`)."""

    @property
    def keyid(self) -> str: ...
    @property
    def storage_bytes(self) -> int: ...


class StorageUse(Protocol):
    """The store's side: the client's stored results when they may be over a budget
    (`ResultStore.storage_over`)."""

    def storage_over(self, client: str, budget: int) -> list[StoredBytes] | None: ...


def check_storage_budget(store: StorageUse, client: Budgeted) -> None:
    """Return when `client`'s stored results are within its budget; raise StorageQuotaExceeded
    otherwise, with the seconds until enough of them expire."""
    use = store.storage_over(client.keyid, client.storage_bytes)
    if use is None:
        return  # within the budget, by an upper bound of its bytes
    over = sum(item.size for item in use) - client.storage_bytes
    if over <= 0:
        return
    freed, wait_ms = 0, 0
    for item in sorted(use, key=lambda item: item.ttl_ms):
        freed, wait_ms = freed + item.size, item.ttl_ms
        if freed >= over:
            break
    raise StorageQuotaExceeded(
        f"the client's stored results are over its budget of {client.storage_bytes} bytes; "
        "fetch and delete results, or wait until they expire",
        retry_after=max(1, math.ceil(wait_ms / 1000)),
    )
