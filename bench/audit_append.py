"""Throughput and latency of durable audit appends: group commit against one sync per entry.

    .venv/bin/python bench/audit_append.py [--appends 600] [--blocks 3] [--threads 1,2,8]
        [--dir DIR] [--json PATH]

Each configuration opens a fresh `AuditLog` (durable, no signer: signing is off the request path
and not what is measured) in a temporary directory under `--dir` (default: the system's temporary
directory; give one on the disk the stack's state lives on) and has N threads append
`--appends` entries in all, each thread timing each `record()` call. The two paths alternate,
block by block, in the same run:

* `group`: the default since issue 16; the lock is held for the write, and concurrent writers
  share one `fdatasync` (`appliance/audit/_commit.py`);
* `per-entry`: `AuditLog.open(..., group_commit=False)`, the path before: each writer syncs its
  own entry under the log's lock.

Printed and written as JSON (default `artifacts/bench/audit_append.json`): appends per second
(entries over the wall time of the block) and p50/p99 per append in ms, pooled over the blocks,
with the syncs per append, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.audit import AuditLog, EventType  # noqa: E402

MODES = ("per-entry", "group")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class CountingSync:
    """`os.fdatasync`, counted."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self._lock:
            self.calls += 1
        os.fdatasync(fd)


def block(mode: str, threads: int, appends: int, directory: Path) -> dict[str, Any]:
    """One block: `threads` threads appending `appends` entries in all to a fresh log."""
    with tempfile.TemporaryDirectory(dir=directory, prefix="audit-bench-") as tmp:
        sync = CountingSync()
        log = AuditLog.open(
            Path(tmp) / "audit.jsonl",
            None,
            source="bench",
            group_commit=mode == "group",
            sync=sync,
        )
        latencies: list[list[float]] = [[] for _ in range(threads)]
        barrier = threading.Barrier(threads + 1)
        per_thread = appends // threads

        def run(n: int) -> None:
            own = latencies[n]
            barrier.wait()
            for i in range(per_thread):
                started = time.perf_counter()
                log.record(
                    EventType.EXECUTION_FINISHED,
                    task_id=f"t{n}-{i}",
                    function="add",
                    status="ok",
                    usage={"cpu_ms": 1, "wall_ms": 2},
                )
                own.append(time.perf_counter() - started)

        workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        barrier.wait()
        started = time.perf_counter()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        log.close(final_checkpoint=False)
        done = per_thread * threads
        return {
            "appends": done,
            "seconds": elapsed,
            "syncs": sync.calls,
            "latencies_ms": [x * 1000 for own in latencies for x in own],
        }


def summarise(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for b in blocks for x in b["latencies_ms"]]
    appends = sum(b["appends"] for b in blocks)
    rates = [b["appends"] / b["seconds"] for b in blocks]
    return {
        "appends": appends,
        "appends_per_s": appends / sum(b["seconds"] for b in blocks),
        "appends_per_s_blocks": rates,
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 0.99),
        "syncs_per_append": sum(b["syncs"] for b in blocks) / appends,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=600, help="entries per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per configuration")
    parser.add_argument("--threads", default="1,2,8", help="thread counts, comma-separated")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=Path("artifacts/bench/audit_append.json"))
    args = parser.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    args.dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    raw: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.blocks):
        for threads in counts:
            for mode in MODES:
                result = block(mode, threads, args.appends, args.dir)
                raw.setdefault(f"{mode}/{threads}", []).append(result)
    load_after = os.getloadavg()
    summary = {key: summarise(blocks) for key, blocks in raw.items()}
    print(f"load average before {load_before}, after {load_after}; dir {args.dir}")
    header = ("threads", "path", "appends/s", "p50 ms", "p99 ms", "syncs/append")
    print("{:>7} {:>9} {:>10} {:>8} {:>8} {:>13}".format(*header))
    for threads in counts:
        for mode in MODES:
            s = summary[f"{mode}/{threads}"]
            print(
                f"{threads:>7} {mode:>9} {s['appends_per_s']:>10.0f} {s['p50_ms']:>8.2f} "
                f"{s['p99_ms']:>8.2f} {s['syncs_per_append']:>13.2f}"
            )
        ratio = (
            summary[f"group/{threads}"]["appends_per_s"]
            / summary[f"per-entry/{threads}"]["appends_per_s"]
        )
        print(f"{threads:>7} {'group ÷ per-entry, appends/s':>38}: {ratio:.2f}×")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "load_average_before": load_before,
                "load_average_after": load_after,
                "dir": str(args.dir),
                "appends_per_block": args.appends,
                "blocks": args.blocks,
                "summary": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
