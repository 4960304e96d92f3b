"""Day-2 operations of a stack (issue 15): `appliance unseal`, `backup`, `restore`, `upgrade`.

Each is a short function over named steps; the pieces live in `_stack` (`seal.py`: shares and
their parsing, `openbao.py`: unseal, root tokens and raft snapshots, `backup.py`: archives,
`upgrade.py`: versions and migrations) and the bootstrap and enrolment are `stack.enrol`'s.

No step writes a share, a root token or an age identity anywhere: shares and identities are
read from where the operator points (stdin, a path) and held in memory; a root token is
generated from the operator token plus a quorum of shares only when the bootstrap must run,
and revoked before the function returns.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__, stack
from ._stack import (
    BaoHandle,
    OpenBaoSealed,
    Shares,
    StackError,
    UnsealProgress,
    age,
    backup_token_file,
    generate_root_token,
    openbao_addr,
    recipient_file,
    renew_orphan_tokens,
    restore_snapshot,
    seal_for,
    seal_status,
    stop_by_pid_file,
    submit_shares,
    take_snapshot,
)
from ._stack import backup as archives
from ._stack import upgrade as versions
from ._stack.procs import read_pid_file

#: The services a restore stops and starts again (OpenBao and Redis keep running).
RESTARTED = ("api", "worker", "flower")
#: `APPLIANCE_SERVICE_MANAGER=systemd`: the VM image's units, not the local stack's pid files.
SYSTEMD_UNITS = {name: f"appliance-{name}" for name in RESTARTED}

Report = Callable[[str], None]


@dataclass(frozen=True)
class UnsealOutcome:
    """What `unseal` did: OpenBao's state, and the bootstrap's if it ran."""

    progress: UnsealProgress
    enrolment: dict[str, Any] | None
    why: str


def unseal(
    state: Path,
    supplied: Shares | None,
    *,
    reenrol: bool,
    report: Report,
    reset: bool = False,
) -> UnsealOutcome:
    """Submit the shares until OpenBao is unsealed, then, with a quorum of them, re-run the
    bootstrap and enrolment when a service's credential is no longer live or `reenrol` asks
    (root token generated from these shares, revoked at the end). The shares are `supplied`
    in operator mode, the file's in file mode. Raises `SharesRefused`."""
    addr = openbao_addr(state)
    shares = seal_for(state, supplied=supplied).shares()
    if shares is None:
        raise OpenBaoSealed("no unseal shares given")
    progress = submit_shares(addr, shares, report=lambda p: report(_progress_line(p)), reset=reset)
    report("OpenBao is unsealed")
    renew_orphan_tokens(addr, state)
    if len(shares.keys) < seal_status(addr).threshold:
        why = "fewer shares than the threshold given here: enrolments not checked"
        return UnsealOutcome(progress, None, why)
    bao = BaoHandle(addr, generate_root_token(addr, state, shares), 0, state)
    try:
        stale = stack.stale_enrolments(state, bao)
        if not stale and not reenrol:
            return UnsealOutcome(progress, None, "every enrolment is live")
        why = "--reenrol" if reenrol else f"no live credential: {', '.join(stale)}"
        report(f"re-running the bootstrap and enrolment ({why})")
        return UnsealOutcome(progress, stack.enrol(state, bao), why)
    finally:
        bao.revoke_root()


def _progress_line(progress: UnsealProgress) -> str:
    if not progress.sealed:
        return "share accepted: unsealed"
    return f"share accepted: {progress.progress} of {progress.threshold}"


def backup(state: Path, out: Path, recipient_path: Path | None) -> dict[str, Any]:
    """An online backup to `out`, encrypted to the recipient (default: the operator's kept
    one). Works while the services run: the audit log is copied under its writers' locks,
    after the snapshot, so that every anchor in the snapshot has its entries in the copy."""
    recipient = age.read_recipient(recipient_path or _kept_recipient(state))
    token = _backup_token(state)
    addr = openbao_addr(state)
    with tempfile.TemporaryDirectory(dir=state, prefix=".backup-") as work:
        members: dict[str, Path] = {}
        audit = state / "audit"
        with _audit_quiet(audit):
            snapshot = Path(work) / archives.SNAPSHOT
            with _private(snapshot) as handle:
                take_snapshot(addr, token, handle)
            members[archives.SNAPSHOT] = snapshot
            members.update(_copy_audit(audit, Path(work) / "audit"))
        for name in ("stack.json", "version.json"):
            if (state / name).is_file():
                members[name] = state / name
        manifest = archives.write_archive(out, recipient, archives.ONLINE, __version__, members)
    return {"out": str(out), "manifest": manifest}


def restore(
    state: Path,
    archive_path: Path,
    identity: Path,
    read_shares: Callable[[], Shares | None],
    report: Report,
) -> dict[str, Any]:
    """Restore an online backup: verify it, stop the API, worker and Flower, force-restore the
    raft snapshot, replace the audit directory, unseal if needed (operator mode: the shares of
    `read_shares`), re-run the bootstrap and enrolment, start the services."""
    token = _backup_token(state)
    addr = openbao_addr(state)
    with archives.open_archive(archive_path, identity, state) as archive:
        _check_restorable(archive.manifest)
        report(f"backup of {archive.manifest['created']} verified")
        _stop_services(state, report)
        restore_snapshot(addr, token, archive.member(archives.SNAPSHOT).read_bytes())
        report("OpenBao storage restored from the raft snapshot")
        _replace_audit(state, archive.root / "audit")
        report("audit directory replaced")
    shares = read_shares() if seal_for(state).mode == "operator" else seal_for(state).shares()
    if shares is None:
        raise OpenBaoSealed("the operator's unseal shares are needed to re-enrol after a restore")
    if seal_status(addr).sealed:
        submit_shares(addr, shares, report=lambda p: report(_progress_line(p)))
    bao = BaoHandle(addr, generate_root_token(addr, state, shares), 0, state)
    try:
        enrolled = stack.enrol(state, bao)
    finally:
        bao.revoke_root()
    _start_services(state, report)
    return {"restored": str(archive_path), "created": archive.manifest["created"], **enrolled}


