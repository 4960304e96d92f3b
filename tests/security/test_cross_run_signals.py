"""No run can signal, stop or observe another process: another run, its own server's next spare,
or the host. Each child is pid 1 of a PID namespace of its own, and the seccomp filter refuses
every way to signal (kill, tgkill, F_SETOWN + F_SETSIG + O_ASYNC, pidfd_send_signal).

These run with RestrictedPython off (`attempt_raw`): the OS layers must hold on their own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sandbox._supervisor import SPARE_CHILDREN

from .conftest import assert_status, attempt_raw

pytestmark = pytest.mark.timeout(60)


def _spares(box) -> list[int]:
    """The host pids of the fork server's live spares once it has refilled them (it does so
    after answering, so the count is waited for). One of them may be the run just finished,
    killed but not yet dead: the tests allow for that."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spares = _live_spares(box)
        if len(spares) >= SPARE_CHILDREN:
            return spares
        time.sleep(0.005)
    raise AssertionError("the fork server did not refill its spares")


def _live_spares(box) -> list[int]:
    server = box._proc.pid
    (zygote,) = Path(f"/proc/{server}/task/{server}/children").read_text().split()
    pids = [int(pid) for pid in Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()]
    return [pid for pid in pids if _state(pid) not in "ZX"]  # not the last run, being reaped


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


# Every way the review used, and its neighbours, against the pid given.
SIGNAL_ATTEMPTS = """
import ctypes, fcntl, os, signal
F_SETSIG = 10
def f(pids):
    tried = {}
    for pid in pids:
        tried.update({f"{name} {pid}": how for name, how in g(pid).items()})
    return tried
def g(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    tried = {}
    def attempt(name, call):
        try:
            call()
            tried[name] = "done"
        except OSError as exc:
            tried[name] = exc.errno
    attempt("kill", lambda: os.kill(pid, signal.SIGSTOP))
    attempt("kill_all", lambda: os.kill(-1, signal.SIGSTOP))
    attempt("killpg", lambda: os.killpg(pid, signal.SIGSTOP))
    attempt("setown", lambda: fcntl.fcntl(3, fcntl.F_SETOWN, pid))
    attempt("setsig", lambda: fcntl.fcntl(3, F_SETSIG, signal.SIGKILL))
    attempt("async", lambda: fcntl.fcntl(3, fcntl.F_SETFL, os.O_ASYNC))
    attempt("pidfd", lambda: os.pidfd_open(pid))
    attempt("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, pid, 19))
    for name, number, args in (("raw_kill", 62, (pid, signal.SIGKILL)),  # past any wrapper
                               ("raw_tgkill", 234, (pid, pid, signal.SIGKILL))):
        ctypes.set_errno(0)
        tried[name] = ctypes.get_errno() if libc.syscall(number, *args) == -1 else "done"
    return tried
"""


def test_a_run_cannot_signal_its_own_servers_next_spare(raw):
    attempt_raw(raw, "def f():\n    return 0\n")  # spares ready
    # Every live spare, among them the next run's and, maybe, the attacker's own.
    victims = _spares(raw)
    outcome = attempt_raw(raw, SIGNAL_ATTEMPTS, victims)
    assert_status(outcome, "ok")
    assert "done" not in outcome.value.values(), outcome.value
    states = [_state(pid) for pid in victims]
    assert not [s for s in states if s in "Tt"], states  # none stopped
    # Gone at most: the attacker itself, and the run before it (killed, maybe not yet reaped,
    # when the spares were listed). A kill of a process of the same uid that must live on is
    # checked exactly below, with a process the test owns.
    # The next run is served at once, not stuck behind a stopped spare.
    after = attempt_raw(raw, "def f():\n    return 'next'\n")
    assert_status(after, "ok")
    assert after.value == "next"


def test_a_run_cannot_signal_a_process_of_another_fork_server(raw, sb):
    attempt_raw(raw, "def f():\n    return 0\n")
    assert sb.run("def f():\n    return 0\n", "f").status == "ok"
    victims = _spares(sb)
    outcome = attempt_raw(raw, SIGNAL_ATTEMPTS, victims)
    assert_status(outcome, "ok")
    assert "done" not in outcome.value.values(), outcome.value
    states = [_state(pid) for pid in victims]
    assert not [s for s in states if s in "Tt"], states
    assert sb.run("def f():\n    return 'alive'\n", "f").value == "alive"


def test_a_run_cannot_signal_any_process_of_its_own_uid(raw, nobody_process):
    # Another tenant's run or a daemon running as the sandbox's uid: reachable by uid alone
    # before this round (kill, F_SETOWN + F_SETSIG), by nothing now.
    outcome = attempt_raw(raw, SIGNAL_ATTEMPTS, [nobody_process])
    assert_status(outcome, "ok")
    assert "done" not in outcome.value.values(), outcome.value
    assert _state(nobody_process) in "SR"  # neither stopped nor killed


def test_a_run_sees_no_pid_but_its_own(raw):
    source = """
import os, time
def f(host_pids):
    seen = []
    for pid in list(range(2, 4096)) + host_pids:
        for probe in (os.getpgid, os.getsid):
            try:
                probe(pid)
                seen.append(pid)
            except OSError:
                pass
    clocks = []
    for pid in host_pids:
        try:
            time.clock_gettime((~pid << 3) | 2)
            clocks.append(pid)
        except OSError:
            pass
    return {"me": [os.getpid(), os.getppid()], "seen": seen, "clocks": clocks,
            "node": os.uname().nodename}
"""
    host = [os.getpid(), raw._proc.pid, 1]
    outcome = attempt_raw(raw, source, host)
    assert_status(outcome, "ok")
    assert outcome.value == {"me": [1, 0], "seen": [], "clocks": [], "node": "sandbox"}
