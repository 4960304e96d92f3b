"""A bare Celery app on a Redis of its own (no TLS, no ACL, db 0, Redis result backend): the
baselines that `bench/end_to_end.py` compares the appliance with.

Two tasks on two queues, each served by a worker of its own (`--pool threads -c 2`):

* `bare.add` on `bare`: the trivial function, nothing else;
* `bare.sandboxed_add` on `sandboxed`: the same function run through this project's own
  `sandbox.Sandbox` (every layer on, one fork server per worker thread, as the appliance's
  `SandboxPool`), and nothing else of the appliance: no signature, no sealing, no OpenBao, no
  claims, no audit log.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from celery import Celery, signals

app = Celery("bare", broker=os.environ["BENCH_BROKER_URL"], backend=os.environ["BENCH_BROKER_URL"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_default_queue="bare",
    broker_connection_retry_on_startup=True,
    # As the appliance's worker (appliance/queue.py).
    worker_prefetch_multiplier=1,
)

_sandboxes: queue.Queue[Any] = queue.Queue()
_started = threading.Lock()


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Only the sandboxed worker spawns fork servers (one per thread, as SandboxPool does).
    if os.environ.get("BENCH_SANDBOXED") != "1":
        return
    from sandbox import Sandbox  # noqa: PLC0415

    for _ in range(int(getattr(sender, "concurrency", None) or 2)):
        _sandboxes.put(Sandbox().start())


signals.worker_init.connect(_on_worker_init)


@app.task(name="bare.add")
def add(a: int, b: int) -> int:
    """The same trivial function the appliance runs."""
    return a + b


ADD = "def add(a, b):\n    return a + b\n"


@app.task(name="bare.sandboxed_add")
def sandboxed_add(a: int, b: int) -> Any:
    """`add` through `sandbox.Sandbox`, with the appliance's default limits."""
    sb = _sandboxes.get()
    try:
        outcome = sb.run(ADD, "add", [a, b])
    finally:
        _sandboxes.put(sb)
    if outcome.status != "ok":
        raise RuntimeError(f"sandbox: {outcome.status}")
    return outcome.value
