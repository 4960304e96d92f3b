"""The data disk's version and its migrations (issue 15, `appliance upgrade`).

The code's version is `appliance.__version__` (the one version string of the package; the VM
image is built from it). The state's is `<state>/version.json`, `{"version": "X.Y.Z"}`, written
by `record_version`. An image boots against an older data disk: `plan` says what to do, the
caller takes an offline backup (`backup.py`) first, then `migrate` runs every migration whose
version is newer than the data's and not newer than the code's, in order, and records the new
version. A data disk newer than the code is refused (no downgrades).

`MIGRATIONS` is the mechanism, empty until a release changes the state's layout: add
`Migration("X.Y.Z", function)` entries; each takes the state directory, must be idempotent
(a crash between it and `record_version` runs it again), and may not need OpenBao (it runs
before the services start).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .procs import StackError, port_open

_VERSION = re.compile(r"(\d{1,6})\.(\d{1,6})\.(\d{1,6})")

NEW, SAME, UPGRADE = "new", "same", "upgrade"


class DowngradeRefused(StackError):
    """Raised when the state was written by a newer appliance than this one."""

    code, title = "downgrade_refused", "Downgrade refused"


@dataclass(frozen=True)
class Migration:
    """One step of the state's layout, applied when upgrading past `version`."""

    version: str
    apply: Callable[[Path], None]


#: In version order. Empty: no release has changed the state's layout yet.
MIGRATIONS: tuple[Migration, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What `upgrade` does: `new` (record), `same` (nothing) or `upgrade` (backup, migrate)."""

    action: str
    data_version: str | None
    code_version: str
    migrations: tuple[Migration, ...] = ()


def version_file(state_dir: Path) -> Path:
    """The state's version (the data disk's)."""
    return state_dir / "version.json"


def parse_version(text: str) -> tuple[int, int, int]:
    """`X.Y.Z` as numbers (a suffix after the third number is not a version here)."""
    match = _VERSION.fullmatch(text)
    if match is None:
        raise StackError(f"{text[:40]!r} is not a version (X.Y.Z)")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def data_version(state_dir: Path) -> str | None:
    """The state's recorded version; None when none is recorded (a new, or older, state)."""
    path = version_file(state_dir)
    try:
        recorded = json.loads(path.read_text())["version"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise StackError(f'{path} does not read as {{"version": "X.Y.Z"}}') from None
    if not isinstance(recorded, str):
        raise StackError(f"{path}: the version is not a string")
    parse_version(recorded)
    return recorded


def plan(
    state_dir: Path, code_version: str, migrations: tuple[Migration, ...] = MIGRATIONS
) -> Plan:
    """What to do for this state and this code. Raises `DowngradeRefused`."""
    recorded = data_version(state_dir)
    if recorded is None:
        if _holds_openbao_data(state_dir):
            # Not new: written before versions were recorded, or version.json was lost. Taking
            # it as this image's would accept any downgrade.
            raise StackError(
                f"{state_dir} holds OpenBao data but no {version_file(state_dir).name}: its "
                "version is unknown, so it is neither upgraded nor stamped (write the version "
                'that made it, {"version": "X.Y.Z"}, then run `appliance upgrade` again)'
            )
        return Plan(NEW, None, code_version)
    old, new = parse_version(recorded), parse_version(code_version)
    if old > new:
        raise DowngradeRefused(
            f"the data in {state_dir} is of appliance {recorded}, newer than this image's "
            f"{code_version}: a downgrade is refused (boot the newer image, or restore a backup "
            "taken before the upgrade)"
        )
    if old == new:
        return Plan(SAME, recorded, code_version)
    if openbao_running(state_dir):
        raise StackError(
            "OpenBao runs on this state: stop it (`appliance down`, or its unit) before an "
            "upgrade, whose backup copies its raft files"
        )
    due = tuple(m for m in migrations if old < parse_version(m.version) <= new)
    return Plan(UPGRADE, recorded, code_version, due)


def _holds_openbao_data(state_dir: Path) -> bool:
    data = state_dir / "bao" / "data"
    return data.is_dir() and any(data.iterdir())


def openbao_running(state_dir: Path) -> bool:
    """Whether an OpenBao serves this state's storage, however it was started (systemd writes
    no pid file): its raft database is locked, or its recorded address answers."""
    for name in ("vault.db", "raft/raft.db"):
        try:
            fd = os.open(state_dir / "bao" / "data" / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # bbolt holds LOCK_EX while open.
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    try:
        addr = json.loads((state_dir / "bao" / "endpoint.json").read_text())["addr"]
        port = int(str(addr).rsplit(":", 1)[1])
    except (FileNotFoundError, ValueError, KeyError, IndexError, TypeError):
        return False
    return port_open("127.0.0.1", port)


def migrate(state_dir: Path, steps: Plan) -> list[str]:
    """Run the plan's migrations in order, then record the code's version; which ran."""
    ran = []
    for migration in steps.migrations:
        migration.apply(state_dir)
        ran.append(migration.version)
    record_version(state_dir, steps.code_version)
    return ran


def record_version(state_dir: Path, version: str) -> None:
    """Write the state's version (atomically: a crash leaves the old one)."""
    parse_version(version)
    path = version_file(state_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"version": version}) + "\n")
    tmp.replace(path)
