"""The zygote that forks spares for the fork server: spares, fallback when it dies, clean-up."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sandbox import Policy
from sandbox._request import prepare
from sandbox._supervisor import SPARE_CHILDREN, Supervisor

pytestmark = pytest.mark.timeout(60)

POLICY = Policy.load()
RUN = prepare(POLICY, "def f(x):\n    return x + 1\n", "f", [1])


@pytest.fixture
def supervisor():
    sup = Supervisor(POLICY)
    try:
        yield sup
    finally:
        sup.close()


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_spares_come_from_the_zygote_and_runs_use_them(supervisor):
    supervisor.prepare_next()
    zygote = supervisor._zygote
    assert zygote is not None
    for _ in range(3):
        outcome = supervisor.run(RUN)
        assert outcome.status == "ok" and outcome.value == 2
        assert outcome.usage.cpu_ms > 0 and outcome.usage.max_rss_kb > 0  # reaped by the zygote
        supervisor.prepare_next()
    for spare in supervisor._spares:
        assert supervisor._resolve(spare)  # the zygote has answered for every spare
    assert len(_children(zygote.pid)) == SPARE_CHILDREN


def test_a_dead_zygote_is_replaced_by_direct_forks(supervisor):
    supervisor.prepare_next()
    zygote = supervisor._zygote
    assert zygote is not None
    supervisor.run(RUN)
    os.kill(zygote.pid, signal.SIGKILL)
    _wait_until_dead(zygote.pid)
    outcome = supervisor.run(RUN)
    assert outcome.status == "ok" and outcome.value == 2
    supervisor.prepare_next()  # a new zygote
    assert supervisor._zygote is not None and supervisor._zygote.pid != zygote.pid
    assert supervisor.run(RUN).status == "ok"


def _wait_until_dead(pid: int) -> None:
    # A zygote killed in the middle of a run costs that run (SandboxError); here it is dead
    # before the next run starts, so that run must fall back to a direct fork.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return
        time.sleep(0.01)
    raise AssertionError("the zygote did not die")


def test_close_leaves_no_process_behind():
    before = set(_children(os.getpid()))  # e.g. session-wide fork servers of other tests
    sup = Supervisor(POLICY)
    sup.prepare_next()
    sup.run(RUN)
    sup.prepare_next()
    assert sup._zygote is not None
    zygote = sup._zygote.pid
    spares = _children(zygote)
    sup.close()
    assert set(_children(os.getpid())) == before
    for pid in (zygote, *spares):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
