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
import json
import os
import pwd
import shutil
import socket
import stat as statmod
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
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
    seal_for,
    seal_status,
    shared_gid,
    snapshot,
    stop_by_pid_file,
    submit_shares,
    take_snapshot,
    wait_responding,
)
from ._stack import backup as archives
from ._stack import upgrade as versions
from ._stack.procs import read_pid_file

#: The services a restore stops and starts again (OpenBao and Redis keep running).
RESTARTED = ("api", "worker", "flower")
#: The VM image's units of those services (`service_manager`).
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
    timeout: float = 60.0,
) -> UnsealOutcome:
    """Submit the shares until OpenBao is unsealed, then, with a quorum of them, re-run the
    bootstrap and enrolment when a service's credential is no longer live or `reenrol` asks
    (root token generated from these shares, revoked at the end). The shares are `supplied`
    in operator mode, the file's in file mode. Raises `SharesRefused`."""
    addr = openbao_addr(state)
    shares = seal_for(state, supplied=supplied).shares()
    if shares is None:
        raise OpenBaoSealed("no unseal shares given")
    # At boot the unseal unit may run while OpenBao is still starting (minutes under emulation).
    wait_responding(addr, timeout)
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
    one), its manifest naming this OpenBao cluster and signed with the transit key `backup`.
    Works while the services run: the audit log is copied under its writers' locks, after the
    snapshot, so that every anchor in the snapshot has its entries in the copy. Only regular
    files of the audit log's own are copied (`AUDIT_FILES`); what else is there is skipped and
    named in the result."""
    recipient = age.read_recipient(recipient_path or _kept_recipient(state))
    token = _backup_token(state)
    addr = openbao_addr(state)
    cluster = snapshot.cluster_id(addr)
    with tempfile.TemporaryDirectory(dir=state, prefix=".backup-") as work:
        members: dict[str, Path] = {}
        with _audit_quiet(state / "audit"):
            snap = Path(work) / archives.SNAPSHOT
            with _private(snap) as handle:
                take_snapshot(addr, token, handle)
            members[archives.SNAPSHOT] = snap
            copied, skipped = _copy_audit(state / "audit", Path(work) / "audit")
            members.update(copied)
        for name in ("stack.json", "version.json"):
            if (state / name).is_file():
                members[name] = state / name
        manifest = archives.write_archive(
            out,
            recipient,
            archives.ONLINE,
            __version__,
            members,
            cluster=cluster,
            sign=lambda raw: snapshot.sign_manifest(addr, token, raw),
        )
    return {"out": str(out), "manifest": manifest, "skipped": skipped}


def restore(
    state: Path,
    archive_path: Path,
    identity: Path,
    read_shares: Callable[[], Shares | None],
    report: Report,
    *,
    max_bytes: int = archives.MAX_RESTORE_BYTES,
) -> dict[str, Any]:
    """Restore an online backup of this appliance.

    Before anything is stopped: unseal if needed, generate a root token from the shares
    (operator mode: `read_shares`; file mode: the state's), decrypt the archive, check the
    manifest's signature (transit key `backup`) and cluster, and every member. Then stop the
    API, worker and Flower and check that they are down (else abort, nothing changed); restore
    the snapshot (OpenBao checks it is this cluster's), put the audit directory in place (the
    replaced one is kept, root-only, in `<state>/audit-replaced/`), re-run the bootstrap and
    enrolment, record `appliance.restored` in the restored log, and start the services."""
    with snapshot.openbao_refusals("restore"):
        return _restore(state, archive_path, identity, read_shares, report, max_bytes)


def _restore(
    state: Path,
    archive_path: Path,
    identity: Path,
    read_shares: Callable[[], Shares | None],
    report: Report,
    max_bytes: int,
) -> dict[str, Any]:
    addr = openbao_addr(state)
    shares = read_shares() if seal_for(state).mode == "operator" else seal_for(state).shares()
    if shares is None:
        raise OpenBaoSealed("the operator's unseal shares are needed for a restore")
    if seal_status(addr).sealed:
        submit_shares(addr, shares, report=lambda p: report(_progress_line(p)))
    manager = service_manager(state)
    cluster = snapshot.cluster_id(addr)
    # A root token of the current storage: it checks the signature and restores the snapshot,
    # then goes with the storage it was made in (the snapshot does not hold it).
    bao = BaoHandle(addr, generate_root_token(addr, state, shares), 0, state)
    try:
        root = bao.root_token or ""
        verify = _manifest_verifier(addr, root)
        with archives.open_archive(
            archive_path, identity, state, verify=verify, max_bytes=max_bytes
        ) as archive:
            _check_restorable(archive.manifest, cluster)
            report(f"backup of {archive.manifest['created']} verified (signed, this cluster)")
            _stop_services(state, manager, report)
            steps: list[str] = []
            try:
                done = _swap_in(state, addr, root, archive, shares, steps, report, manager)
                return {"restored": str(archive_path), **done}
            except BaseException as exc:
                _start_after_failure(state, manager, steps, report, exc)
                raise
    finally:
        bao.revoke_root()


def _swap_in(
    state: Path,
    addr: str,
    root: str,
    archive: archives.Archive,
    shares: Shares,
    steps: list[str],
    report: Report,
    manager: str,
) -> dict[str, Any]:
    """The steps of a restore that change storage, the services stopped."""
    snapshot.restore_snapshot(addr, root, archive.member(archives.SNAPSHOT).read_bytes())
    steps.append("OpenBao storage restored from the snapshot")
    report(steps[-1])
    if seal_status(addr).sealed:
        submit_shares(addr, shares, report=lambda p: report(_progress_line(p)))
    replaced = _replace_audit(state, archive.root / "audit")
    steps.append(f"audit directory replaced (the replaced one is kept in {replaced.path})")
    report(steps[-1])
    bao = BaoHandle(addr, generate_root_token(addr, state, shares), 0, state)
    try:
        enrolled = stack.enrol(state, bao)
        steps.append("bootstrap and enrolment re-run")
        entry = _record_restore(state, addr, bao.root_token or "", archive, replaced)
        steps.append(f"appliance.restored recorded in the audit log (seq {entry})")
        report(steps[-1])
    finally:
        bao.revoke_root()
    _start_services(state, manager, report)
    return {
        "created": archive.manifest["created"],
        "replaced_audit": str(replaced.path),
        "audit_seq": entry,
        **enrolled,
    }


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


def _check_restorable(manifest: Any, cluster: str) -> None:
    if manifest.get("kind") != archives.ONLINE:
        raise archives.BackupInvalid(
            "this is an offline (pre-upgrade) backup: restore it by hand (see README)"
        )
    made_by = str(manifest.get("appliance_version", ""))
    if versions.parse_version(made_by) > versions.parse_version(__version__):
        raise archives.BackupInvalid(
            f"the backup was made by appliance {made_by}, newer than this {__version__}"
        )
    if manifest.get("cluster_id") != cluster:
        raise archives.BackupInvalid(
            "the backup is of another OpenBao cluster (cluster id "
            f"{str(manifest.get('cluster_id'))[:40]!r}, this one is {cluster!r}): its snapshot "
            "would leave OpenBao sealed under the other cluster's keys"
        )
    if archives.SNAPSHOT not in manifest["members"]:
        raise archives.BackupInvalid("the backup holds no OpenBao snapshot")
    unknown = sorted(
        name.removeprefix("audit/")
        for name in manifest["members"]
        if name.startswith("audit/") and name.removeprefix("audit/") not in AUDIT_FILES
    )
    if unknown:
        raise archives.BackupInvalid(f"the backup's audit directory holds unknown files {unknown}")


def _manifest_verifier(addr: str, root_token: str) -> archives.Verify:
    def verify(raw_manifest: bytes, signature: str | None) -> None:
        if signature is None:
            raise archives.BackupInvalid("the backup's manifest is not signed")
        try:
            snapshot.verify_manifest(addr, root_token, raw_manifest, signature)
        except snapshot.BackupRefused as exc:
            raise archives.BackupInvalid(exc.detail) from None

    return verify


@contextmanager
def _private(path: Path) -> Iterator[Any]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        yield handle


@contextmanager
def _audit_quiet(audit: Path) -> Iterator[None]:
    """Hold the audit checkpoint lock: no checkpoint is signed, anchored and appended while
    the snapshot and the copy are taken (the writers skip a checkpoint when it is held)."""
    fd = _open_regular(audit, "audit.checkpoint.lock")
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class AuditFile:
    """Owner and mode of one of the audit log's files, as `prepare` and the writer make them."""

    #: In a directory shared by the writers' group (service users): root:appliance, this mode.
    shared_mode: int
    #: Otherwise (the local stack run by one user): that user's, this mode.
    private_mode: int
    #: Root's and its group root's even when shared: what `audit verify` trusts first.
    root_only: bool = False


#: The audit log's own files: all a backup copies and a restore writes. The checkpoint lock is
#: made by the writers; temporary files are left out.
AUDIT_FILES: Mapping[str, AuditFile] = MappingProxyType(
    {
        "audit.jsonl": AuditFile(0o660, 0o600),
        "audit.checkpoints.jsonl": AuditFile(0o660, 0o600),
        "audit.digest.key": AuditFile(0o640, 0o600),
        "audit-pubkeys.json": AuditFile(0o644, 0o644, root_only=True),
    }
)
_NOT_COPIED = frozenset({"audit.checkpoint.lock"})


def _open_regular(directory: Path, name: str) -> int | None:
    """A read descriptor of `directory/name` when it is a regular file with one link, opened
    without following a symbolic link (red-team finding H2: a service user may put anything
    in the audit directory, e.g. a link to a secret that root would then copy); else None."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None  # Missing, a symbolic link (ELOOP), or not openable.
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not statmod.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        return None
    return fd


def _copy_audit(audit: Path, target: Path) -> tuple[dict[str, Path], list[str]]:
    """Copy the audit log's own regular files under the log's lock (whole lines only); what
    else is in the directory is skipped and named."""
    target.mkdir(mode=0o700)
    log_fd = _open_regular(audit, "audit.jsonl")
    try:
        if log_fd is not None:
            fcntl.flock(log_fd, fcntl.LOCK_EX)
        copied: dict[str, Path] = {}
        skipped: list[str] = []
        for name in sorted(os.listdir(audit)):
            if name in _NOT_COPIED:
                continue
            fd = _open_regular(audit, name) if name in AUDIT_FILES else None
            if fd is None:
                skipped.append(name)
                continue
            with os.fdopen(fd, "rb") as source, _private(target / name) as out:
                shutil.copyfileobj(source, out)
            copied[f"audit/{name}"] = target / name
        return copied, skipped
    finally:
        if log_fd is not None:
            os.close(log_fd)


@dataclass(frozen=True)
class Replaced:
    """The audit directory a restore replaced: where it is kept, and its log's head."""

    path: Path
    seq: int
    head: str | None


def _replace_audit(state: Path, restored: Path) -> Replaced:
    """Write the restored audit files into a fresh directory (created exclusively, never
    following a link, owner and mode from `AUDIT_FILES`, not from what is there now), then
    swap it in with one rename. The replaced directory is kept, root-only, in
    `<state>/audit-replaced/<UTC time>/` (red-team finding M1: a restore keeps what it
    rolled back)."""
    audit = state / "audit"
    seq, head = _log_head(audit)
    shared = stack._recorded_users(state) is not None
    group = shared_gid() if shared else os.getegid()
    owner = 0 if shared else os.geteuid()
    staged = Path(tempfile.mkdtemp(dir=state, prefix=".audit-restored-"))
    dir_fd = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in sorted(os.listdir(restored)):
            spec = AUDIT_FILES[name]  # Checked against the table before anything was stopped.
            mode = spec.shared_mode if shared else spec.private_mode
            uid, gid = (owner, 0 if spec.root_only and shared else group)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "wb") as out, (restored / name).open("rb") as source:
                os.fchown(out.fileno(), uid, gid)
                os.fchmod(out.fileno(), mode)
                shutil.copyfileobj(source, out)
                out.flush()
                os.fsync(out.fileno())
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    os.chown(staged, owner, group)
    os.chmod(staged, 0o3770 if shared else 0o700)  # As prepare makes it (sticky, setgid).
    kept = _kept_directory(state)
    os.rename(audit, kept)
    os.rename(staged, audit)
    _fsync_dir(state)
    return Replaced(kept, seq, head)


