"""The worker gives up root once its fork servers have a launcher (issue 12, finding 23).

The fork servers need root; the worker, which holds the OpenBao token, the Redis user and
the audit log, does not. So the worker starts as root only to start its sandbox launcher
(`sandbox.Sandbox.launcher`), then becomes `APPLIANCE_WORKER_USER` for good, before it reads
any credential: every uid and gid (real, effective, saved), the supplementary groups of that
user, and no capability left in any set. `drop_to` checks all of it and raises otherwise.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from pathlib import Path

from ..settings import ConfigurationError

#: The capability sets of /proc/self/status that must all be empty once dropped.
_CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd")
_PR_CAPBSET_DROP = 24
_CAP_SETPCAP = 8
_PR_SET_NO_NEW_PRIVS = 38


def must_drop(user: str | None) -> bool:
    """Whether this process runs as root and is to become `user`; ConfigurationError when it
    runs as another user than `user` (it could not change to it)."""
    if user is None:
        return False
    if os.geteuid() == 0:
        return True
    if pwd.getpwuid(os.geteuid()).pw_name != user:
        raise ConfigurationError(
            f"APPLIANCE_WORKER_USER is {user!r}, but the worker runs as uid {os.geteuid()}"
        )
    return False


def drop_to(user: str) -> None:
    """Become `user` for good (uids, gids, its groups); raise unless nothing of root is left."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigurationError(f"APPLIANCE_WORKER_USER {user!r} does not exist") from None
    groups = sorted({g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {entry.pw_gid})
    emptied = _confine()
    # glibc applies each of these to every thread of the process, not only the calling one.
    os.setgroups(groups)
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    _check_dropped(entry.pw_uid, entry.pw_gid, bounding_emptied=emptied)


def _confine() -> bool:
    """While still root: empty the capability bounding set and set no_new_privs, so that no
    setuid binary or file capability can give anything back after the uid change. (Only this
    process: the launcher, started before, keeps what the fork servers need.)

    Emptying the bounding set needs CAP_SETPCAP, which a worker container does not have (it
    runs with five capabilities, issue 14): there the bounding set is the container's, and
    no_new_privs alone already keeps execve from granting any of it. Returns whether the
    bounding set was emptied."""
    libc = ctypes.CDLL(None, use_errno=True)
    emptied = _holds(_CAP_SETPCAP)
    if emptied:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        for capability in range(last + 1):
            if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"cannot drop capability {capability}")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot set no_new_privs")
    return emptied


def _holds(capability: int) -> bool:
    """Whether this process has `capability` in its effective set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> capability & 1)
    return False


def _check_dropped(uid: int, gid: int, *, bounding_emptied: bool = True) -> None:
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError("the worker did not fully drop its uid and gid")
    status = Path("/proc/self/status").read_text()
    checked = _CAPABILITY_SETS if bounding_emptied else _CAPABILITY_SETS[:-1]
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in checked and int(value.strip(), 16) != 0:
            raise PermissionError(f"the worker still holds capabilities ({name} {value.strip()})")
    if "NoNewPrivs:\t1" not in status:
        raise PermissionError("the worker runs without no_new_privs")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PermissionError("the worker could become root again")
