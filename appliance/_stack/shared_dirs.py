"""What root does to files inside directories that a service's user may write (issue 15, H1).

`run/<service>/`, `redis/` and `bao/` belong to the services' users, and `audit/` is writable by
the group of the API and the worker. Whatever root finds there may have been planted by that
user: a symlink to `secrets/backup.token`, `tls/ca.key` or `/etc/shadow`, a hard link, a FIFO,
a directory swapped for a symlink between a listing and a `chown`. So root never follows a
name there:

- it changes owners and modes through a descriptor opened with O_NOFOLLOW (`open_regular`),
  of a regular file with one link only; anything else is skipped and reported;
- it walks a tree by directory descriptors (`os.fwalk`), never by path, so that a directory
  replaced by a symlink mid-walk leads nowhere (`chown_tree`);
- it writes a file by creating a new one (O_EXCL, which never follows) and renaming it over the
  name (`pki.write_file`), or appends to one opened with O_NOFOLLOW (`open_log`);
- it trusts a pid file only when root wrote it or when the process it names runs as the
  file's owner (`procs.read_pid_file`): a service may name its own processes, no one else's.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

#: Opening never follows a symlink, never blocks on a FIFO, never takes a terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class NotRegularFile(OSError):
    """Raised when a name inside a service's directory is not a file root may touch."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def open_regular(path: Path, *, dir_fd: int | None = None) -> int:
    """A read-only descriptor of `path` (relative to `dir_fd` when given), a regular file with
    one link. Raises `NotRegularFile` for a symlink, a hard link, a FIFO, a device or a
    directory (nothing is followed or left open), `FileNotFoundError` when it is gone."""
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # ELOOP: the last component is a symlink.
            raise NotRegularFile(f"{path} is a symlink") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = "a hard link" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise NotRegularFile(f"{path} is {kind}")
    return fd


def read_regular(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The bytes of the regular file `path` (at most `limit`), read through `open_regular`;
    None when it does not exist. Raises `NotRegularFile`."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read(limit)


def set_owner_and_mode(
    path: Path, uid: int, gid: int, mode: Callable[[int], int], *, dir_fd: int | None = None
) -> bool:
    """`fchown` and `fchmod` of the regular file `path` through `open_regular` (`mode` maps
    its current permission bits to the new ones; -1 keeps an id). Anything else is skipped
    with a warning on stderr; False then."""
    try:
        fd = open_regular(path, dir_fd=dir_fd)
    except NotRegularFile as exc:
        _warn(f"left alone: {exc} (only regular files are shared)")
        return False
    except FileNotFoundError:
        return False  # Removed since it was listed: nothing to share.
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode(stat.S_IMODE(os.fstat(fd).st_mode)))
    finally:
        os.close(fd)
    return True


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give `path` (a file, or a directory and everything in it) to `uid:gid`, by descriptors:
    symlinks are changed themselves (never their targets) and never entered; a regular file
    with more than one link is skipped with a warning (a hard link to a file of root's)."""
    try:
        top = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        os.chown(path, uid, gid, follow_symlinks=False)  # A symlink: itself only.
        return
    try:
        info = os.fstat(top)
        if not stat.S_ISDIR(info.st_mode):
            _chown_fd(top, path, info, uid, gid)
            return
        os.fchown(top, uid, gid)
    finally:
        os.close(top)
    for root, dirs, files, root_fd in os.fwalk(path, follow_symlinks=False):
        for name in (*dirs, *files):
            _chown_entry(Path(root) / name, name, root_fd, uid, gid)


def _chown_entry(shown: Path, name: str, dir_fd: int, uid: int, gid: int) -> None:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_nlink != 1:
        _warn(f"left alone: {shown} is a hard link")
        return
    try:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass


def _chown_fd(fd: int, shown: Path, info: os.stat_result, uid: int, gid: int) -> None:
    if stat.S_ISREG(info.st_mode) and info.st_nlink != 1:
        _warn(f"left alone: {shown} is a hard link")
        return
    os.fchown(fd, uid, gid)


def open_log(path: Path) -> int:
    """A service's log opened for appending (created 0600), never through a symlink and never
    a FIFO or device; raises `NotRegularFile` otherwise."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # A symlink; a FIFO nobody reads.
            raise NotRegularFile(f"{path} is not a regular file of its own: remove it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise NotRegularFile(f"{path} is not a regular file of its own: remove it")
    os.set_blocking(fd, True)
    return fd