def _kept_directory(state: Path) -> Path:
    parent = state / "audit-replaced"
    parent.mkdir(mode=0o700, exist_ok=True)
    if parent.is_symlink() or not parent.is_dir():
        raise StackError(f"{parent} is not a directory")
    os.chown(parent, os.geteuid(), os.getegid())
    os.chmod(parent, 0o700)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate, n = parent / stamp, 1
    while candidate.exists():
        candidate, n = parent / f"{stamp}-{n}", n + 1
    return candidate


def _log_head(audit: Path) -> tuple[int, str | None]:
    """The last entry's seq and hash of the log in `audit` (0, None when there is none)."""
    fd = _open_regular(audit, "audit.jsonl")
    if fd is None:
        return 0, None
    with os.fdopen(fd, "rb") as log:
        size = os.fstat(log.fileno()).st_size
        log.seek(max(0, size - (1 << 20)))
        lines = log.read().split(b"\n")
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # A torn last line, or the cut first one of the tail read.
        if isinstance(entry, dict) and isinstance(entry.get("seq"), int):
            found = entry.get("hash")
            return entry["seq"], found if isinstance(found, str) else None
    return 0, None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record_restore(
    state: Path, addr: str, root_token: str, archive: archives.Archive, replaced: Replaced
) -> int:
    """Append `appliance.restored` to the restored log through the audit writer, signed and
    anchored at once (a checkpoint with the root token): who restored what over which log."""
    from .audit import AuditLog, EventType, TransitSigner
    from .vault import Transit, VaultSession

    created = datetime.fromisoformat(str(archive.manifest["created"])).astimezone(UTC)
    fields: dict[str, Any] = {
        "actor": _actor(),
        "manifest_sha256": archive.manifest_sha256,
        "backup_created": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "replaced_to_seq": replaced.seq,
        "replaced_log": replaced.path.name,
    }
    if replaced.head is not None:
        fields["replaced_head_hash"] = replaced.head
    signer = TransitSigner(Transit(VaultSession(addr, root_token)))
    log = AuditLog.open(stack.audit_log(state), signer, source="operator")
    try:
        return log.record(EventType.APPLIANCE_RESTORED, **fields).seq
    finally:
        log.close()