def upgrade(state: Path, *, check: bool, report: Report) -> dict[str, Any]:
    """Bring the state to this code's version: record a new state's, refuse a downgrade, and
    before migrating an older one write an offline backup to `<state>/backups/`."""
    steps = versions.plan(state, __version__)
    result: dict[str, Any] = {
        "action": steps.action,
        "data_version": steps.data_version,
        "code_version": steps.code_version,
        "migrations": [m.version for m in steps.migrations],
    }
    if check or steps.action == versions.SAME:
        return result
    if steps.action == versions.NEW:
        versions.record_version(state, steps.code_version)
        return result
    if read_pid_file(state / "bao" / "bao.pid") is not None:
        raise StackError("OpenBao runs: stop the stack (`appliance down`) before an upgrade")
    recipient = age.read_recipient(_kept_recipient(state))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = state / "backups" / f"pre-upgrade-{steps.data_version}-{steps.code_version}-{stamp}.age"
    archives.write_archive(
        out, recipient, archives.OFFLINE, str(steps.data_version), archives.offline_members(state)
    )
    report(f"offline backup written to {out}")
    result["backup"] = str(out)
    result["ran"] = versions.migrate(state, steps)
    return result


def _kept_recipient(state: Path) -> Path:
    path = recipient_file(state)
    if not path.is_file():
        raise StackError(
            f"no operator recipient in {path}: give --recipient FILE (an age X25519 recipient)"
        )
    return path


def _backup_token(state: Path) -> str:
    try:
        return backup_token_file(state).read_text().strip()
    except FileNotFoundError:
        raise StackError(
            f"no backup token in {backup_token_file(state)}: run the bootstrap (`appliance "
            "init`, or `appliance unseal --reenrol` in operator mode) once with this version"
        ) from None


def _check_restorable(manifest: Any) -> None:
    if manifest.get("kind") != archives.ONLINE:
        raise archives.BackupInvalid(
            "this is an offline (pre-upgrade) backup: restore it by hand (see README)"
        )
    made_by = str(manifest.get("appliance_version", ""))
    if versions.parse_version(made_by) > versions.parse_version(__version__):
        raise archives.BackupInvalid(
            f"the backup was made by appliance {made_by}, newer than this {__version__}"
        )
    if archives.SNAPSHOT not in manifest["members"]:
        raise archives.BackupInvalid("the backup holds no OpenBao snapshot")


@contextmanager
def _private(path: Path) -> Iterator[Any]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        yield handle


@contextmanager
def _audit_quiet(audit: Path) -> Iterator[None]:
    """Hold the audit checkpoint lock: no checkpoint is signed, anchored and appended while
    the snapshot and the copy are taken (the writers skip a checkpoint when it is held)."""
    lock = audit / "audit.checkpoint.lock"
    if not lock.is_file():
        yield
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _copy_audit(audit: Path, target: Path) -> dict[str, Path]:
    """Copy the audit directory under the log's own lock (whole lines only)."""
    target.mkdir(mode=0o700)
    log = audit / "audit.jsonl"
    fd = os.open(log, os.O_RDONLY) if log.is_file() else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        copied = {}
        for path in sorted(audit.iterdir()):
            if path.is_file() and not path.name.endswith(".lock"):
                shutil.copy2(path, target / path.name)
                copied[f"audit/{path.name}"] = target / path.name
        return copied
    finally:
        if fd is not None:
            os.close(fd)


def _replace_audit(state: Path, restored: Path) -> None:
    """Swap the restored audit directory in with one rename (its files keep the owners and
    modes of the one they replace); the replaced one is removed."""
    audit = state / "audit"
    staged = state / ".audit-restored"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(restored, staged)
    stat = audit.stat()
    os.chown(staged, stat.st_uid, stat.st_gid)
    os.chmod(staged, stat.st_mode & 0o7777)
    for path in staged.iterdir():
        before = audit / path.name
        if before.exists():
            st = before.stat()
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, st.st_mode & 0o7777)
    old = state / ".audit-replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(audit, old)
    os.rename(staged, audit)
    shutil.rmtree(old)


def _systemd() -> bool:
    return os.environ.get("APPLIANCE_SERVICE_MANAGER") == "systemd"


def _stop_services(state: Path, report: Report) -> None:
    if _systemd():
        subprocess.run(["systemctl", "stop", *SYSTEMD_UNITS.values()], check=True)
    else:
        for name in reversed(RESTARTED):
            stop_by_pid_file(state / "run" / name / f"{name}.pid")
    report(f"stopped: {', '.join(RESTARTED)}")


def _start_services(state: Path, report: Report) -> None:
    if _systemd():
        subprocess.run(["systemctl", "start", *SYSTEMD_UNITS.values()], check=True)
    else:
        for name in RESTARTED:
            stack.restart_service(state, name)
    report(f"started: {', '.join(RESTARTED)}")
