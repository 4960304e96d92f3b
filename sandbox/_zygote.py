"""The zygote: a copy of the supervisor, made before any request, that forks and reaps spares.

Two reasons. Speed: a process pays a copy-on-write page fault for every page it writes after it
forks, so a supervisor that forked a child on every run paid some 350 faults per run (well over
a millisecond on a virtual machine); the zygote's loop touches a handful of pages. Hygiene: a
spare is a copy of the zygote, made before the supervisor received anything, so no spare ever
holds an earlier run's source, arguments or results in its memory.

Spares are the zygote's children, so the zygote also reaps them and reports each one's exit
status and resource usage. The supervisor watches a spare through a pidfd and may kill its
process group; the zygote dies with the supervisor, and every spare with the zygote.

The protocol is JSON over a SOCK_SEQPACKET socket pair, answered strictly in order:
{"op": "spawn", "workdir", "skip"} with the spare's two pipe ends attached -> {"pid"};
{"op": "reap", "pid"} -> {"status", "utime", "stime", "maxrss"}; {"error"} for a failure;
{"op": "discard", "pid"} (a spare killed after its whole reply) -> no answer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import _child, _isolation

_MAX_MESSAGE = 64 * 1024

#: Builds a spare's setup in the zygote: (working directory, layers to skip) -> setup.
SetupFactory = Callable[[str, frozenset[str]], _isolation.ChildSetup]


@dataclass(frozen=True)
class Usage:
    """The part of a reaped child's rusage the supervisor reports (same names as os.wait4's)."""

    ru_utime: float
    ru_stime: float
    ru_maxrss: int


class Zygote:
    """The supervisor's handle on its zygote process."""

    def __init__(
        self, make_setup: SetupFactory, executor: _child.Executor, keep_fds: Iterable[int] = ()
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the zygote never returns
            try:
                ours.close()
                _close_all_but({0, 1, 2, theirs.fileno(), *keep_fds})
                _serve(theirs, make_setup, executor, supervisor)
            finally:
                os._exit(70)
        theirs.close()
        self.pid = pid
        self._socket = ours
        self._spawned: list[int] = []  # spawn answers read while waiting for something else

    def spawn(self, workdir: str, skip: frozenset[str], reply_fd: int, request_fd: int) -> None:
        """Ask for a spare with these pipe ends; the caller may close its copies right away."""
        message = json.dumps({"op": "spawn", "workdir": workdir, "skip": sorted(skip)}).encode()
        socket.send_fds(self._socket, [message], [reply_fd, request_fd])

    def next_spawned(self) -> int:
        """The pid of the oldest spare asked for and not yet collected; raises OSError."""
        while not self._spawned:
            self._read_answer()
        return self._spawned.pop(0)

    def reap(self, pid: int) -> tuple[int, Usage]:
        """Wait for a spare to exit (kill it first to hurry it); its wait status and usage."""
        self._socket.send(json.dumps({"op": "reap", "pid": pid}).encode())
        while True:
            answer = self._read_answer()
            if answer is not None:
                return answer

    def discard(self, pid: int) -> None:
        """Have a spare that was already killed reaped, without an answer."""
        self._socket.send(json.dumps({"op": "discard", "pid": pid}).encode())

    def _read_answer(self) -> tuple[int, Usage] | None:
        data = self._socket.recv(_MAX_MESSAGE)
        if not data:
            raise OSError("the zygote exited")
        answer: dict[str, Any] = json.loads(data)
        if "error" in answer:
            # The supervisor then stops using this zygote and forks its own children.
            raise OSError(f"the zygote failed: {str(answer['error'])[:200]}")
        if "pid" in answer:
            self._spawned.append(int(answer["pid"]))
            return None
        return int(answer["status"]), Usage(
            float(answer["utime"]), float(answer["stime"]), int(answer["maxrss"])
        )

    def alive(self) -> bool:
        """Whether the zygote is still running (it may have been killed from outside)."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def close(self) -> None:
        """Stop the zygote (it exits when its socket closes, its spares with it) and reap it."""
        self._socket.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _close_all_but(keep: set[int]) -> None:  # pragma: no cover - runs in the zygote
    # Nothing of the supervisor's (its protocol pipes above all) stays open in the zygote.
    low = 0
    for fd in sorted(keep):
        if low < fd:  # closerange(n, n) would close everything from n up
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def _serve(
    sock: socket.socket, make_setup: SetupFactory, executor: _child.Executor, supervisor: int
) -> None:  # pragma: no cover - runs in the zygote
    _isolation._prctl(_isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:
        os._exit(0)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 2)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)  # The supervisor closed its end; the spares die with this process.
        answer: dict[str, Any] | None
        try:
            request = json.loads(message)
            if request["op"] == "spawn":
                answer = {"pid": _spawn(request, fds, make_setup, executor)}
            elif request["op"] == "discard":
                answer = _discard(int(request["pid"]))
            else:
                answer = _reap(int(request["pid"]))
        except (OSError, ValueError, KeyError) as exc:
            answer = {"error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        if answer is not None:
            sock.send(json.dumps(answer).encode())


def _spawn(
    request: dict[str, Any], fds: list[int], make_setup: SetupFactory, executor: _child.Executor
) -> int:  # pragma: no cover - runs in the zygote
    reply_fd, request_fd = fds
    setup = make_setup(request["workdir"], frozenset(request["skip"]))
    pid = os.fork()
    if pid == 0:
        try:
            _child.main(setup, reply_fd, request_fd, executor)
        finally:
            os._exit(70)
    return pid


def _discard(pid: int) -> None:  # pragma: no cover - runs in the zygote
    # The supervisor has killed it already; only spares are ever waited for (os.wait4 would
    # refuse any other pid).
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass
    return None


def _reap(pid: int) -> dict[str, Any]:  # pragma: no cover - runs in the zygote
    _, status, rusage = os.wait4(pid, 0)
    return {"status": status, "utime": rusage.ru_utime, "stime": rusage.ru_stime,
            "maxrss": rusage.ru_maxrss}
