"""No run can signal, stop or observe another process: another run, its own server's next spare,
or the host. Each child is pid 1 of a PID namespace of its own, and the seccomp filter refuses
every way to signal (kill, tgkill, F_SETOWN + F_SETSIG + O_ASYNC, pidfd_send_signal).

These run with RestrictedPython off (`attempt_raw`): the OS layers must hold on their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import assert_status, attempt_raw

pytestmark = pytest.mark.timeout(60)


def _spares(box) -> list[int]:
    """The host pids of the fork server's spares: the children of its zygote."""
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
def f(pid):
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
    victim = _spares(raw)[-1]  # the newest spare: the one after the run's own
    outcome = attempt_raw(raw, SIGNAL_ATTEMPTS, victim)
    assert_status(outcome, "ok")
    assert "done" not in outcome.value.values(), outcome.value
    assert _state(victim) not in "TtZX"  # neither stopped nor killed
    # The next run is served at once, not stuck behind a stopped spare.
    after = attempt_raw(raw, "def f():\n    return 'next'\n")
    assert_status(after, "ok")
    assert after.value == "next"


def test_a_run_cannot_signal_a_process_of_another_fork_server(raw, sb):
    attempt_raw(raw, "def f():\n    return 0\n")
    assert sb.run("def f():\n    return 0\n", "f").status == "ok"
    victim = _spares(sb)[-1]
    outcome = attempt_raw(raw, SIGNAL_ATTEMPTS, victim)
    assert_status(outcome, "ok")
    assert "done" not in outcome.value.values(), outcome.value
    assert _state(victim) not in "TtZX"
    assert sb.run("def f():\n    return 'alive'\n", "f").value == "alive"


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
