"""The next spare's request channel, handed to the caller: used once, and never needed.

The fork server hands each answer's caller the request channel of its next spare, so that the
next request goes straight to that child and only its limits go through the server. Whatever
happens to that spare, a request must still run exactly once, in a fresh child.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from sandbox import InvalidRequest, Policy, Sandbox
from sandbox._request import frame_request, prepare
from sandbox._server import MAX_FRAME
from sandbox._supervisor import SpareLost, Supervisor

pytestmark = pytest.mark.timeout(60)

POLICY = Policy.load()
RUN = prepare(POLICY, "def f(x):\n    return x + 1\n", "f", [1])
TRIVIAL = "def f(x):\n    return x * 2\n"


@pytest.fixture
def supervisor():
    sup = Supervisor(POLICY)
    sup.prepare_next()
    try:
        yield sup
    finally:
        sup.close()


@pytest.fixture
def box():
    with Sandbox() as sandbox:
        yield sandbox


def _write(fd: int, run=RUN) -> None:
    try:
        os.write(fd, frame_request(json.dumps(run.to_wire()).encode()))
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def test_a_handed_out_spare_runs_the_request_its_holder_wrote(supervisor):
    fd = supervisor.hand_out()
    assert fd is not None
    assert supervisor.hand_out() is None  # one at a time
    _write(fd)
    outcome = supervisor.run_dispatched(RUN.limits)
    assert outcome.status == "ok" and outcome.value == 2
    supervisor.prepare_next()
    again = supervisor.hand_out()
    assert again is not None
    _write(again, prepare(POLICY, TRIVIAL, "f", [5]))
    assert supervisor.run_dispatched(RUN.limits).value == 10


def test_attending_to_a_spare_nobody_was_handed_is_refused(supervisor):
    with pytest.raises(SpareLost):
        supervisor.run_dispatched(RUN.limits)
    assert supervisor.run(RUN).value == 2  # and nothing is out of order after it


def test_a_request_sent_in_full_retires_the_handed_out_spare(supervisor):
    fd = supervisor.hand_out()
    assert fd is not None
    handed = supervisor._handed
    assert handed is not None and supervisor._resolve(handed) and handed.pid is not None
    try:
        assert supervisor.run(RUN).value == 2  # the holder gave up on its spare
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while _alive(handed.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(handed.pid)  # it never runs anything later
    with pytest.raises(SpareLost):
        supervisor.run_dispatched(RUN.limits)


def test_the_caller_writes_each_request_to_a_new_spare(box):
    seen = set()
    for n in range(4):
        assert box._spare_fd is not None
        seen.add(os.fstat(box._spare_fd).st_ino)  # a pipe of its own per spare
        assert box.run(TRIVIAL, "f", [n]).value == 2 * n
    assert len(seen) == 4


def _server_spares(box: Sandbox) -> list[int]:
    assert box._proc is not None
    server = box._proc.pid
    zygotes = Path(f"/proc/{server}/task/{server}/children").read_text().split()
    return [
        int(pid)
        for zygote in zygotes
        for pid in Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()
    ]


def test_a_handed_out_spare_that_died_waiting_costs_nothing(box):
    box.run(TRIVIAL, "f", [1])
    spares = _server_spares(box)
    assert spares
    for pid in spares:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in spares) and time.monotonic() < deadline:
        time.sleep(0.01)
    outcome = box.run(TRIVIAL, "f", [21])  # sent to the server in full instead
    assert outcome.status == "ok" and outcome.value == 42, outcome
    for n in range(3):
        assert box.run(TRIVIAL, "f", [n]).value == 2 * n


def test_a_caller_that_forked_while_holding_a_spare_channel_is_not_kept_waiting(box):
    # The forked child keeps a copy of the channel's write end open: a request ended by
    # closing the channel would never end, and the run would last until its wall clock.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - only sleeps
        try:
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        outcome = box.run(TRIVIAL, "f", [21], limits={"wall_seconds": 5})
        assert outcome.status == "ok" and outcome.value == 42, outcome
        assert outcome.usage.wall_ms < 2500
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_request_too_large_for_the_server_is_refused_before_anything_runs(box):
    with pytest.raises(InvalidRequest, match="larger than"):
        box.run(TRIVIAL, "f", ["x" * (MAX_FRAME + 1)])
    assert box.run(TRIVIAL, "f", [2]).value == 4


def test_a_server_that_died_between_runs_is_replaced_with_its_spares(box):
    assert box.run(TRIVIAL, "f", [1]).value == 2
    assert box._proc is not None
    old = box._proc
    old.kill()
    old.wait()
    outcome = box.run(TRIVIAL, "f", [21])
    assert outcome.status == "ok" and outcome.value == 42
    assert box._proc is not None and box._proc.pid != old.pid
    assert box._spare_fd is not None  # handed out by the new server
    assert box.run(TRIVIAL, "f", [3]).value == 6
