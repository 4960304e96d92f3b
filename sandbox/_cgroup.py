"""Memory accounting: a memory cgroup per run, so that everything a run causes counts.

RLIMIT_AS counts only the run's own address space. Memory a run makes the kernel hold for it
elsewhere (SysV shared memory that outlives a detach, page cache, kernel objects) does not show
there; a memory cgroup counts all of it, and the kernel's OOM killer ends the run at the limit.
Each run gets its own cgroup, made with its spare and removed once the run is reaped.

Backends, by where the fork server runs:
- `cgroup-v1`: a host whose memory controller is on a cgroup v1 hierarchy (this project's CI
  hosts). Runs are made under the fork server's own memory cgroup.
- `cgroup-v2`: a host with the unified hierarchy, such as the VM image's Debian 12 guest. The
  fork server's cgroup must be delegated to it (systemd `Delegate=yes` on the worker's unit) and
  must be able to enable the memory controller for its children, which cgroup v2 allows only
  for a cgroup with no processes of its own: the unit starts the worker in a leaf below its
  delegated cgroup (`<unit>/main`), and the runs' cgroups go beside that leaf (`_v2_base`).
- none: no writable memory controller (a container given a read-only cgroupfs, say). `doctor`
  reports the layer missing with the reason; RLIMIT_AS and the seccomp refusal of SysV IPC
  still hold, and the policy decides whether runs may go on (`degraded_layers`).

The child joins its cgroup itself, as root, before it drops privileges; the fork server (root)
sets the run's limit when it hands the request over, and only it can change it: the files are
root's. See FIELD_NOTES: on cgroup v1 a per-run limit does count SysV shared memory.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import time
from dataclasses import dataclass

_MOUNTINFO = "/proc/self/mountinfo"
_CGROUP = "/proc/self/cgroup"
#: Headroom a spare gets above the policy's largest run until its request sets the real limit.
_SPARE_HEADROOM = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Files:
    """The control files of one backend (v1 and v2 name them differently)."""

    limit: str
    usage: str
    events: str
    events_key: bytes
    swap_limit: str | None


_V1 = _Files(
    "memory.limit_in_bytes",
    "memory.usage_in_bytes",
    "memory.oom_control",
    b"oom_kill",
    "memory.memsw.limit_in_bytes",
)
_V2 = _Files("memory.max", "memory.current", "memory.events", b"oom_kill", "memory.swap.max")


class MemoryCgroup:
    """The fork server's handle on its runs' memory cgroups (one directory per run)."""

    def __init__(
        self, backend: str, root: str | None, reason: str = "", spare_limit: int = 0
    ) -> None:
        #: "cgroup-v1", "cgroup-v2", or "" when no backend could be had (then `reason` says why).
        self.backend = backend
        self.root = root
        self.reason = reason
        #: A spare's limit until its request arrives: the policy's largest run, plus headroom.
        self._spare_limit = spare_limit
        self._files = _V1 if backend == "cgroup-v1" else _V2
        self._counter = itertools.count()
        self._pending: list[str] = []

    @property
    def available(self) -> bool:
        """Whether runs get a memory cgroup here."""
        return bool(self.backend) and self.root is not None

    def describe(self) -> str:
        """One line for `doctor`."""
        if not self.available:
            return f"no memory cgroup: {self.reason}"
        return f"{self.backend} at {self.root}"

    @classmethod
    def find(cls, owner_pid: int, maxima_mb: int) -> MemoryCgroup:
        """Make this fork server's cgroup for its runs; a handle without backend if none."""
        try:
            mounts = _cgroup_mounts()
            membership = _memberships()
        except OSError as exc:
            return cls("", None, f"cannot read the cgroup layout: {exc}")
        v1 = mounts.get("memory")
        if v1 is not None and "memory" in membership:
            return cls._make("cgroup-v1", v1, membership["memory"], owner_pid, maxima_mb)
        v2 = mounts.get("")
        if v2 is not None and "" in membership:
            return cls._make("cgroup-v2", v2, membership[""], owner_pid, maxima_mb)
        return cls("", None, "no memory controller is mounted for this process")

    @classmethod
    def _make(
        cls, backend: str, mount: tuple[str, str], own: str, owner_pid: int, maxima_mb: int
    ) -> MemoryCgroup:
        mount_point, mount_root = mount
        relative = os.path.relpath(own, mount_root) if own.startswith(mount_root) else "."
        parent = os.path.normpath(os.path.join(mount_point, relative))
        if backend == "cgroup-v2":
            parent = _v2_base(parent, os.path.normpath(mount_point))
        _remove_stale(parent)
        # One per supervisor, not per process: a process may hold several in turn (tests do).
        root = os.path.join(parent, f"sandbox-{owner_pid}-{secrets.token_hex(4)}")
        try:
            if backend == "cgroup-v2":
                _enable_memory_controller(parent)
            os.mkdir(root, 0o700)
            if backend == "cgroup-v2":
                _write(os.path.join(root, "cgroup.subtree_control"), b"+memory")
        except OSError as exc:
            _rmdir_quietly(root)
            return cls("", None, f"{backend}: cannot make run cgroups under {parent}: {exc}")
        return cls(backend, root, spare_limit=maxima_mb * 1024 * 1024 + _SPARE_HEADROOM)

    def new_run(self) -> str:
        """Make the cgroup for one spare, limited to the policy's largest run; return its path."""
        if self.root is None:
            raise OSError(self.reason or "no memory cgroup backend")
        self.collect()
        path = os.path.join(self.root, f"run-{next(self._counter)}")
        os.mkdir(path, 0o700)
        try:
            self._write_limit(path, self._spare_limit)
        except OSError:
            _rmdir_quietly(path)
            raise
        return path

    def limit_run(self, path: str, memory_bytes: int) -> None:
        """Hold the run to `memory_bytes` more than its spare holds now (what RLIMIT_AS does)."""
        with open(os.path.join(path, self._files.usage), "rb", buffering=0) as f:
            held = int(f.read().split()[0])
        self._write_limit(path, held + memory_bytes)

    def _write_limit(self, path: str, limit: int) -> None:
        value = str(limit).encode()
        _write(os.path.join(path, self._files.limit), value)
        if self._files.swap_limit is not None:
            # No swap beyond the limit: v1 counts memory and swap together, v2 swap alone.
            swap = value if self.backend == "cgroup-v1" else b"0"
            try:
                _write(os.path.join(path, self._files.swap_limit), swap)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EACCES):
                    raise  # ENOENT: the kernel accounts no swap, so there is none to limit.

    def oom_killed(self, path: str) -> bool:
        """Whether the kernel's OOM killer killed a process of this run (it hit its limit)."""
        try:
            with open(os.path.join(path, self._files.events), "rb", buffering=0) as f:
                for line in f.read().splitlines():
                    key, _, count = line.partition(b" ")
                    if key == self._files.events_key:
                        return int(count) > 0
        except (OSError, ValueError):
            pass
        return False

    def remove(self, path: str) -> None:
        """Remove a run's cgroup, now or (if its process is still exiting) at the next chance."""
        if not _rmdir_quietly(path):
            self._pending.append(path)

    def collect(self) -> None:
        """Remove the cgroups of runs that had not finished exiting when they were released."""
        self._pending = [path for path in self._pending if not _rmdir_quietly(path)]

    def close(self, wait: float = 0.5) -> None:
        """Remove every run cgroup left and this fork server's own.

        Spares die with their zygote, a moment after it: a cgroup is removable once its last
        process has exited, which is waited for, up to `wait` seconds. What is left then is
        removed by the next fork server that starts here (see `_remove_stale`).
        """
        if self.root is None:
            return
        deadline = time.monotonic() + wait
        while True:
            self.collect()
            left = [name for name in _listdir(self.root) if name.startswith("run-")]
            left = [n for n in left if not _rmdir_quietly(os.path.join(self.root, n))]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        _rmdir_quietly(self.root)


