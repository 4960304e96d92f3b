"""Shared helpers of the audit tests: writing sample logs, editing lines, workers for processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from appliance.audit import (
    AuditLog,
    AuditPaths,
    EventType,
    Signer,
    UnsafeInMemorySigner,
    entry_hash,
)
from appliance.audit._format import canonical

SEED = bytes(range(32))


def write_sample(
    path: Path, signer: Signer | None, count: int, *, every: int = 10, close: bool = False
) -> None:
    """`count` accepted submissions, checkpointed every `every` entries."""
    log = AuditLog.open(path, signer, source="test", checkpoint_every=every, durable=False)
    for i in range(count):
        log.record(
            EventType.SUBMISSION_ACCEPTED,
            client=f"client{i % 3}",
            function="add",
            task_id=f"task-{i}",
            result_key=f"add_1700000000000_{i:032x}",
            module_source="def add(a, b):\n    return a + b\n",
            args=[i, 1],
        )
    log.close(final_checkpoint=close)


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def entry(line: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value


def sealed(value: dict[str, Any]) -> bytes:
    """An entry line with a correct hash for its (possibly forged) content."""
    body = {k: v for k, v in value.items() if k != "hash"}
    body["hash"] = entry_hash(body)
    return canonical(body) + b"\n"


def rehash_from(lines: list[bytes], start: int) -> list[bytes]:
    """Recompute hashes and prev_hash links from line index `start` on (an attacker's rewrite)."""
    out = list(lines)
    for i in range(start, len(out)):
        value = entry(out[i])
        if i > 0:
            value["prev_hash"] = entry(out[i - 1])["hash"]
        out[i] = sealed(value)
    return out


def records(path: Path) -> list[dict[str, Any]]:
    return [entry(line) for line in read_lines(path)]


def paths(path: Path) -> AuditPaths:
    return AuditPaths(path)


def write_in_process(path: str, index: int, count: int, barrier: Any, out: Any) -> None:
    """Body of one writer process: `count` entries as fast as it can, then a final checkpoint."""
    log = AuditLog.open(
        Path(path), UnsafeInMemorySigner.from_seed(SEED), source=f"w{index}", checkpoint_every=100
    )
    barrier.wait()
    started = time.perf_counter()
    for i in range(count):
        log.record(
            EventType.EXECUTION_FINISHED,
            task_id=f"w{index}-{i}",
            function="f",
            status="ok",
            usage={"cpu_ms": i, "wall_ms": i},
        )
    elapsed = time.perf_counter() - started
    log.close()
    out.put(elapsed)
