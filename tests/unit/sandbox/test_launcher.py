"""The launcher: fork servers for a process that has dropped root (issue 12, finding 23)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandbox import Launcher, Sandbox
from sandbox._launcher import LaunchedServer

pytestmark = pytest.mark.timeout(120)

DOUBLE = "def f(x):\n    return x * 2\n"


@pytest.fixture
def launcher():
    made = Sandbox.launcher(max_servers=3)
    try:
        yield made
    finally:
        made.close()


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _discard(server: LaunchedServer) -> None:
    server.kill()
    for pipe in (server.stdin, server.stdout):
        if pipe is not None:
            pipe.close()


def test_fork_servers_from_a_launcher_run_code(launcher: Launcher) -> None:
    with Sandbox(launcher=launcher) as sb:
        assert sb.run(DOUBLE, "f", [21]).value == 42
        assert all(reason == "" for reason in sb.doctor().values())


def test_a_lost_fork_server_is_replaced_through_the_launcher(launcher: Launcher) -> None:
    with Sandbox(launcher=launcher) as sb:
        sb.start()
        assert sb._proc is not None
        first = sb._proc.pid
        os.kill(first, signal.SIGKILL)
        sb._proc.wait(timeout=10)  # gone, as the launcher sees it
        assert sb.run(DOUBLE, "f", [5]).value == 10
        assert sb._proc is not None and sb._proc.pid != first


def test_the_launcher_starts_at_most_max_servers(launcher: Launcher) -> None:
    servers = [launcher.spawn() for _ in range(3)]
    with pytest.raises(Exception, match="too_many_servers"):
        launcher.spawn()
    for server in servers:
        _discard(server)


def test_the_launcher_kills_only_its_own_servers(launcher: Launcher) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        launcher.kill(bystander.pid)
        assert launcher.alive(bystander.pid) is False
        assert bystander.poll() is None, "the launcher signalled a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


def test_garbage_on_the_launcher_socket_is_answered_not_fatal(launcher: Launcher) -> None:
    channel = launcher._channel
    for junk in (b"not json", b"[]", json.dumps({"op": "kill", "pid": "1"}).encode()):
        channel.sendall(junk)
        reply = json.loads(channel.recv(65536))
        assert "error" in reply or reply.get("alive") is False
    server = launcher.spawn()
    assert launcher.alive(server.pid)
    _discard(server)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root (CI runs as root)")
def test_a_process_that_dropped_root_still_gets_root_fork_servers() -> None:
    program = textwrap.dedent(
        """
        import json, os, sys
        from sandbox import Sandbox
        launcher = Sandbox.launcher()
        sb = Sandbox(launcher=launcher).start()
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        first = sb._proc.pid
        launcher.kill(first)
        value = sb.run("def f():\\n    return 7\\n", "f").value
        print(json.dumps({"value": value, "server": sb._proc.pid, "me": os.getuid()}))
        sys.stdout.flush()
        import time
        time.sleep(30)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert proc.stdout is not None
        seen = json.loads(proc.stdout.readline())
        assert seen["value"] == 7 and seen["me"] == 65534
        # The replacement fork server runs as root, started by the launcher, not the caller.
        assert _uid(seen["server"]) == 0
        assert _uid(proc.pid) == 65534
    finally:
        proc.kill()
        proc.communicate()


def test_the_launcher_holds_no_environment() -> None:
    os.environ["LAUNCHER_CANARY"] = "canary-launcher-env"
    try:
        made = Sandbox.launcher()
        try:
            environ = Path(f"/proc/{made._proc.pid}/environ").read_bytes()
            assert b"canary-launcher-env" not in environ
            fds = os.listdir(f"/proc/{made._proc.pid}/fd")
            # Its socket (0), and /dev/null for 1 and 2: nothing of ours.
            assert sorted(int(fd) for fd in fds) == [0, 1, 2]
        finally:
            made.close()
    finally:
        del os.environ["LAUNCHER_CANARY"]
