"""Spare children: each is used once, refilled, replaced when it dies, and killed after its reply.

A spare is forked and isolated before its request exists, so these check what that must never
change: a fresh child per run, the run's own limits in force, and no child outliving its run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox import Limits, Policy
from sandbox._request import prepare
from sandbox._supervisor import SPARE_CHILDREN, Supervisor, _usage_if_alive
from sandbox._testing import UnsafeRawSupervisor

pytestmark = pytest.mark.timeout(60)

POLICY = Policy.load()
RUN = prepare(POLICY, "def f(x):\n    return x + 1\n", "f", [1])
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def supervisor():
    sup = Supervisor(POLICY)
    sup.prepare_next()
    try:
        yield sup
    finally:
        sup.close()


@pytest.fixture
def raw_supervisor():
    sup = UnsafeRawSupervisor(POLICY)
    sup.prepare_next()
    try:
        yield sup
    finally:
        sup.close()


def _spare_pids(sup: Supervisor) -> list[int]:
    pids = []
    for spare in sup._spares:
        assert sup._resolve(spare)
        assert spare.pid is not None
        pids.append(spare.pid)
    return pids


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _wait_until_gone(pid: int) -> None:
    # A liveness bound, not a speed check: a killed process is normally gone within milliseconds.
    deadline = time.monotonic() + 10
    while not _gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} is still alive")
        time.sleep(0.01)


def test_each_run_gets_a_spare_that_was_never_used_before(supervisor):
    used: list[int] = []
    for _ in range(2 * SPARE_CHILDREN + 1):
        next_pid = _spare_pids(supervisor)[0]
        assert next_pid not in used
        assert supervisor.run(RUN).value == 2
        used.append(next_pid)
        supervisor.prepare_next()
        assert next_pid not in _spare_pids(supervisor)
    assert len(set(used)) == len(used)


def test_the_server_refills_its_spares_after_each_run(supervisor):
    assert len(_spare_pids(supervisor)) == SPARE_CHILDREN
    supervisor.run(RUN)
    assert len(supervisor._spares) == SPARE_CHILDREN - 1
    supervisor.prepare_next()
    assert len(_spare_pids(supervisor)) == SPARE_CHILDREN


def test_a_child_is_killed_and_reaped_once_it_has_replied(supervisor):
    pid = _spare_pids(supervisor)[0]
    outcome = supervisor.run(RUN)
    assert outcome.status == "ok"
    assert outcome.usage.cpu_ms >= 0 and outcome.usage.max_rss_kb > 0
    supervisor.prepare_next()
    _spare_pids(supervisor)  # the zygote answers in order, so it has handled the reap by now
    assert not Path(f"/proc/{pid}").exists()


def test_a_killed_spare_is_skipped_and_the_server_keeps_working(supervisor):
    first, second = _spare_pids(supervisor)[:2]
    os.kill(first, signal.SIGKILL)
    _wait_until_gone(first)
    outcome = supervisor.run(RUN)
    assert outcome.status == "ok" and outcome.value == 2
    supervisor.prepare_next()
    assert first not in _spare_pids(supervisor)
    assert second not in _spare_pids(supervisor)  # the next spare in line ran the request
    for pid in _spare_pids(supervisor):
        os.kill(pid, signal.SIGKILL)
    for pid in _spare_pids(supervisor):
        _wait_until_gone(pid)
    assert supervisor.run(RUN).value == 2  # no spare left alive: a fresh one from the zygote


_READ_LIMITS = """
import resource
def f():
    return [list(resource.getrlimit(resource.RLIMIT_CPU)),
            list(resource.getrlimit(resource.RLIMIT_AS))]
"""

_RAISE_LIMITS = """
import resource
def f():
    cpu = resource.getrlimit(resource.RLIMIT_CPU)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu[1] + 100, cpu[1] + 100))
    except (ValueError, OSError) as exc:
        return type(exc).__name__
    return "raised"
"""


def test_a_spare_isolated_long_before_its_request_runs_under_the_request_limits(raw_supervisor):
    # The spare was isolated at the policy's maxima; idle long enough to have warmed up.
    _spare_pids(raw_supervisor)
    time.sleep(0.1)
    limits = Limits(cpu_seconds=1, wall_seconds=5, memory_mb=48)
    outcome = raw_supervisor.run(prepare(POLICY, _READ_LIMITS, "f", limits=limits))
    assert outcome.status == "ok", outcome
    (cpu_soft, cpu_hard), (as_soft, as_hard) = outcome.value
    assert (cpu_soft, cpu_hard) == (1, 2)
    assert as_soft == as_hard
    maxima_as = 1024 * 1024 * POLICY.maxima.memory_mb
    assert as_hard < maxima_as  # the baseline plus 48 MB, not plus the policy's maximum


def test_a_run_cannot_raise_the_limits_it_was_given(raw_supervisor):
    limits = Limits(cpu_seconds=1, wall_seconds=5, memory_mb=48)
    outcome = raw_supervisor.run(prepare(POLICY, _RAISE_LIMITS, "f", limits=limits))
    assert outcome.status == "ok", outcome
    assert outcome.value in ("ValueError", "PermissionError")


def test_usage_is_read_only_from_a_live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        usage = _usage_if_alive(proc.pid)
        assert usage is not None and usage.ru_maxrss > 0
        proc.kill()
        proc_status = Path(f"/proc/{proc.pid}/status")
        deadline = time.monotonic() + 10
        while "VmHWM" in proc_status.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _usage_if_alive(proc.pid) is None  # a zombie: the caller must reap it instead
    finally:
        proc.kill()
        proc.wait()


def test_the_fork_server_never_imports_threading():
    # threading's after-fork hook would run in every child (about 120 page faults each).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import sandbox._server as server;"
        "from sandbox._supervisor import Supervisor;"
        "s = Supervisor(server.Policy.load()); s.prepare_next(); s.close();"
        "print(sorted(m for m in ('threading', 'subprocess', 'pyseccomp') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(ROOT)],
        capture_output=True,
        text=True,
        env={},
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == "[]"


def test_a_finished_child_whose_usage_cannot_be_read_is_reaped_not_waited_for(
    supervisor, monkeypatch
):
    # If the kernel's figures cannot be read while the child lives, it is killed and reaped,
    # and its whole reply still counts: a child waiting to be killed must never run into the
    # wall clock (a `timeout`) instead.
    import sandbox._supervisor as supervisor_module

    monkeypatch.setattr(supervisor_module, "_usage_if_alive", lambda pid: None)
    limits = Limits(cpu_seconds=1, wall_seconds=5, memory_mb=64)
    outcome = supervisor.run(
        prepare(POLICY, "def f(x):\n    return x + 1\n", "f", [1], limits=limits)
    )
    assert outcome.status == "ok" and outcome.value == 2, outcome
    assert outcome.usage.max_rss_kb > 0  # from wait4


def test_finished_children_are_released_even_without_prepare_next():
    # The `sandbox run` CLI calls run() alone; nothing may pile up between runs.
    sup = Supervisor(POLICY)
    try:
        for _ in range(3):
            assert sup.run(RUN).value == 2
            assert len(sup._finished) <= 1
    finally:
        sup.close()
    assert not sup._finished
