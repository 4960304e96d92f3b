"""What a container with the sandbox's capabilities can do: namespaces and a memory cgroup.

Prints one JSON object. Every check runs in a forked child, so nothing leaks into the caller.
It never writes `release_agent` or `notify_on_release`; it only reports whether they are there.
"""

import ctypes
import errno
import json
import os
import sys
import tempfile

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

FLAGS = {
    "user": 0x10000000,
    "pid": 0x20000000,
    "net": 0x40000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "mnt": 0x00020000,
    "cgroup": 0x02000000,
}
MS_RDONLY, MS_REMOUNT, MS_BIND, MNT_DETACH = 1, 32, 4096, 2


def in_child(check):
    """Run check() in a forked child; return what it printed as JSON, or the failure."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            result = check()
        except Exception as exc:  # the report is the point
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'{"error": "child died"}')


def errname(err):
    return errno.errorcode.get(err, str(err))


def unshare(name):
    def check():
        if libc.unshare(FLAGS[name]) != 0:
            return {"ok": False, "errno": errname(ctypes.get_errno())}
        if name != "pid":
            return {"ok": True}
        pid = os.fork()  # the first child of an unshared pid namespace is its pid 1
        if pid == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        _, status = os.waitpid(pid, 0)
        return {"ok": os.waitstatus_to_exitcode(status) == 0}

    return check


def cgroup_mounts():
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append(
                    {
                        "at": fields[4],
                        "type": fstype,
                        "root": fields[3],
                        "mount_opts": fields[5],
                        "super_opts": options,
                    }
                )
    return mounts


def try_memory_cgroup(base):
    """mkdir a child cgroup under base, limit it, move a process in, remove it."""
    path = os.path.join(base, f"nscheck-{os.getpid()}")
    try:
        os.mkdir(path)
    except OSError as exc:
        return {"mkdir": errname(exc.errno)}
    report = {"mkdir": "ok"}
    try:
        limit_file = (
            "memory.limit_in_bytes"
            if os.path.exists(os.path.join(path, "memory.limit_in_bytes"))
            else "memory.max"
        )
        with open(os.path.join(path, limit_file), "w") as f:
            f.write(str(64 * 1024 * 1024))
        report["limit"] = limit_file
        pid = os.fork()
        if pid == 0:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write("0")
            with open("/proc/self/cgroup") as f:
                os._exit(0 if "nscheck-" in f.read() else 1)
        _, status = os.waitpid(pid, 0)
        report["moved_child"] = os.waitstatus_to_exitcode(status) == 0
        # Enforced? A child in the 64 MiB cgroup touches 256 MiB: the OOM killer should end it.
        pid = os.fork()
        if pid == 0:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write("0")
            block = bytearray(256 * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        report["over_limit_child"] = (
            "SIGKILL" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 else f"status {status}"
        )
    except OSError as exc:
        report["error"] = f"{errname(exc.errno)} {exc.filename}"
    finally:
        try:
            os.rmdir(path)
        except OSError as exc:
            report["rmdir"] = errname(exc.errno)
    return report


def memory_cgroup_as_mounted():
    found = {}
    for m in cgroup_mounts():
        if m["type"] == "cgroup2" or "memory" in m["super_opts"].split(","):
            found[m["at"]] = {
                "ro": "ro" in m["mount_opts"].split(","),
                **try_memory_cgroup(m["at"]),
            }
    return found


def memory_cgroup_fresh_mount():
    """Mount the v1 memory controller anew (needs SYS_ADMIN): what root does the container see?"""

    def check():
        if libc.unshare(FLAGS["mnt"]) != 0:
            return {"unshare_mnt": errname(ctypes.get_errno())}
        target = tempfile.mkdtemp(prefix="nscheck-cg-")
        if libc.mount(b"cgroup", target.encode(), b"cgroup", 0, b"memory") != 0:
            return {"mount": errname(ctypes.get_errno())}
        try:
            names = sorted(os.listdir(target))
            # Our own memory cgroup as the mount shows it: the host's path under a host cgroup
            # namespace, "/" under a private one. Children are made there, never at the root.
            own = next(
                line.split(":", 2)[2].strip()
                for line in open("/proc/self/cgroup")
                if ":memory:" in line
            )
            return {
                "mount": "ok",
                # release_agent exists only at a hierarchy's true root: seeing it means the host's.
                "sees_release_agent": "release_agent" in names,
                "child_dirs": [n for n in names if os.path.isdir(os.path.join(target, n))][:10],
                "own_memory_cgroup": own,
                **try_memory_cgroup(target + own.rstrip("/")),
            }
        finally:
            libc.umount2(target.encode(), MNT_DETACH)

    return in_child(check)


def own_limit_writable(path):
    """Can the container change its own limit? Writes the value it already has (no change)."""
    limit = os.path.join(path, "memory.limit_in_bytes")
    try:
        with open(limit) as f:
            value = f.read().strip()
        with open(limit, "w") as f:
            f.write(value)
    except OSError as exc:
        return errname(exc.errno)
    return True


def new_hierarchy_mount():
    """Mount a new named v1 hierarchy: its root would show release_agent. Only under a private
    cgroup namespace (where the kernel should refuse it); on the host's it would make one."""

    def check():
        own = open("/proc/self/cgroup").read()
        if any(line.split(":", 2)[2] != "/" for line in own.splitlines() if line):
            return {"skipped": "host cgroup namespace"}
        if libc.unshare(FLAGS["mnt"]) != 0:
            return {"unshare_mnt": errname(ctypes.get_errno())}
        target = tempfile.mkdtemp(prefix="nscheck-named-")
        if libc.mount(b"cgroup", target.encode(), b"cgroup", 0, b"none,name=nscheck") != 0:
            return {"mount": errname(ctypes.get_errno())}
        try:
            return {"mount": "ok", "sees_release_agent": "release_agent" in os.listdir(target)}
        finally:
            libc.umount2(target.encode(), MNT_DETACH)

    return in_child(check)


