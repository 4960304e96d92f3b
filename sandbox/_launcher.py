"""`Launcher`: fork servers for a process that gives up its privileges once started.

The fork servers need root (namespaces, chroot, a memory cgroup, uid 65534 for each child);
the process that holds credentials should not. A caller that starts as root creates a Launcher
first, then drops its own privileges: the launcher is a fresh interpreter (`python -I`, an
empty environment, no descriptor but its socket) that keeps root and does three things on
request, nothing else:

- `spawn`: start a fork server with the program, package root and policy fixed when the
  launcher was made (the caller cannot choose another policy later), and hand its two pipes
  back over the socket (SCM_RIGHTS) with its pid; at most `max_servers` at a time;
- `alive`: whether a fork server it started still runs;
- `kill`: stop one it started (never any other pid).

It reads no credential and runs no user code. It exits when its socket closes (its caller has
gone); the fork servers end on their own when their pipes close.
"""

from __future__ import annotations

import _thread
import array
import json
import os
import socket
import sys
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

from ._errors import IsolationUnavailable, SandboxError

# Imported by the fork server through the package: no threading or subprocess at import time.
if TYPE_CHECKING:
    import subprocess

_MAX_MESSAGE = 64 * 1024
# The launcher's own program: its configuration is the first message on its socket (fd 0).
_LAUNCHER_BOOT = """import json, socket, sys
channel = socket.socket(fileno=0)
config = json.loads(channel.recv(65536))
sys.path.insert(0, config["root"])
from sandbox._launcher import serve
serve(channel, config)
"""


class LaunchedServer:
    """A fork server started by a Launcher: its pipes and pid, like a `subprocess.Popen`."""

    def __init__(self, launcher: Launcher, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self._launcher = launcher
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """None while it runs; then a return code (the launcher reaped it)."""
        if self.returncode is None and not self._launcher.alive(self.pid):
            self.returncode = -1
        return self.returncode

    def kill(self) -> None:
        """Stop it (through the launcher, which alone may signal it)."""
        if self.returncode is None:
            self._launcher.kill(self.pid)
            self.returncode = -9

    def wait(self, timeout: float | None = None) -> int:
        """Wait until it has exited; `subprocess.TimeoutExpired` after `timeout` seconds."""
        import subprocess
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"fork server {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return self.returncode if self.returncode is not None else -1


class Launcher:
    """The handle on a launcher process; thread-safe. Create it before dropping privileges."""

    def __init__(
        self,
        channel: socket.socket,
        proc: subprocess.Popen[bytes],
    ) -> None:
        self._channel = channel
        self._proc = proc
        self._lock = _thread.allocate_lock()

    @classmethod
    def start(
        cls,
        root: str,
        policy_path: str,
        boot: str,
        server_env: Mapping[str, str] | None = None,
        max_servers: int = 16,
    ) -> Launcher:
        """Start a launcher that will start fork servers running `boot` with this policy."""
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and program
                [sys.executable, "-I", "-c", _LAUNCHER_BOOT],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={},
                close_fds=True,
                cwd="/",
            )
        finally:
            theirs.close()
        config = {
            "root": root,
            "policy": policy_path,
            "boot": boot,
            "env": dict(server_env or {}),
            "max_servers": max_servers,
        }
        ours.sendall(json.dumps(config).encode())
        return cls(ours, proc)

    def spawn(self) -> LaunchedServer:
        """A new fork server, already told its package root and policy."""
        reply, fds = self._ask({"op": "spawn"}, want_fds=2)
        if "error" in reply or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise IsolationUnavailable(f"the sandbox launcher refused: {reply.get('error')}")
        stdin = os.fdopen(fds[0], "wb", buffering=0)
        stdout = os.fdopen(fds[1], "rb", buffering=0)
        return LaunchedServer(self, int(reply["pid"]), stdin, stdout)

    def alive(self, pid: int) -> bool:
        """Whether fork server `pid` (one this launcher started) still runs."""
        return bool(self._ask({"op": "alive", "pid": pid})[0].get("alive"))

    def kill(self, pid: int) -> None:
        """Stop fork server `pid` (one this launcher started)."""
        self._ask({"op": "kill", "pid": pid})

    def close(self) -> None:
        """Stop the launcher; its fork servers end when their pipes close."""
        with self._lock:
            self._channel.close()
        try:
            self._proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - stopped below either way
            self._proc.kill()
            self._proc.wait()

    def _ask(self, request: dict[str, Any], want_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            try:
                self._channel.sendall(json.dumps(request).encode())
                fds = array.array("i")
                message, ancillary, _flags, _addr = self._channel.recvmsg(
                    _MAX_MESSAGE, socket.CMSG_SPACE(max(want_fds, 1) * fds.itemsize)
                )
            except OSError as exc:
                raise SandboxError("the sandbox launcher is gone") from exc
        if not message:
            raise SandboxError("the sandbox launcher is gone")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        reply: dict[str, Any] = json.loads(message)
        return reply, list(fds)


def serve(channel: socket.socket, config: dict[str, Any]) -> None:
    """The launcher process's loop: answer requests until the socket closes."""

    servers: dict[int, subprocess.Popen[bytes]] = {}
    while True:
        try:
            message = channel.recv(_MAX_MESSAGE)
        except OSError:
            break
        if not message:
            break
        for pid in [pid for pid, proc in servers.items() if proc.poll() is not None]:
            del servers[pid]
        try:
            request = json.loads(message)
            reply, fds = _answer(request, servers, config)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            reply, fds = {"error": type(exc).__name__}, []
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        channel.sendmsg([json.dumps(reply).encode()], ancillary)
        for fd in fds:
            os.close(fd)
    for proc in servers.values():
        proc.kill()
        proc.wait()


def _answer(
    request: dict[str, Any], servers: dict[int, subprocess.Popen[bytes]], config: dict[str, Any]
) -> tuple[dict[str, Any], list[int]]:
    op = request["op"]
    if op == "spawn":
        return _spawn(servers, config)
    pid = request["pid"]
    if type(pid) is not int or pid not in servers:
        return {"alive": False} if op == "alive" else {"error": "not_ours"}, []
    if op == "alive":
        return {"alive": servers[pid].poll() is None}, []
    if op == "kill":
        servers.pop(pid).kill()
        return {"ok": True}, []
    return {"error": "unknown_op"}, []


def _spawn(
    servers: dict[int, subprocess.Popen[bytes]], config: dict[str, Any]
) -> tuple[dict[str, Any], list[int]]:
    import subprocess

    if len(servers) >= int(config["max_servers"]):
        return {"error": "too_many_servers"}, []
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and program
        [sys.executable, "-I", "-c", config["boot"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=dict(config["env"]),
        close_fds=True,
        cwd="/",
    )
    if proc.stdin is None or proc.stdout is None:
        proc.kill()
        return {"error": "no_pipes"}, []
    # The boot line is written here, not by the caller: the policy is the launcher's.
    boot = f"{config['root']}\0{config['policy']}\n".encode()
    while boot:
        boot = boot[os.write(proc.stdin.fileno(), boot) :]
    servers[proc.pid] = proc
    fds = [os.dup(proc.stdin.fileno()), os.dup(proc.stdout.fileno())]
    # The launcher keeps no end of the pipes: the server sees end of stream when its caller goes.
    proc.stdin.close()
    proc.stdout.close()
    return {"pid": proc.pid}, fds
