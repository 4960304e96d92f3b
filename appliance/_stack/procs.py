"""Small process helpers for the local stack: ports, detached children, pid files.

A service is started detached (its own session, output to a log file) and remembered by a pid file
that also records the process start time, so a stale pid file never makes us signal an unrelated
process that happens to reuse the pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ApplianceError
from .pki import write_file
from .shared_dirs import NotRegularFile, open_log, open_regular

if TYPE_CHECKING:
    from .users import RunAs

# Children started by this process, kept so that they are reaped through `Popen.poll()` (and no
# "subprocess still running" warning fires when a handle is dropped).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(ApplianceError, RuntimeError):
    """Raised when a service of the local stack cannot be started, reached or stopped."""

    code, title = "stack_error", "Stack error"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on `host:port`."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, *, pid: int | None = None, timeout: float = 15.0) -> None:
    """Wait until `host:port` accepts connections; raise `StackError` on timeout or `pid` exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if pid is not None and not pid_alive(pid):
            raise StackError(f"process {pid} exited before listening on {host}:{port}")
        time.sleep(0.05)
    raise StackError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def start_detached(
    argv: Sequence[str],
    *,
    log_file: Path,
    pid_file: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    run_as: RunAs | None = None,
) -> int:
    """Start `argv` in its own session with output appended to `log_file`; record it in `pid_file`.

    `env` is the child's whole environment: nothing of ours is inherited unless passed explicitly.
    The log is created 0600: a service may print secrets at start-up (OpenBao's dev mode does).
    With `run_as`, the process runs as that user, confined (`RunAs.confine`), umask 077.
    Returns the pid.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    # The log's directory may be the service user's: never through a name it planted.
    with os.fdopen(open_log(log_file), "ab") as log:
        proc = subprocess.Popen(
            run_as.confine(list(argv)) if run_as is not None else list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            umask=0o077 if run_as is not None else -1,
        )
    _CHILDREN[proc.pid] = proc
    _write_pid_file(pid_file, proc.pid)
    return proc.pid


def exec_service(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, run_as: RunAs | None = None
) -> None:
    """Replace this process with `argv` (`appliance serve`): same pid, so the signals of the
    supervisor (tini, systemd) reach the service itself. As root with `run_as`, the service is
    confined as `start_detached` confines it (`RunAs.confine`: that user, its groups only, no
    capability, no_new_privs), umask 077; never returns."""
    os.chdir(cwd)
    command = list(argv)
    if run_as is not None and os.geteuid() == 0:
        command = run_as.confine(command)
        os.umask(0o077)
    os.execve(command[0], command, dict(env))  # noqa: S606 - a fixed service command line


def read_pid_file(pid_file: Path) -> int | None:
    """The pid recorded in `pid_file` if that very process still runs, else None.

    The pid file lies in its service's directory, which that service's user may write: a pid
    file is believed only when this process's user wrote it or when the process it names runs
    as the file's owner (a service names its own processes, never root's or another's), and it
    is read without following a symlink."""
    try:
        fd = open_regular(pid_file)
    except (FileNotFoundError, NotRegularFile):
        return None
    with os.fdopen(fd, "rb") as handle:
        owner = os.fstat(fd).st_uid
        fields = handle.read(64).decode("ascii", "replace").split()
    if not fields or not fields[0].isdigit():
        return None
    pid = int(fields[0])
    if not pid_alive(pid):
        return None
    if owner != os.geteuid() and _real_uid(pid) != owner:
        return None  # Written by a service's user, about a process that is not its own.
    if len(fields) > 1 and fields[1] != str(_start_ticks(pid)):
        return None  # The pid was reused by another process.
    return pid


def stop_by_pid_file(pid_file: Path, *, timeout: float = 10.0) -> bool:
    """Stop the process group recorded in `pid_file` (TERM, then KILL after `timeout`).

    Returns True when a live process was stopped, False when none was running. The pid file is
    removed either way.
    """
    pid = read_pid_file(pid_file)
    stopped = False
    if pid is not None:
        _signal_group(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            _signal_group(pid, signal.SIGKILL)
            _wait_gone(pid, timeout)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def pid_alive(pid: int) -> bool:
    """True when `pid` runs and is not a zombie (an exited child of ours is reaped here)."""
    _reap(pid)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _write_pid_file(pid_file: Path, pid: int) -> None:
    write_file(pid_file, f"{pid} {_start_ticks(pid)}\n".encode())


def _real_uid(pid: int) -> int | None:
    """The real uid of `pid` (`/proc/PID/status`; its directory's owner is root's once a
    process changed its uids)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None
    return None


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        after_comm = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return None
    return int(after_comm[19])


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # A detached service leads its own process group: signal the group so that its helper
    # children (a Celery pool, a plugin) go too. Otherwise signal the pid alone.
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
