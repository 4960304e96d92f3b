"""The OS layer: what a forked child does to itself before the first line of user code.

Every step here runs in the child, in order, and each is a named layer. A layer that fails is fatal
unless the policy lists it as degraded; the parent then never runs user code. RestrictedPython is
the first wall; this module is what holds when RestrictedPython does not.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import math
import os
import resource
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ._cgroup import join as _cgroup_join
from ._limits import Limits
from ._policy import Policy
from ._seccomp import Program as SeccompProgram

_libc = ctypes.CDLL(None, use_errno=True)
# Looked up here, in the fork server, once: looking a function up in a child (ctypes builds and
# caches a function object) costs some 45 copy-on-write page faults each time.
_libc_prctl = _libc.prctl
_libc_setns = _libc.setns
_libc_unshare = _libc.unshare
_libc_sethostname = _libc.sethostname
# The raw clone below must run with the GIL held, as os.fork() does: a PyDLL call keeps it.
_libc_syscall = ctypes.PyDLL(None, use_errno=True).syscall
_libc_syscall.restype = ctypes.c_long
_libc_syscall.argtypes = [
    ctypes.c_long,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_ulong,
]
_before_fork = ctypes.pythonapi.PyOS_BeforeFork
_after_fork_child = ctypes.pythonapi.PyOS_AfterFork_Child
_after_fork_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
#: The namespaces every child is born in (root only): its own PID, UTS and IPC namespaces.
CHILD_NAMESPACES = CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
#: The host name a child sees (its own UTS namespace): nothing of the host's.
HOSTNAME = b"sandbox"

#: The reply channel is moved to this descriptor; every other descriptor is closed.
REPLY_FD = 3
#: The request arrives on this descriptor (closed once read); the namespace to join on the next.
REQUEST_FD = 4
NETNS_FD = 5
_FIRST_FREE_FD = 6
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Descriptors a child may hold at once (the interpreter needs a few for its own reads).
MAX_OPEN_FILES = 16


class LayerFailed(Exception):
    """Raised in the child when a required isolation layer cannot be applied."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


def fork_child() -> int:
    """fork(), with the child born in its own PID, UTS and IPC namespaces; returns as fork().

    As root, a raw clone(2) with the namespace flags, wrapped in CPython's own before- and
    after-fork steps exactly as os.fork() wraps fork(2), so the interpreter state of both sides
    is what os.fork() leaves. The child is pid 1 of a namespace holding nothing else: no pid of
    another run, of its own fork server's next spare or of the host can be named in kill,
    F_SETOWN, getpgid, getsid or a CPU clock. Elsewhere (no root, or an architecture this does
    not know) a plain fork, and the child reports those layers missing.
    """
    if _SYS_CLONE is None or os.geteuid() != 0:
        return os.fork()
    _before_fork()
    pid = int(_libc_syscall(_SYS_CLONE, CHILD_NAMESPACES | signal.SIGCHLD, None, None, None, 0))
    if pid == 0:
        _after_fork_child()
        return 0
    err = ctypes.get_errno()
    _after_fork_parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