def memory_cgroup_remount_rw():
    """Remount the container's /sys/fs/cgroup/memory read-write in a private mount namespace."""

    def check():
        if libc.unshare(FLAGS["mnt"]) != 0:
            return {"unshare_mnt": errname(ctypes.get_errno())}
        target = b"/sys/fs/cgroup/memory"
        if not os.path.isdir(target):
            return {"remount": "no /sys/fs/cgroup/memory"}
        if libc.mount(None, b"/sys/fs/cgroup", None, MS_REMOUNT | MS_BIND, None) != 0:
            parent = errname(ctypes.get_errno())
        else:
            parent = "ok"
        if libc.mount(None, target, None, MS_REMOUNT | MS_BIND, None) != 0:
            return {"remount_parent": parent, "remount": errname(ctypes.get_errno())}
        return {
            "remount_parent": parent,
            "remount": "ok",
            "own_limit_writable": own_limit_writable(target.decode()),
            **try_memory_cgroup(target.decode()),
        }

    return in_child(check)


def capabilities():
    with open("/proc/self/status") as f:
        return {
            k: v.strip()
            for k, v in (line.split(":", 1) for line in f)
            if k in ("CapEff", "CapBnd", "NoNewPrivs", "Seccomp")
        }


def main():
    report = {
        "uid": os.getuid(),
        "status": capabilities(),
        "own_cgroups": open("/proc/self/cgroup").read().splitlines(),
        "namespaces": {name: in_child(unshare(name)) for name in FLAGS},
        "cgroup_mounts": cgroup_mounts(),
        "memory_cgroup_as_mounted": in_child(memory_cgroup_as_mounted),
        "memory_cgroup_remount_rw": memory_cgroup_remount_rw(),
        "memory_cgroup_fresh_mount": memory_cgroup_fresh_mount(),
        "new_named_hierarchy": new_hierarchy_mount(),
    }
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
