"""A service's own credentials, copied out of the state into a directory only it mounts.

A container engine that cannot mount one file of a volume (Docker 20.10 has no subpath mounts)
would otherwise give each service the whole `tls/` and `secrets/` directories, and root in that
container (the worker's sandbox launcher runs as root) could read the CA key, the unseal shares,
the operator token and every other service's key, whatever their modes. `export_files` writes a
copy of exactly the files one service reads, with their owners and modes, into a tree that is
mounted at the same paths (`<state>/tls`, `<state>/secrets`) in that service's container only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path


def export_files(files: Mapping[str, Iterable[Path]], target: Path) -> None:
    """For each `name: paths` of `files`, make `target/name` hold a copy of `paths` (each with its
    owner and mode; the directory with those of the paths' own directory) and nothing else:
    whatever an earlier export left there and `files` no longer names is removed."""
    for name, paths in files.items():
        sources = list(paths)
        directory = target / name
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        wanted = {path.name for path in sources}
        for entry in directory.iterdir():
            if entry.name not in wanted:
                _remove(entry)
        for source in sources:
            _copy(source, directory / source.name)
        if sources:
            _same_owner_and_mode(sources[0].parent, directory)


def _copy(source: Path, destination: Path) -> None:
    """`source` to `destination` atomically, its owner and mode set before it is visible."""
    info = source.stat()
    tmp = destination.with_name(f".{destination.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(source.read_bytes())
        if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, info.st_uid, info.st_gid)
        os.fchmod(fd, info.st_mode & 0o7777)
    os.replace(tmp, destination)


def _same_owner_and_mode(source: Path, destination: Path) -> None:
    info, now = source.stat(), destination.stat()
    if (info.st_uid, info.st_gid) != (now.st_uid, now.st_gid):
        os.chown(destination, info.st_uid, info.st_gid)
    os.chmod(destination, info.st_mode & 0o7777)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
