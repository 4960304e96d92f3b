"""Each service of the local stack as its own unprivileged user (issue 12, finding 23).

When `appliance up` runs as root, every service runs as a system user of its own and owns only
its own files; the state directory's secrets (unseal shares, operator token, the `admin` and
`vault` Redis passwords, the CA key) stay root's:

| user | runs | owns |
|---|---|---|
| `appliance-redis` | Redis and its relay | `redis/`, the server key, the `vault` client key |
| `appliance-bao` | OpenBao | `bao/` (raft storage, its audit device, its log) |
| `appliance-api` | the API | `run/api/`, its client key |
| `appliance-worker` | the worker (see below) | `run/worker/`, its client key |
| `appliance-flower` | Flower | `run/flower/`, its client key and Redis password |

The API and the worker share the group `appliance`, which writes the audit directory (setgid,
so that every file in it is the group's) and reads the metrics token; nobody else is in it.

The worker's fork servers need root (namespaces, chroot, cgroups, uid 65534 for each child):
the worker starts as root, spawns its sandbox launcher (a fresh interpreter that holds nothing
and only ever starts fork servers), then drops to `appliance-worker` before it reads a
credential (`appliance.worker.privileges`). Root stays with the launcher and the fork servers.

As any other user, `up` runs every service as that user (a developer's stack): nothing to drop.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .procs import StackError
from .shared_dirs import chown_tree

#: The group of the services that write the audit log and read the metrics token.
SHARED_GROUP = "appliance"

#: Service -> its system user; the services in SHARED_GROUP_MEMBERS also get SHARED_GROUP.
SERVICE_USERS: Mapping[str, str] = {
    "redis": "appliance-redis",
    "openbao": "appliance-bao",
    "api": "appliance-api",
    "worker": "appliance-worker",
    "flower": "appliance-flower",
}
SHARED_GROUP_MEMBERS = ("api", "worker")


@dataclass(frozen=True)
class RunAs:
    """Who a service runs as: a uid, its primary gid and supplementary groups."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def confine(self, argv: list[str]) -> list[str]:
        """`argv` run as this user through util-linux's setpriv, started as root: every uid and
        gid, only this user's groups, no capability in any set (bounding set included), and
        no_new_privs, so that no setuid binary gives anything back."""
        binary = shutil.which("setpriv") or "/usr/bin/setpriv"
        groups = ",".join(str(g) for g in self.groups)
        return [
            binary,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
            *argv,
        ]

    def own(self, *paths: Path, group: int | None = None) -> None:
        """Give each path (a file, or a directory with everything in it) to this user."""
        for path in paths:
            # By descriptors: the user may have written the tree (`shared_dirs.chown_tree`).
            chown_tree(path, self.uid, self.gid if group is None else group)


def service_users() -> Mapping[str, RunAs] | None:
    """The users of the services, created if missing; None unless this process is root (then
    every service runs as the calling user)."""
    if os.geteuid() != 0:
        return None
    shared = _ensure_group(SHARED_GROUP)
    users = {}
    for service, name in SERVICE_USERS.items():
        uid, gid = _ensure_user(name)
        groups: tuple[int, ...] = ()
        if service in SHARED_GROUP_MEMBERS:
            _ensure_member(name, SHARED_GROUP)
            groups = (shared,)
        users[service] = RunAs(name, uid, gid, groups)
    return users


def shared_gid() -> int:
    """The gid of SHARED_GROUP (which `service_users` made)."""
    return grp.getgrnam(SHARED_GROUP).gr_gid


def check_reachable(*paths: Path) -> None:
    """Raise StackError unless a user of no group of ours may reach every path: the state
    directory, the interpreter and the code the services run."""
    for path in paths:
        resolved = path.resolve()
        for parent in [*reversed(path.absolute().parents), *reversed(resolved.parents)]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                raise StackError(
                    f"the services run as users of their own ({', '.join(SERVICE_USERS.values())})"
                    f" and cannot reach {resolved}: {parent} is not searchable by others (mode "
                    f"{mode & 0o777:o}). Use a state directory, a Python and a checkout that "
                    "others may reach (./dev.sh builds its venv on /usr/bin/python3), or run "
                    "`appliance up` as a user other than root (every service then runs as it)."
                )


def _ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    _run(["groupadd", "--system", name])
    return grp.getgrnam(name).gr_gid


def _ensure_user(name: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    _run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]
    )
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _ensure_member(user: str, group: str) -> None:
    """Make `user` a member of `group` in the system's group file (what a process that changes
    to `user` itself, like the worker, reads its groups from)."""
    if user not in grp.getgrnam(group).gr_mem:
        _run(["usermod", "--append", "--groups", group, user])


def _run(argv: list[str]) -> None:
    binary = shutil.which(argv[0]) or shutil.which(argv[0], path="/usr/sbin:/sbin")
    if binary is None:
        raise StackError(f"{argv[0]} is missing: it makes the services' system users")
    result = subprocess.run(  # noqa: S603 - fixed arguments, a name of our own
        [binary, *argv[1:]], capture_output=True, text=True, check=False
    )
    # Another `up` may have made it first (exit 9: the name exists).
    if result.returncode not in (0, 9):
        raise StackError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
