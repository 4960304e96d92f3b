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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._limits import Limits
from ._policy import Policy

if TYPE_CHECKING:
    # Never imported by the fork server itself (see `export_seccomp_program`).
    import pyseccomp

_libc = ctypes.CDLL(None, use_errno=True)
# Looked up here, in the fork server, once: looking a function up in a child (ctypes builds and
# caches a function object) costs some 45 copy-on-write page faults each time.
_libc_prctl = _libc.prctl
_libc_setns = _libc.setns
_libc_unshare = _libc.unshare

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

#: The reply channel is moved to this descriptor; every other descriptor is closed.
REPLY_FD = 3
#: The request arrives on this descriptor (closed once read); the namespace to join on the next.
REQUEST_FD = 4
NETNS_FD = 5
_FIRST_FREE_FD = 6
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Descriptors a child may hold at once (the interpreter needs a few for its own reads).
MAX_OPEN_FILES = 16

# Which threat each group of denied system calls answers; each is refused with EPERM.
_DENIED_SYSCALLS: dict[str, tuple[str, ...]] = {
    "network": (
        "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto",
        "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg", "getsockopt", "setsockopt",
    ),
    "exec": ("execve", "execveat"),
    "process creation": ("fork", "vfork", "clone"),
    "debugging other processes": (
        "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
        "pidfd_send_signal", "process_madvise", "get_robust_list",
    ),
    "signalling": ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"),
    # Without these a child could throttle or starve any other process of the same uid (another
    # run, or a host daemon running as nobody): renice it, pin it to one CPU, set its I/O class.
    "scheduling other processes": (
        "setpriority", "sched_setaffinity", "sched_setscheduler", "sched_setparam",
        "sched_setattr", "ioprio_set",
    ),
    "mounts": (
        "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
        "fsconfig", "fsmount", "fspick", "mount_setattr",
    ),
    "namespaces": ("unshare", "setns"),
    "identity": (
        "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
        "setfsuid", "setfsgid", "capset",
    ),
    "kernel attack surface": (
        "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "keyctl", "add_key", "request_key", "personality", "prctl",
        "seccomp", "init_module", "finit_module", "delete_module", "kexec_load",
        "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog",
        "name_to_handle_at", "open_by_handle_at", "lookup_dcookie", "iopl", "ioperm",
        "mbind", "migrate_pages", "move_pages", "set_mempolicy", "memfd_create",
        "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
        "setdomainname", "vhangup", "uselib", "ustat", "sysfs", "nfsservctl",
    ),
    "file system writes": (
        "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
        "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "chown",
        "fchown", "fchownat", "lchown", "truncate", "ftruncate", "mknod", "mknodat", "utime",
        "utimes", "utimensat", "futimesat", "creat", "setxattr", "lsetxattr", "fsetxattr",
        "removexattr", "lremovexattr", "fremovexattr", "fallocate",
    ),
}

_SCMP_FLTATR_CTL_OPTIMIZE = 8  # libseccomp's filter attribute: 1 = list, 2 = binary tree

_WRITE_OPEN_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)