def namespace_ids() -> dict[str, int]:
    """This process's PID, UTS, IPC and network namespaces, by inode (the parent's, for a child
    to check)."""
    ids = {}
    for name in ("pid", "uts", "ipc", "net"):
        try:
            ids[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            ids[name] = 0
    return ids


def prepare_parent() -> None:
    """In the process that forks children, once: what every child would otherwise do itself.

    SIGXFSZ is ignored here and so in every child, where a write past RLIMIT_FSIZE then fails
    with EFBIG instead of killing the child (setting it in each child cost some 40 page faults
    in Python's signal wrapper). This process itself has no file size limit.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def create_netns() -> int:
    """In the parent (root only): a new, empty network namespace; returns a descriptor to it.

    Creating a network namespace costs about 0.6 ms per child (and more in the kernel's clean-up
    work), so the parent makes one and each child joins it with setns(). Sharing it is safe: it
    holds only a loopback device that is down and that nobody in it can bring up (the children
    have no capabilities); no child can create a socket at all (seccomp); and a supervisor runs
    one child at a time, the others in it being spares that have not received a request and so
    run no user code. The IPC namespace, whose objects outlive processes, stays private to each
    child.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - helper child
        try:
            os.close(read_fd)
            _unshare(CLONE_NEWNET)
            os.write(write_fd, b"1")
            os.close(write_fd)
            signal.pause()
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        if os.read(read_fd, 1) != b"1":
            raise OSError(errno.EPERM, "cannot create a network namespace")
        return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(read_fd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _setns(fd: int, nstype: int) -> None:
    if _libc_setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _prctl(option: int, arg: int = 0) -> int:
    res = int(_libc_prctl(option, arg, 0, 0, 0))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def _unshare(flags: int) -> None:
    if _libc_unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def address_space_bytes() -> int:
    """This process's virtual memory size; read by the parent just before it forks."""
    # Plain descriptors, not open(): the zygote reads this before every fork, and each page
    # the io stack would touch is a copy-on-write fault there (about 60 per fork).
    fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(os.read(fd, 256).split()[0]) * _PAGE_SIZE
    finally:
        os.close(fd)


@dataclass
class ChildSetup:
    """What the child needs to isolate itself; prepared by the parent before the fork."""

    policy: Policy
    workdir: str
    seccomp: SeccompProgram | None
    #: The virtual memory the child starts with (the parent's at the fork); memory_mb is added.
    baseline_as: int
    #: The process that forks the child (the supervisor or its zygote): it must not outlive it.
    parent_pid: int
    #: A network namespace made once by the parent (`create_netns`), or None to make one here.
    netns_fd: int | None = None
    #: The run's memory cgroup (see `_cgroup`), or None with the reason there is none.
    cgroup: str | None = None
    cgroup_reason: str = "no memory cgroup"
    #: The parent's namespaces by inode (`namespace_ids`): the child must be in other ones.
    parent_ns: dict[str, int] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()
    degraded: list[str] = field(default_factory=list)


def _session(setup: ChildSetup) -> None:
    os.setsid()
    # Die with the parent from here on (armed again by `_bind_to_parent`, see there).
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _check_parent(setup)


def _check_parent(setup: ChildSetup) -> None:
    # In its own PID namespace the child's parent has no pid it can see (getppid() is 0): a
    # parent that died before the signal was armed is then noticed otherwise (a spare's request
    # channel closes; a running child is killed by its supervisor).
    if os.getppid() not in (setup.parent_pid, 0) or (os.getppid() == 0 and os.getpid() != 1):
        os._exit(70)  # The parent died before the signal was armed.


def _bind_to_parent(setup: ChildSetup) -> None:
    """Arm the parent-death signal for good, just before seccomp refuses prctl.

    A child must never outlive the process that enforces its wall clock: its parent is the
    supervisor, or the supervisor's zygote, which dies with the supervisor. The kernel clears
    the signal whenever the credentials change, which the uid layer has just done.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _check_parent(setup)


def _fds(setup: ChildSetup, reply_fd: int, request_fd: int | None) -> None:
    # First lift every descriptor we keep above the fixed slots, so no dup2 below overwrites one
    # that is still to be moved.
    lifted = [
        (target, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FIRST_FREE_FD))
        for target, fd in (
            (REPLY_FD, reply_fd),
            (REQUEST_FD, request_fd),
            (NETNS_FD, setup.netns_fd),
        )
        if fd is not None
    ]
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    for target, fd in lifted:
        os.dup2(fd, target, inheritable=False)
    top = resource.getrlimit(resource.RLIMIT_NOFILE)[1] or 65536
    kept = {target for target, _ in lifted}
    for fd in (REPLY_FD, REQUEST_FD, NETNS_FD):
        if fd not in kept:
            _close_quietly(fd)
    os.closerange(_FIRST_FREE_FD, top)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _environment(setup: ChildSetup) -> None:
    # The fork server starts with an empty environment, so this is normally a no-op; clear()
    # on an empty mapping would still cost some 70 page faults (it ends in a KeyError).
    if os.environ:
        os.environ.clear()


def _in_new_namespace(setup: ChildSetup, kind: str) -> bool:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino != setup.parent_ns.get(kind, 0)
    except OSError:
        return False


def _pidns(setup: ChildSetup) -> None:
    # Made by `fork_child` (clone): the child is pid 1 of a namespace of its own.
    if os.getpid() != 1:
        raise LayerFailed("pidns", "not born in a PID namespace of its own (clone refused)")


def _utsns(setup: ChildSetup) -> None:
    # Checked before sethostname: in the host's UTS namespace it would rename the host.
    if not _in_new_namespace(setup, "uts"):
        raise LayerFailed("utsns", "not born in a UTS namespace of its own")
    if _libc_sethostname(HOSTNAME, len(HOSTNAME)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ipcns(setup: ChildSetup) -> None:
    # SysV IPC objects outlive their process unless the namespace dies with it.
    if os.geteuid() == 0 and not _in_new_namespace(setup, "ipc"):
        raise LayerFailed("ipcns", "not born in an IPC namespace of its own")


def _netns(setup: ChildSetup) -> None:
    if os.geteuid() == 0:
        if setup.netns_fd is None:
            _unshare(CLONE_NEWNET)
        else:
            _setns(NETNS_FD, CLONE_NEWNET)
    else:
        # Unprivileged host: a user namespace gives the rights to make the others.
        uid, gid = os.getuid(), os.getgid()
        _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    # Checked from inside, while /proc is still there: from outside, reading a non-dumpable
    # child's namespace needs CAP_SYS_PTRACE, which a worker container need not have.
    if not _in_new_namespace(setup, "net"):
        raise LayerFailed("netns", "not in a network namespace of its own")


def _memory_cgroup(setup: ChildSetup) -> None:
    if setup.cgroup is None:
        raise LayerFailed("memory_cgroup", setup.cgroup_reason)
    _cgroup_join(setup.cgroup)


def _workdir(setup: ChildSetup) -> None:
    os.chroot(setup.workdir)
    os.chdir("/")


def _cpu_and_memory(limits: Limits, baseline_as: int) -> tuple[tuple[int, int], int]:
    cpu = max(1, math.ceil(limits.cpu_seconds))
    return (cpu, cpu + 1), baseline_as + limits.memory_mb * 1024 * 1024


def _rlimits(setup: ChildSetup) -> None:
    # Until the request arrives the child is held to the policy's maxima; `apply_run_limits`
    # then lowers CPU and memory to the run's (lowering needs no privilege).
    cpu, memory = _cpu_and_memory(setup.policy.maxima, setup.baseline_as)
    # A write to a file of any size is refused (EFBIG) instead of killing the child: SIGXFSZ is
    # ignored by the forking process already (`prepare_parent`), and the child inherits that.
    for which, value in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_FSIZE, (0, 0)),
        (resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES)),
        (resource.RLIMIT_NPROC, (0, 0)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_MEMLOCK, (0, 0)),
        (resource.RLIMIT_MSGQUEUE, (0, 0)),
    ):
        resource.setrlimit(which, value)


def apply_run_limits(setup: ChildSetup, limits: Limits) -> None:
    """In the child, once the request is known: lower CPU and memory to the run's limits."""
    if "rlimits" in setup.skip:
        return
    cpu, memory = _cpu_and_memory(limits, setup.baseline_as)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, cpu)
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (OSError, ValueError) as exc:
        raise LayerFailed("rlimits", str(exc)) from exc


def _uid(setup: ChildSetup) -> None:
    if os.getuid() != 0:
        return  # Already unprivileged on the host (user-namespace path).
    os.setgroups([])
    os.setresgid(setup.policy.gid, setup.policy.gid, setup.policy.gid)
    os.setresuid(setup.policy.uid, setup.policy.uid, setup.policy.uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise LayerFailed("uid", "still root after setresuid")


def _no_new_privs(setup: ChildSetup) -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)


def _seccomp(setup: ChildSetup) -> None:
    if setup.seccomp is None:
        raise LayerFailed("seccomp", "no filter was built")
    setup.seccomp.install()


def enter(setup: ChildSetup, reply_fd: int, request_fd: int | None, tolerant: bool = False) -> None:
    """Apply every layer not in `setup.skip`, in order; raise LayerFailed for one that fails.

    With `tolerant` (used only by the probe, which runs no user code) a failing layer is
    recorded in `setup.degraded` instead. Afterwards the only descriptors open are 0-2
    (/dev/null), REPLY_FD and, unless None was given, REQUEST_FD.
    """
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("session", lambda: _session(setup)),
        ("fds", lambda: _fds(setup, reply_fd, request_fd)),
        ("environment", lambda: _environment(setup)),
        ("pidns", lambda: _pidns(setup)),
        ("utsns", lambda: _utsns(setup)),
        ("ipcns", lambda: _ipcns(setup)),
        ("netns", lambda: _netns(setup)),
        ("memory_cgroup", lambda: _memory_cgroup(setup)),
        ("workdir", lambda: _workdir(setup)),
        ("rlimits", lambda: _rlimits(setup)),
        ("uid", lambda: _uid(setup)),
        ("no_new_privs", lambda: _no_new_privs(setup)),
        ("seccomp", lambda: _seccomp(setup)),
    )
    for layer, step in steps:
        if layer == "seccomp":
            _bind_to_parent(setup)  # not a layer: always, and before prctl is refused
        if layer in setup.skip:
            setup.degraded.append(layer)
            continue
        try:
            step()
        except (OSError, ValueError, RuntimeError, LayerFailed) as exc:
            if not tolerant:
                raise LayerFailed(layer, str(exc)) from exc
            setup.degraded.append(layer)
        finally:
            if layer == "netns" and setup.netns_fd is not None:
                _close_quietly(NETNS_FD)


