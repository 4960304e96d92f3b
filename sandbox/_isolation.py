"""The OS layer: what a forked child does to itself before the first line of user code.

Every step here runs in the child, in order, and each is a named layer. A layer that fails is fatal
unless the policy lists it as degraded; the parent then never runs user code. RestrictedPython is
the first wall; this module is what holds when RestrictedPython does not.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import resource
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import pyseccomp

from ._limits import Limits
from ._policy import Policy

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

#: The reply channel is moved to this descriptor; every other descriptor is closed.
REPLY_FD = 3
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
        "pidfd_send_signal", "process_madvise",
    ),
    "signalling": ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"),
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
    flt = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
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
    for call, flags_arg in (("open", 1), ("openat", 2)):
        for flag in _WRITE_OPEN_FLAGS:
            flt.add_rule(deny, call, pyseccomp.Arg(flags_arg, pyseccomp.MASKED_EQ, flag, flag))
    # openat2 takes its flags in a struct the filter cannot read: refuse it outright.
    try:
        flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "openat2")
    except (ValueError, RuntimeError, OSError):
        pass
    return flt


def _prctl(option: int, arg: int = 0) -> int:
    res = int(_libc.prctl(option, arg, 0, 0, 0))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class ChildSetup:
    """What the child needs to isolate itself; prepared by the parent before the fork."""

    policy: Policy
    limits: Limits
    workdir: str
    seccomp: pyseccomp.SyscallFilter | None
    skip: frozenset[str] = frozenset()
    degraded: list[str] = field(default_factory=list)


def _session(setup: ChildSetup) -> None:
    os.setsid()
    # Die with the supervisor: a child must never outlive the process that enforces its limits.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(70)


def _fds(setup: ChildSetup, reply_fd: int) -> None:
    if reply_fd != REPLY_FD:
        os.dup2(reply_fd, REPLY_FD, inheritable=False)
        os.close(reply_fd)
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    if null > REPLY_FD:
        os.close(null)
    os.closerange(REPLY_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1] or 65536)


def _environment(setup: ChildSetup) -> None:
    os.environ.clear()


def _netns(setup: ChildSetup) -> None:
    if os.geteuid() == 0:
        _unshare(CLONE_NEWNET | CLONE_NEWIPC)
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


def _rlimits(setup: ChildSetup, baseline_as: int) -> None:
    lim = setup.limits
    cpu = max(1, math.ceil(lim.cpu_seconds))
    memory = baseline_as + lim.memory_mb * 1024 * 1024
    # A write to a file of any size is refused (EFBIG) instead of killing the child.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for which, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_FSIZE, (0, 0)),
        (resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES)),
        (resource.RLIMIT_NPROC, (0, 0)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_MEMLOCK, (0, 0)),
        (resource.RLIMIT_MSGQUEUE, (0, 0)),
    ):
        resource.setrlimit(which, value)


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
    setup.seccomp.load()


def enter(setup: ChildSetup, reply_fd: int, tolerant: bool = False) -> None:
    """Apply every layer not in `setup.skip`, in order; raise LayerFailed for one that fails.

    With `tolerant` (used only by the probe, which runs no user code) a failing layer is
    recorded in `setup.degraded` instead.
    """
    baseline_as = _address_space_bytes()
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("session", lambda: _session(setup)),
        ("fds", lambda: _fds(setup, reply_fd)),
        ("environment", lambda: _environment(setup)),
        ("netns", lambda: _netns(setup)),
        ("workdir", lambda: _workdir(setup)),
        ("rlimits", lambda: _rlimits(setup, baseline_as)),
        ("uid", lambda: _uid(setup)),
        ("no_new_privs", lambda: _no_new_privs(setup)),
        ("seccomp", lambda: _seccomp(setup)),
    )
    for layer, step in steps:
        if layer in setup.skip:
            setup.degraded.append(layer)
            continue
        try:
            step()
        except (OSError, ValueError, RuntimeError, LayerFailed) as exc:
            if not tolerant:
                raise LayerFailed(layer, str(exc)) from exc
            setup.degraded.append(layer)


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
        and resource.getrlimit(resource.RLIMIT_CORE) == (0, 0),
        "limits not in force",
    )
    check("uid", os.getuid() != 0 and os.geteuid() != 0, "running as root")
    try:
        os.execv("/nonexistent", ["x"])
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
