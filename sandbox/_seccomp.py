"""The seccomp layer: an allow list of the system calls an isolated run needs, and nothing else.

Default deny. A call on no list gets ENOSYS, so that glibc falls back where it knows how (clone3
to clone, faccessat2 to faccessat) and a call newer than this table (fchmodat2, setxattrat,
file_setattr, open_tree_attr, ...) never reaches the kernel. Calls known to be dangerous are also
listed by name and refused with EPERM: the code then sees "Permission denied", and the reason each
is refused stays written down. A few calls are allowed only with some arguments (`fcntl`,
`ioctl`, `openat`, `prlimit64`, `clock_gettime`, `getpgid`, `getsid`).

The table is what a RestrictedPython run needs once every other layer is in place: reading its
request, compiling, allocating, running, writing its reply and waiting to be killed (traced with
strace on this project's runs, then widened only to read-only calls the standard library makes on
other paths). libseccomp builds the program; the fork server never imports it (see
`export_program`). Calls for other architectures (32-bit and x32 entry points) are killed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._framing import read_frame, write_frame

if TYPE_CHECKING:
    import pyseccomp

# What each group of allowed calls is for. Unknown names on this architecture are skipped.
ALLOWED: dict[str, tuple[str, ...]] = {
    "memory": ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise"),
    "its own descriptors": (
        "read",
        "readv",
        "pread64",
        "write",
        "writev",
        "pwrite64",
        "close",
        "lseek",
    ),
    "read-only file-system queries (the root is an empty, read-only directory)": (
        "fstat",
        "newfstatat",
        "stat",
        "lstat",
        "statx",
        "getdents64",
        "getcwd",
        "readlink",
        "readlinkat",
        "access",
        "faccessat",
        "faccessat2",
    ),
    "waiting for its request, sleeping, and waiting to be killed": (
        "select",
        "pselect6",
        "poll",
        "ppoll",
        "pause",
        "nanosleep",
        "clock_nanosleep",
        "sched_yield",
        "futex",
        "restart_syscall",
    ),
    "its own signal handling": ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack"),
    "time": ("clock_getres", "gettimeofday", "time"),
    "who it is (it is pid 1 of its own PID namespace)": (
        "getpid",
        "gettid",
        "getppid",
        "getpgrp",
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "getresuid",
        "getresgid",
        "getgroups",
        "uname",
    ),
    "its own limits and usage": ("getrlimit", "getrusage"),
    "randomness": ("getrandom",),
    "ending": ("exit", "exit_group"),
}

# Refused by name with EPERM, with the threat each group answers. Everything else not allowed
# gets ENOSYS; these are listed so that the refusal says "not permitted" and stays documented.
DENIED: dict[str, tuple[str, ...]] = {
    "network": (
        "socket",
        "socketpair",
        "connect",
        "bind",
        "listen",
        "accept",
        "accept4",
        "sendto",
        "sendmsg",
        "sendmmsg",
        "recvfrom",
        "recvmsg",
        "recvmmsg",
        "getsockopt",
        "setsockopt",
    ),
    "exec": ("execve", "execveat"),
    "process creation": ("fork", "vfork", "clone"),
    "debugging other processes": (
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "kcmp",
        "pidfd_open",
        "pidfd_getfd",
        "pidfd_send_signal",
        "process_madvise",
        "get_robust_list",
    ),
    "signalling": ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"),
    "scheduling other processes": (
        "setpriority",
        "sched_setaffinity",
        "sched_setscheduler",
        "sched_setparam",
        "sched_setattr",
        "ioprio_set",
    ),
    "mounts": (
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
    ),
    "namespaces": ("unshare", "setns"),
    "sessions and process groups": ("setsid", "setpgid"),
    "identity": (
        "setuid",
        "setgid",
        "setreuid",
        "setregid",
        "setresuid",
        "setresgid",
        "setgroups",
        "setfsuid",
        "setfsgid",
        "capset",
    ),
    # SysV IPC is not counted in a run's RLIMIT_AS: a run could hold host memory through it.
    "SysV IPC": (
        "shmget",
        "shmat",
        "shmdt",
        "shmctl",
        "semget",
        "semop",
        "semtimedop",
        "semctl",
        "msgget",
        "msgsnd",
        "msgrcv",
        "msgctl",
    ),
    "host information": ("sysinfo", "syslog"),
    "kernel attack surface": (
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "keyctl",
        "add_key",
        "request_key",
        "personality",
        "prctl",
        "seccomp",
        "init_module",
        "finit_module",
        "delete_module",
        "kexec_load",
        "kexec_file_load",
        "reboot",
        "swapon",
        "swapoff",
        "acct",
        "quotactl",
        "name_to_handle_at",
        "open_by_handle_at",
        "lookup_dcookie",
        "iopl",
        "ioperm",
        "modify_ldt",
        "mbind",
        "migrate_pages",
        "move_pages",
        "set_mempolicy",
        "memfd_create",
        "settimeofday",
        "clock_settime",
        "clock_adjtime",
        "adjtimex",
        "sethostname",
        "setdomainname",
        "vhangup",
        "uselib",
        "ustat",
        "sysfs",
        "nfsservctl",
    ),
    "file system writes": (
        "mkdir",
        "mkdirat",
        "rmdir",
        "unlink",
        "unlinkat",
        "rename",
        "renameat",
        "renameat2",
        "link",
        "linkat",
        "symlink",
        "symlinkat",
        "chmod",
        "fchmod",
        "fchmodat",
        "chown",
        "fchown",
        "fchownat",
        "lchown",
        "truncate",
        "ftruncate",
        "mknod",
        "mknodat",
        "utime",
        "utimes",
        "utimensat",
        "futimesat",
        "creat",
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
        "fallocate",
    ),
}

_F_GETFD, _F_SETFD, _F_GETFL = 1, 2, 3
#: fcntl commands a run may use: none of F_SETOWN(_EX), F_SETSIG, F_SETLEASE, F_NOTIFY, F_SETFL
#: (O_ASYNC), locks or pipe resizing.
FCNTL_COMMANDS = (_F_GETFD, _F_SETFD, _F_GETFL)
#: ioctl requests a run may make: TCGETS only (isatty).
IOCTL_REQUESTS = (0x5401,)
_WRITE_OPEN_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)
_WRITE_OPEN_MASK = 0
for _flag in _WRITE_OPEN_FLAGS:
    _WRITE_OPEN_MASK |= _flag

_SCMP_FLTATR_CTL_OPTIMIZE = 8  # libseccomp's filter attribute: 1 = list, 2 = binary tree
_BPF_INSTRUCTION_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


@dataclass(frozen=True)
class FilterInfo:
    """What `doctor` shows of the filter this host built."""

    #: System calls allowed (some with argument conditions); the rest get ENOSYS or EPERM.
    allowed: int
    #: System calls refused by name with EPERM.
    denied: int
    #: libseccomp's API level on this kernel (what the kernel's seccomp supports).
    api_level: int

    def describe(self) -> str:
        """One line for `doctor`."""
        return (
            f"allow list of {self.allowed} system calls (ENOSYS for the rest, {self.denied} "
            f"refused by name with EPERM); libseccomp API level {self.api_level}; "
            f"kernel {os.uname().release}"
        )


def build_filter() -> tuple[pyseccomp.SyscallFilter, FilterInfo]:
    """Build the filter (in a throwaway child: see `export_program`)."""
    import pyseccomp

    flt = pyseccomp.SyscallFilter(defaction=pyseccomp.ERRNO(errno.ENOSYS))
    try:
        # A binary tree instead of a list: the kernel's per-syscall verdict cache, built when
        # each child installs the filter, costs a third as much.
        flt.set_attr(_SCMP_FLTATR_CTL_OPTIMIZE, 2)
    except (OSError, ValueError, RuntimeError):
        pass  # libseccomp older than 2.5: the list is as strict, only slower to install.
    allow, deny = pyseccomp.ALLOW, pyseccomp.ERRNO(errno.EPERM)

    def add(action: Any, name: str, *args: Any) -> bool:
        try:
            flt.add_rule(action, name, *args)
        except (ValueError, RuntimeError, OSError):
            return False  # Not a system call on this architecture.
        return True

    allowed = {name for group in ALLOWED.values() for name in group if add(allow, name)}
    denied = sum(add(deny, name) for group in DENIED.values() for name in group)
    # Allowed with some arguments only; the rest of each call gets EPERM or ENOSYS.
    conditional = [
        *(("fcntl", pyseccomp.Arg(1, pyseccomp.EQ, command)) for command in FCNTL_COMMANDS),
        *(("ioctl", pyseccomp.Arg(1, pyseccomp.EQ, request)) for request in IOCTL_REQUESTS),
        # Its own limits only (pid 0): on another process of the same uid, prlimit64 would
        # lower that process's limits. getpgid and getsid of itself only.
        ("prlimit64", pyseccomp.Arg(0, pyseccomp.EQ, 0)),
        ("getpgid", pyseccomp.Arg(0, pyseccomp.EQ, 0)),
        ("getsid", pyseccomp.Arg(0, pyseccomp.EQ, 0)),
        # Its own clocks only: a negative clock id names another process's CPU clock.
        ("clock_gettime", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, 0x80000000, 0)),
        # Opening for reading only (the root is empty); write flags are refused below.
        ("open", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _WRITE_OPEN_MASK, 0)),
        ("openat", pyseccomp.Arg(2, pyseccomp.MASKED_EQ, _WRITE_OPEN_MASK, 0)),
    ]
    allowed |= {name for name, arg in conditional if add(allow, name, arg)}
    # The rest of each is refused with EPERM: the call exists, this use of it does not.
    add(deny, "prlimit64", pyseccomp.Arg(0, pyseccomp.NE, 0))
    for call, flags_arg in (("open", 1), ("openat", 2)):
        for flag in _WRITE_OPEN_FLAGS:
            add(deny, call, pyseccomp.Arg(flags_arg, pyseccomp.MASKED_EQ, flag, flag))
    # openat2 takes its flags in a struct the filter cannot read; clone3 its flags likewise:
    # both fall to the default (ENOSYS), and glibc then uses openat and clone.
    return flt, FilterInfo(len(allowed), denied, int(pyseccomp.get_api()))


def export_bpf(flt: pyseccomp.SyscallFilter) -> bytes:
    """The BPF program libseccomp generates for a filter (what `load()` would install)."""
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


def export_program() -> tuple[bytes, FilterInfo]:
    """Build the filter and export its BPF program in a throwaway child; return both.

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
            flt, info = build_filter()
            write_frame(write_fd, json.dumps(info.__dict__).encode())
            write_frame(write_fd, export_bpf(flt))
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        header = read_frame(read_fd)
        program = read_frame(read_fd)
    except (OSError, ValueError, EOFError):
        header = program = None
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if header is None or program is None or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise RuntimeError("libseccomp could not build the filter")
    return program, FilterInfo(**json.loads(header))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Program:
    """A BPF program libseccomp generated (see `export_program`), ready to install.

    libseccomp builds the program anew on every `load()`, which costs each child more than half
    a millisecond; children install these exact bytes instead, from a `struct sock_fprog` the
    parent has already laid out.
    """

    def __init__(self, program: bytes, info: FilterInfo, prctl: Any) -> None:
        self.program = bytes(program)
        self.info = info
        if not self.program or len(self.program) % _BPF_INSTRUCTION_SIZE:
            raise RuntimeError("libseccomp exported no valid BPF program")
        self._prctl = prctl
        self._buffer = ctypes.create_string_buffer(self.program, len(self.program))
        self._fprog = _SockFprog(
            len(self.program) // _BPF_INSTRUCTION_SIZE, ctypes.addressof(self._buffer)
        )

    def install(self) -> None:
        """Install the program in this process, as seccomp_load() does with default attributes.

        Needs no_new_privs (set by the previous layer); the child is single-threaded (no TSYNC).
        """
        if self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
