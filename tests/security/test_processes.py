"""Spawning, signalling and steering processes: the parent, the host, other runs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


def _limits_of(pid: int) -> str:
    return Path(f"/proc/{pid}/limits").read_text()


@pytest.mark.parametrize(
    "statement",
    ["import subprocess", "import os", "import signal", "import multiprocessing", "import pty"],
)
def test_restricted_code_cannot_reach_process_apis(sb, statement):
    outcome = attempt(sb, f"def f():\n    {statement}\n    return 1\n")
    assert_status(outcome, "denied", "PolicyViolation")


@pytest.mark.parametrize(
    "call",
    [
        "os.fork()",
        "subprocess.run(['/bin/true'])",
        "os.posix_spawn('/bin/sh', ['sh'], {})",
        "os.execv('/bin/sh', ['sh', '-c', 'true'])",
        "os.setuid(0)",
        "os.setsid()",
    ],
)
def test_raw_process_creation_and_identity_changes_are_refused(raw, call):
    source = f"import os, subprocess\ndef f():\n    return {call}\n"
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "runtime_error")
    # Refused by name (EPERM), or on no list at all (ENOSYS: subprocess's pipe2, say).
    assert outcome.error is not None and outcome.error["type"] in ("PermissionError", "OSError")
    assert outcome.error["type"] == "PermissionError" or "Errno 38" in outcome.error["message"]


def test_raw_child_cannot_kill_its_parent_or_the_test_process(raw):
    server = raw._proc.pid
    source = (
        "import os, signal\n"
        "def f(pids):\n"
        "    results = []\n"
        "    for pid in pids:\n"
        "        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):\n"
        "            try:\n"
        "                os.kill(pid, sig)\n"
        "                results.append('sent')\n"
        "            except PermissionError:\n"
        "                results.append('refused')\n"
        "    for call in (lambda: os.killpg(0, 9), lambda: os.kill(-1, 9)):\n"
        "        try:\n"
        "            call()\n"
        "            results.append('sent')\n"
        "        except PermissionError:\n"
        "            results.append('refused')\n"
        "    return results\n"
    )
    outcome = attempt_raw(raw, source, [server, os.getpid(), 1])
    assert_status(outcome, "ok")
    assert set(outcome.value) == {"refused"}
    os.kill(server, 0)  # both still alive (the fixture checks the server again)


def test_raw_child_cannot_lower_the_limits_of_another_process(raw, nobody_process):
    before = _limits_of(nobody_process)
    source = (
        "import resource\n"
        "def f(pid):\n"
        "    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1, 1))\n"
        "    return 'lowered'\n"
    )
    outcome = attempt_raw(raw, source, nobody_process)
    assert_status(outcome, "runtime_error", "PermissionError")
    assert _limits_of(nobody_process) == before


@pytest.mark.parametrize(
    "call",
    [
        "os.setpriority(os.PRIO_PROCESS, pid, 19)",
        "os.setpriority(os.PRIO_USER, 0, 19)",
        "os.sched_setaffinity(pid, {0})",
        "os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))",
    ],
)
def test_raw_child_cannot_starve_another_process(raw, nobody_process, call):
    nice_before = os.getpriority(os.PRIO_PROCESS, nobody_process)
    cpus_before = os.sched_getaffinity(nobody_process)
    source = f"import os\ndef f(pid):\n    return {call}\n"
    outcome = attempt_raw(raw, source, nobody_process)
    assert_status(outcome, "runtime_error", "PermissionError")
    assert os.getpriority(os.PRIO_PROCESS, nobody_process) == nice_before
    assert os.sched_getaffinity(nobody_process) == cpus_before


def test_raw_ptrace_of_the_parent_is_refused(raw):
    source = (
        "import ctypes\n"
        "def f(pid):\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    return [libc.ptrace(16, pid, 0, 0), ctypes.get_errno()]\n"  # PTRACE_ATTACH
    )
    outcome = attempt_raw(raw, source, raw._proc.pid)
    assert_status(outcome, "ok")
    assert outcome.value == [-1, 1]


def test_raw_child_never_outlives_its_fork_server():
    # The uid layer clears the kernel's parent-death signal; it must be armed again after it.
    import threading

    from sandbox import SandboxError
    from sandbox._testing import UnsafeRawCodeRun

    box = UnsafeRawCodeRun().start()
    proc = box._proc
    assert proc is not None
    server = proc.pid
    errors: list[Exception] = []

    def sleep_in_child() -> None:
        try:
            box.run(
                "import time\ndef f():\n    time.sleep(30)\n",
                "f",
                limits={"cpu_seconds": 30, "wall_seconds": 60},
            )
        except SandboxError as exc:
            errors.append(exc)

    thread = threading.Thread(target=sleep_in_child)
    thread.start()
    time.sleep(0.5)
    descendants = _descendants(server)
    assert descendants, "no child was running"
    os.kill(server, signal.SIGKILL)
    thread.join(timeout=10)
    proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and [p for p in descendants if _alive(p)]:
        time.sleep(0.05)
    assert [p for p in descendants if _alive(p)] == []
    assert errors  # the caller was told the server died


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(c) for c in children)
        queue.extend(int(c) for c in children)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