def _seccomp_refuses() -> bool:
    """In the probe: whether the filter refuses exec and sockets, and answers ENOSYS off-list."""
    try:
        os.execv("/nonexistent", ["x"])  # noqa: S606 - the filter must refuse it
    except PermissionError:
        refused = True
    except OSError:
        refused = False
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        refused = False
    except PermissionError:
        pass
    try:
        # On no list at all: the allow list's default answer, ENOSYS.
        os.close(os.pipe()[0])
        refused = False
    except OSError as exc:
        refused = refused and exc.errno == errno.ENOSYS
    return refused


def verify(setup: ChildSetup) -> dict[str, str]:
    """In an isolated child: check each layer's effect from the inside (for `doctor`).

    Returns layer -> "" when the effect is observed, or a reason when it is not.
    """
    report: dict[str, str] = {}

    def check(layer: str, ok: bool, why: str) -> None:
        report[layer] = "" if ok and layer not in setup.degraded else (why or "skipped")

    check("session", os.getsid(0) == os.getpid(), "not a session leader")
    open_fds = []
    for fd in range(64):
        if fd in (0, 1, 2, REPLY_FD):
            continue
        try:
            os.fstat(fd)
            open_fds.append(fd)
        except OSError:
            pass
    check("fds", not open_fds, f"descriptors still open: {open_fds}")
    check("environment", not os.environ, "environment not empty")
    try:
        check("workdir", not os.listdir("/"), "root directory is not empty")
    except OSError as exc:
        check("workdir", False, f"cannot list the root directory: {exc}")
    check(
        "rlimits",
        resource.getrlimit(resource.RLIMIT_NPROC) == (0, 0)
        and resource.getrlimit(resource.RLIMIT_FSIZE) == (0, 0)
        and resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
        and signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN,
        "limits not in force",
    )
    check("uid", os.getuid() != 0 and os.geteuid() != 0, "running as root")
    check("pidns", os.getpid() == 1, "not pid 1 of a PID namespace of its own")
    check("utsns", os.uname().nodename == HOSTNAME.decode(), "sees the host's name")
    seccomp_ok = _seccomp_refuses()
    check("seccomp", seccomp_ok, "execve or socket not refused, or pipe2 not ENOSYS")
    # prctl is refused under seccomp, so no_new_privs is read from the status the parent saw;
    # namespaces and the cgroup are checked from outside as well (see `_proc_checks`).
    for layer in ("no_new_privs", "netns", "ipcns", "memory_cgroup"):
        report.setdefault(layer, "" if layer not in setup.degraded else "skipped")
    return report
