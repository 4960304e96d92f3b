"""The zygote: a copy of the supervisor, made before any request, that forks and reaps spares.

Two reasons. Speed: a process pays a copy-on-write page fault for every page it writes after it
forks, so a supervisor that forked a child on every run paid some 350 faults per run (well over
a millisecond on a virtual machine); the zygote's loop touches a handful of pages. Hygiene: a
spare is a copy of the zygote, made before the supervisor received anything, so no spare ever
holds an earlier run's source, arguments or results in its memory.

Spares are the zygote's children, so the zygote also reaps them and reports each one's exit
status and resource usage. The supervisor watches a spare through a pidfd and may kill its
process group; the zygote dies with the supervisor, and every spare with the zygote.

The protocol is small binary messages over a SOCK_SEQPACKET socket pair, answered strictly in
order (binary, not JSON: every page the zygote's loop touches is a copy-on-write fault after
each fork, and the JSON codec alone cost some 60 of them per spare):
spawn: b"S" workdir NUL cgroup (empty for none) NUL skipped-layers (comma-separated), with
the spare's two pipe ends attached -> b"P" pid; reap: b"R" pid -> b"U" status utime stime
maxrss; discard (a spare killed after its whole reply): b"D" pid -> no answer. A failure is
answered b"E" reason.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import _child, _isolation

_MAX_MESSAGE = 64 * 1024
_PID = struct.Struct("=q")
_USAGE = struct.Struct("=qddq")
_FDS = struct.Struct("=ii")
_FDS_SPACE = socket.CMSG_SPACE(_FDS.size)

#: Builds a spare's setup in the zygote: (working directory, cgroup, layers to skip) -> setup.
SetupFactory = Callable[[str, str | None, frozenset[str]], _isolation.ChildSetup]


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

    def spawn(
        self,
        workdir: str,
        cgroup: str | None,
        skip: frozenset[str],
        reply_fd: int,
        request_fd: int,
    ) -> None:
        """Ask for a spare with these pipe ends; the caller may close its copies right away."""
        message = (
            b"S"
            + workdir.encode()
            + b"\0"
            + (cgroup or "").encode()
            + b"\0"
            + ",".join(sorted(skip)).encode()
        )
        socket.send_fds(self._socket, [message], [reply_fd, request_fd])

    def next_spawned(self) -> int:
        """The pid of the oldest spare asked for and not yet collected; raises OSError."""
        while not self._spawned:
            self._read_answer()
        return self._spawned.pop(0)

    def reap(self, pid: int) -> tuple[int, Usage]:
        """Wait for a spare to exit (kill it first to hurry it); its wait status and usage."""
        self._socket.send(b"R" + _PID.pack(pid))
        while True:
            answer = self._read_answer()
            if answer is not None:
                return answer

    def discard(self, pid: int) -> None:
        """Have a spare that was already killed reaped, without an answer."""
        self._socket.send(b"D" + _PID.pack(pid))

    def _read_answer(self) -> tuple[int, Usage] | None:
        data = self._socket.recv(_MAX_MESSAGE)
        if not data:
            raise OSError("the zygote exited")
        kind, body = data[:1], data[1:]
        try:
            if kind == b"P":
                self._spawned.append(_PID.unpack(body)[0])
                return None
            if kind == b"U":
                status, utime, stime, maxrss = _USAGE.unpack(body)
                return status, Usage(utime, stime, maxrss)
        except struct.error as exc:
            raise OSError("the zygote sent a malformed answer") from exc
        # The supervisor then stops using this zygote and forks its own children.
        raise OSError(f"the zygote failed: {body[:200].decode(errors='replace')}")

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
            message, ancillary, _, _ = sock.recvmsg(_MAX_MESSAGE, _FDS_SPACE)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)  # The supervisor closed its end; the spares die with this process.
        fds = [fd for _, _, data in ancillary for fd in _FDS.unpack(data[: _FDS.size])]
        answer: bytes | None
        try:
            kind = message[:1]
            if kind == b"S":
                answer = b"P" + _PID.pack(_spawn(message[1:], fds, make_setup, executor))
            elif kind == b"D":
                _discard(_PID.unpack(message[1:])[0])
                answer = None
            else:
                answer = b"U" + _USAGE.pack(*_reap(_PID.unpack(message[1:])[0]))
        except (OSError, ValueError, struct.error) as exc:
            answer = b"E" + str(exc).encode(errors="replace")
        finally:
            for fd in fds:
                os.close(fd)
        if answer is not None:
            sock.send(answer)


def _spawn(
    request: bytes, fds: list[int], make_setup: SetupFactory, executor: _child.Executor
) -> int:  # pragma: no cover - runs in the zygote
    if len(fds) != 2:
        raise ValueError("a spawn request needs two descriptors")
    reply_fd, request_fd = fds
    workdir, cgroup, skipped = request.decode().split("\0")
    setup = make_setup(
        workdir, cgroup or None, frozenset(skipped.split(",")) if skipped else frozenset()
    )
    pid = _isolation.fork_child()
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


def _reap(pid: int) -> tuple[int, float, float, int]:  # pragma: no cover - runs in the zygote
    _, status, rusage = os.wait4(pid, 0)
    return status, rusage.ru_utime, rusage.ru_stime, rusage.ru_maxrss