def _actor() -> str:
    """Who runs this: the user, and the login behind it when another (sudo, su)."""
    uid = os.getuid()
    actor = _user_name(uid)
    try:
        login = int(Path("/proc/self/loginuid").read_text())
    except (OSError, ValueError):
        return actor
    if login not in (uid, 0xFFFFFFFF):
        actor += f"/login:{_user_name(login)}"
    return actor


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


# ---- the services a restore stops -----------------------------------------------------------

SYSTEMD, PID_FILES = "systemd", "pid-files"


def service_manager(state: Path) -> str:
    """Who runs this state's API, worker and Flower: `systemd` or `pid-files`.

    `APPLIANCE_SERVICE_MANAGER` (`systemd` or `pid-files`) decides when set. Else it is
    systemd when systemd is PID 1 (`/run/systemd/system` exists) and the unit
    `appliance-api.service` is loaded with `APPLIANCE_STATE=<this state>` in its environment
    (the image's units name the state directory they serve); otherwise the local stack's pid
    files. The host is asked, not the caller's environment (red-team finding H3: an
    operator's SSH shell has none of the units' variables)."""
    override = os.environ.get("APPLIANCE_SERVICE_MANAGER")
    if override:
        if override not in (SYSTEMD, PID_FILES):
            raise StackError(
                f"APPLIANCE_SERVICE_MANAGER={override[:40]!r}: use {SYSTEMD} or {PID_FILES}"
            )
        return override
    if not Path("/run/systemd/system").is_dir():
        return PID_FILES
    shown = _systemctl("show", "-p", "LoadState", "-p", "Environment", SYSTEMD_UNITS["api"])
    props = dict(line.partition("=")[::2] for line in shown.stdout.splitlines())
    wanted = f"APPLIANCE_STATE={state.resolve()}"
    if props.get("LoadState") == "loaded" and wanted in props.get("Environment", "").split():
        return SYSTEMD
    return PID_FILES


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - a fixed program, arguments of ours
        ["systemctl", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _stop_services(state: Path, manager: str, report: Report) -> None:
    """Stop the API, worker and Flower and check that they are down; when they are not, start
    them again and raise: nothing has been changed."""
    if manager == SYSTEMD:
        done = _systemctl("stop", *SYSTEMD_UNITS.values())
        if done.returncode != 0:
            _start_services(state, manager, report)
            raise StackError(f"systemctl stop failed: {done.stderr.strip()}; nothing was changed")
    else:
        for name in reversed(RESTARTED):
            stop_by_pid_file(state / "run" / name / f"{name}.pid")
    running = _still_running(state, manager)
    if running:
        _start_services(state, manager, report)
        raise StackError(
            f"the services are not down ({'; '.join(running)}): nothing was changed, the "
            "services were started again"
        )
    report(f"stopped: {', '.join(RESTARTED)} (checked: down)")


def _still_running(state: Path, manager: str, timeout: float = 15.0) -> list[str]:
    """What still runs of the services, waited for up to `timeout` (empty: all down)."""
    deadline = time.monotonic() + timeout
    while True:
        found = _running_now(state, manager)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def _running_now(state: Path, manager: str) -> list[str]:
    found = []
    if manager == SYSTEMD:
        for unit in SYSTEMD_UNITS.values():
            active = _systemctl("is-active", unit).stdout.strip()
            if active not in ("inactive", "failed"):
                found.append(f"{unit} is {active}")
    ports = stack.load_ports(state)
    for name, port in (("api", ports.api), ("flower", ports.flower)):
        if _listening(port):
            found.append(f"the {name} port {port} still accepts connections")
    holders = _audit_holders(state / "audit")
    if holders:
        found.append(f"process(es) {', '.join(map(str, holders))} hold audit files open")
    return found


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _audit_holders(audit: Path) -> list[int]:
    """The processes (other than this one) with a file of the audit directory open."""
    inside = os.path.realpath(audit) + os.sep
    holders = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue  # Gone, or not ours to read.
        if any(t.startswith(inside) for t in targets):
            holders.append(int(entry.name))
    return sorted(holders)


def _start_services(state: Path, manager: str, report: Report) -> None:
    if manager == SYSTEMD:
        done = _systemctl("start", *SYSTEMD_UNITS.values())
        if done.returncode != 0:
            raise StackError(f"systemctl start failed: {done.stderr.strip()}")
    else:
        for name in RESTARTED:
            stack.restart_service(state, name)
    report(f"started: {', '.join(RESTARTED)}")


def _start_after_failure(
    state: Path, manager: str, steps: list[str], report: Report, exc: BaseException
) -> None:
    """After a failure with the services stopped: say what was done, start them again."""
    report(f"restore failed after the services were stopped: {exc}")
    report("done before the failure: " + ("; ".join(steps) if steps else "nothing was changed"))
    try:
        _start_services(state, manager, report)
    except (StackError, OSError, subprocess.SubprocessError) as again:
        report(f"the services could not be started again: {again}; start them by hand")