def join(path: str) -> None:
    """In the child (root, before chroot): move this process into its run's cgroup."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"0")  # 0: the writing process itself (its pid here is 1 of its namespace)
    finally:
        os.close(fd)


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """Controller ("" for the unified hierarchy) -> (mount point, root of the mount)."""
    found: dict[str, tuple[str, str]] = {}
    with open(_MOUNTINFO) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            fstype, options = tail[0], tail[2].split(",")
            root, point = _unescape(fields[3]), _unescape(fields[4])
            if fstype == "cgroup2":
                found.setdefault("", (point, root))
            elif fstype == "cgroup" and "memory" in options and "rw" in fields[5].split(","):
                found.setdefault("memory", (point, root))
    return found


def _memberships() -> dict[str, str]:
    """Controller ("" for the unified hierarchy) -> this process's cgroup path in it."""
    found: dict[str, str] = {}
    with open(_CGROUP) as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            for controller in parts[1].split(",") if parts[1] else [""]:
                found[controller] = parts[2]
    return found


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return text.encode().decode("unicode_escape") if "\\" in text else text


def _v2_base(own: str, mount_point: str) -> str:
    """Where a cgroup v2 fork server makes its runs' cgroups: `own`, its own cgroup, when that
    already passes the memory controller down; else `own`'s parent when that holds no process.

    cgroup v2 passes a controller only below a cgroup with no processes of its own, and the fork
    server is in `own`. Under systemd the worker's unit cgroup is delegated and the unit starts
    the worker in a leaf below it, `<unit>/main` (systemd 252 has no `DelegateSubgroup=`): the
    runs' cgroups then go beside that leaf, in the delegated cgroup. Anything else stays `own`,
    where `_enable_memory_controller` says what is missing.
    """
    up = os.path.dirname(own)
    if own == mount_point or not up.startswith(mount_point + os.sep):
        return own
    try:
        with open(os.path.join(own, "cgroup.subtree_control")) as f:
            if "memory" in f.read().split():
                return own
        with open(os.path.join(up, "cgroup.procs")) as f:
            if f.read().strip():
                return own
        with open(os.path.join(up, "cgroup.controllers")) as f:
            if "memory" not in f.read().split():
                return own
    except OSError:
        return own
    return up