class LayerFailed(Exception):
    """Raised in the child when a required isolation layer cannot be applied."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


def denied_syscalls() -> tuple[str, ...]:
    """Every system call the filter refuses (for documentation and `doctor`)."""
    return tuple(name for group in _DENIED_SYSCALLS.values() for name in group)


def build_seccomp_filter() -> pyseccomp.SyscallFilter:
    """Build the filter once in the parent; each child only loads it (libseccomp, not hand BPF).

    Default allow with an explicit deny list: the interpreter keeps working, and every call that
    reaches the network, another process, the kernel's rarer surfaces or the file system's
    write side is refused with EPERM. Calls for other architectures are killed (libseccomp's
    default bad-architecture action), which closes the 32-bit and x32 entry points.
    """
    import pyseccomp

    flt = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    try:
        # A binary tree instead of a list: the kernel's per-syscall verdict cache, built when
        # each child installs the filter, costs a third as much.
        flt.set_attr(_SCMP_FLTATR_CTL_OPTIMIZE, 2)
    except (OSError, ValueError, RuntimeError):
        pass  # libseccomp older than 2.5: the list is as strict, only slower to install.
    deny = pyseccomp.ERRNO(errno.EPERM)
    for name in denied_syscalls():
        try:
            flt.add_rule(deny, name)
        except (ValueError, RuntimeError, OSError):
            continue  # Not a system call on this architecture.
    # clone3 gets ENOSYS so that libc falls back to clone, which is refused above.
    try:
        flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    except (ValueError, RuntimeError, OSError):
        pass
    # prlimit64 on another process would let a child lower the limits of any process of the
    # same uid (CPU 1 s, one descriptor: a kill by other means). pid 0 (itself) stays allowed:
    # glibc implements getrlimit and setrlimit with it.
    flt.add_rule(deny, "prlimit64", pyseccomp.Arg(0, pyseccomp.NE, 0))
    for call, flags_arg in (("open", 1), ("openat", 2)):
        for flag in _WRITE_OPEN_FLAGS:
            flt.add_rule(deny, call, pyseccomp.Arg(flags_arg, pyseccomp.MASKED_EQ, flag, flag))
    # openat2 takes its flags in a struct the filter cannot read: refuse it outright.
    try:
        flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "openat2")
    except (ValueError, RuntimeError, OSError):
        pass
    return flt


_BPF_INSTRUCTION_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def export_bpf(flt: pyseccomp.SyscallFilter) -> bytes:
    """The BPF program libseccomp generates for a filter (what `load()` would install)."""
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


def export_seccomp_program() -> bytes:
    """Build the filter and export its BPF program in a throwaway child; return the program.

    pyseccomp imports ctypes.util, which imports subprocess and threading. Once threading is
    imported, every fork runs its after-fork hook in the child: about 120 page faults and half
    a millisecond per run on a virtual machine. So the fork server never imports pyseccomp.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - helper child
        code = 1
        try:
            os.close(read_fd)
            view = memoryview(export_bpf(build_seccomp_filter()))
            while view:
                view = view[os.write(write_fd, view):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    try:
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise RuntimeError("libseccomp could not build the filter")
    return b"".join(chunks)


class SeccompProgram:
    """A BPF program libseccomp generated (see `export_seccomp_program`), ready to install.

    libseccomp builds the program anew on every `load()`, which costs each child more than half
    a millisecond; children install these exact bytes instead, from a `struct sock_fprog` the
    parent has already laid out.
    """

    def __init__(self, program: bytes) -> None:
        self.program = bytes(program)
        if not self.program or len(self.program) % _BPF_INSTRUCTION_SIZE:
            raise RuntimeError("libseccomp exported no valid BPF program")
        self._buffer = ctypes.create_string_buffer(self.program, len(self.program))
        self._fprog = _SockFprog(
            len(self.program) // _BPF_INSTRUCTION_SIZE, ctypes.addressof(self._buffer)
        )

    def install(self) -> None:
        """Install the program in this process, as seccomp_load() does with default attributes.

        Needs no_new_privs (set by the previous layer); the child is single-threaded (no TSYNC).
        """
        if _libc_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


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
    skip: frozenset[str] = frozenset()
    degraded: list[str] = field(default_factory=list)


def _session(setup: ChildSetup) -> None:
    os.setsid()
    # Die with the parent from here on (armed again by `_bind_to_parent`, see there).
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != setup.parent_pid:
        os._exit(70)  # The parent died before the signal was armed.


def _bind_to_parent(setup: ChildSetup) -> None:
    """Arm the parent-death signal for good, just before seccomp refuses prctl.

    A child must never outlive the process that enforces its wall clock: its parent is the
    supervisor, or the supervisor's zygote, which dies with the supervisor. The kernel clears
    the signal whenever the credentials change, which the uid layer has just done.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != setup.parent_pid:
        os._exit(70)


def _fds(setup: ChildSetup, reply_fd: int, request_fd: int | None) -> None:
    # First lift every descriptor we keep above the fixed slots, so no dup2 below overwrites one
    # that is still to be moved.
    lifted = [
        (target, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FIRST_FREE_FD))
        for target, fd in (
            (REPLY_FD, reply_fd), (REQUEST_FD, request_fd), (NETNS_FD, setup.netns_fd)
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


def _netns(setup: ChildSetup) -> None:
    if os.geteuid() == 0:
        if setup.netns_fd is None:
            _unshare(CLONE_NEWNET | CLONE_NEWIPC)
            return
        _setns(NETNS_FD, CLONE_NEWNET)
        _unshare(CLONE_NEWIPC)
        return
    # Unprivileged host: a user namespace gives the rights to make the others.
    uid, gid = os.getuid(), os.getgid()
    _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


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


def enter(
    setup: ChildSetup, reply_fd: int, request_fd: int | None, tolerant: bool = False
) -> None:
    """Apply every layer not in `setup.skip`, in order; raise LayerFailed for one that fails.

    With `tolerant` (used only by the probe, which runs no user code) a failing layer is
    recorded in `setup.degraded` instead. Afterwards the only descriptors open are 0-2
    (/dev/null), REPLY_FD and, unless None was given, REQUEST_FD.
    """
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("session", lambda: _session(setup)),
        ("fds", lambda: _fds(setup, reply_fd, request_fd)),
        ("environment", lambda: _environment(setup)),
        ("netns", lambda: _netns(setup)),
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
    try:
        os.execv("/nonexistent", ["x"])  # noqa: S606 - the filter must refuse it
    except PermissionError:
        seccomp_ok = True
    except OSError:
        seccomp_ok = False
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        seccomp_ok = False
    except PermissionError:
        pass
    check("seccomp", seccomp_ok, "execve or socket not refused")
    # prctl is refused under seccomp, so no_new_privs is read from the status the parent saw.
    report.setdefault("no_new_privs", "" if "no_new_privs" not in setup.degraded else "skipped")
    report.setdefault("netns", "" if "netns" not in setup.degraded else "skipped")
    return report
