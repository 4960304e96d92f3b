"""The zygote that forks spares for the fork server: spares, fallback when it dies, clean-up."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from sandbox import Policy, Sandbox
from sandbox._errors import ZygoteLost
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
        assert outcome.usage.cpu_ms >= 0 and outcome.usage.max_rss_kb > 0  # reaped by the zygote
        supervisor.prepare_next()
    for spare in supervisor._spares:
        assert supervisor._resolve(spare)  # the zygote has answered for every spare
    assert len(_children(zygote.pid)) == SPARE_CHILDREN


def test_a_zygote_lost_after_a_request_is_never_replaced_from_this_process(supervisor):
    # A new zygote, or a child forked by the supervisor itself, would be a copy of a process
    # that has held earlier requests: it would carry their arguments into later runs.
    supervisor.prepare_next()
    zygote = supervisor._zygote
    assert zygote is not None
    supervisor.run(RUN)
    os.kill(zygote.pid, signal.SIGKILL)
    _wait_until_dead(zygote.pid)
    with pytest.raises(ZygoteLost):
        supervisor.run(RUN)
    supervisor.prepare_next()
    assert supervisor._zygote is None
    with pytest.raises(ZygoteLost):
        supervisor.run(RUN)


def test_before_any_request_a_missing_zygote_is_started(supervisor):
    assert supervisor._zygote is None
    assert supervisor.run(RUN).value == 2  # no prepare_next(): the first run starts it
    assert supervisor._zygote is not None


def test_a_fork_server_that_lost_its_zygote_is_replaced_and_the_run_served():
    with Sandbox() as box:
        assert box.run("def f(x):\n    return x\n", "f", ["first"]).value == "first"
        server = box._proc.pid
        zygote = _children(server)
        assert len(zygote) == 1
        os.kill(zygote[0], signal.SIGKILL)
        _wait_until_dead(zygote[0])
        assert box.run("def f(x):\n    return x + 1\n", "f", [1]).value == 2
        assert box._proc.pid != server  # a fresh server, which never saw "first"
        assert _state(server) in "ZX"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"  # reaped already


def _wait_until_dead(pid: int) -> None:
    # A zygote killed in the middle of a run costs that run (SandboxError); here it is dead
    # before the next run starts.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _state(pid) in "ZX":
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


def test_a_killed_fork_servers_directories_are_removed_by_the_next_one():
    box = Sandbox().start()
    server = box._proc.pid
    roots = list(Path(tempfile.gettempdir()).glob(f"sandbox-{server}-*"))
    assert len(roots) == 1
    os.kill(server, signal.SIGKILL)
    box.close()  # reaps the killed server
    assert roots[0].exists()  # left behind by the kill
    with Sandbox() as fresh:
        fresh.start()
        assert not roots[0].exists()