def _enable_memory_controller(parent: str) -> None:
    """cgroup v2: the fork server's cgroup must pass the memory controller to its children."""
    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
        if "memory" in f.read().split():
            return
    try:
        _write(os.path.join(parent, "cgroup.subtree_control"), b"+memory")
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise OSError(
                exc.errno,
                "the cgroup has processes of its own, so cgroup v2 will not enable the memory "
                "controller below it: start the worker in a leaf of a delegated cgroup",
            ) from exc
        raise


def owner_gone(name: str) -> bool:
    """Whether `sandbox-<pid>-...` names a fork server that is no longer running.

    Its cgroup and its working directories carry its pid in their names, so that the next fork
    server can remove what a killed one left. Any other name is not ours to remove.
    """
    try:
        os.kill(int(name.removeprefix("sandbox-").split("-")[0]), 0)
    except ProcessLookupError:
        return name.startswith("sandbox-")
    except (ValueError, PermissionError):
        return False
    return False  # still running


def _remove_stale(parent: str) -> None:
    """Remove what fork servers that died without closing left (their cgroups are empty)."""
    for name in _listdir(parent):
        if not owner_gone(name):
            continue
        stale = os.path.join(parent, name)
        for run in _listdir(stale):
            if run.startswith("run-"):
                _rmdir_quietly(os.path.join(stale, run))
        _rmdir_quietly(stale)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _rmdir_quietly(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _write(path: str, data: bytes) -> None:
    # O_TRUNC as a shell's `>` does: ignored by cgroupfs, and right for any other file.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
