"""Backup archives (issue 15): what `appliance backup` writes, `restore` reads and `upgrade`
writes before it migrates.

An archive is a tar, encrypted with age (binary format) to the operator's X25519 recipient, of
`manifest.json` first, `manifest.sig` (an online backup's: the manifest's signature by this
appliance's transit key `backup`, `snapshot.py`) and then its members. The manifest names the
archive's format, kind, appliance version and OpenBao cluster, when it was made, and each
member's size and SHA-256; `open_archive` takes an archive only when its members are exactly
those and match (else `BackupInvalid`), so that a restore never acts on a partial or altered
archive. age gives confidentiality only (anyone holding the operator's recipient can make an
archive): the signature, checked by the caller's `verify` before any member is extracted, is
what says this appliance made it.

Reading is bounded (red-team finding M3): a plain tar only (`r:`, no transparent
decompression), regular non-sparse members whose size is the manifest's, a cap on the total
(`max_bytes`), and the free space checked before anything is written, in a root-only
temporary directory.

Kinds:
- `online` (`appliance backup`, services running): `openbao.snap`, a raft snapshot of OpenBao
  (registry, transit keys, policies, identities and audit anchors, barrier-encrypted), the audit
  directory (`audit/...`: log, checkpoints, exported public keys, digest key), `stack.json` and
  `version.json`. Not the unseal shares, `secrets/` or `tls/`: backed up separately on purpose
  (the shares are the operator's; the rest is regenerated or re-enrolled).
- `offline` (`appliance upgrade`, before migrating, OpenBao stopped): the state directory's
  files but `secrets/`, `run/` (service credentials, logs) and `tls/*.key`, and earlier backups.
  OpenBao's raft files are in it as they are on disk, barrier-encrypted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from . import age
from .procs import StackError

FORMAT = 2
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
#: The default cap on what a restore extracts (the sum of the members' sizes).
MAX_RESTORE_BYTES = 16 << 30
#: Room left on the disk beyond what the extraction takes.
_FREE_MARGIN = 64 << 20
SNAPSHOT = "openbao.snap"
ONLINE, OFFLINE = "online", "offline"

#: What a backup leaves out on purpose (said in the manifest and by the CLI).
NOT_INCLUDED = (
    "the unseal shares (the operator's)",
    "secrets/ (tokens, passwords, enrolment credentials)",
    "tls/ (the CA and service keys)",
)


class BackupInvalid(StackError):
    """Raised when an archive does not decrypt, or its manifest or a member does not verify."""

    code, title = "backup_invalid", "Invalid backup"


@dataclass(frozen=True)
class Archive:
    """A verified, decrypted archive: its manifest, and its members in a private directory."""

    manifest: Mapping[str, Any]
    root: Path
    #: The SHA-256 of the manifest's bytes (what the signature covers; the audit entry names it).
    manifest_sha256: str

    def member(self, name: str) -> Path:
        """Where member `name` was extracted."""
        return self.root / name


def write_archive(
    out: Path,
    recipient: str,
    kind: str,
    version: str,
    members: Mapping[str, Path],
    *,
    cluster: str | None = None,
    sign: Callable[[bytes], str] | None = None,
) -> dict[str, Any]:
    """Encrypt a tar of a manifest and `members` (name in the archive -> file) to `recipient`,
    into `out` (0600, written whole or not at all). `cluster` is OpenBao's cluster id, `sign`
    signs the manifest's bytes (online backups). Returns the manifest."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "appliance_version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "not_included": list(NOT_INCLUDED),
        "members": {name: _digest(path) for name, path in sorted(members.items())},
    }
    if cluster is not None:
        manifest["cluster_id"] = cluster
    encoded = json.dumps(manifest, indent=1).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".backup-") as work:
        plain = Path(work) / "plain.tar"
        with tarfile.open(plain, "w") as tar:
            _add_bytes(tar, MANIFEST, encoded)
            if sign is not None:
                _add_bytes(tar, SIGNATURE, sign(encoded).encode())
            for name, path in sorted(members.items()):
                tar.add(path, arcname=name, recursive=False, filter=_plain_member)
        sealed = Path(work) / "sealed.age"
        fd = os.open(sealed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with plain.open("rb") as source, os.fdopen(fd, "wb") as target:
            age.encrypt_stream(source, target, recipient)
            target.flush()
            os.fsync(target.fileno())
        os.replace(sealed, out)
    return manifest


#: What checks a manifest before any member is extracted: its bytes, its signature (None when
#: the archive has none); returns or raises.
Verify = Callable[[bytes, str | None], None]


@contextmanager
def open_archive(
    path: Path,
    identity_file: Path,
    work_parent: Path,
    *,
    verify: Verify | None = None,
    max_bytes: int = MAX_RESTORE_BYTES,
) -> Iterator[Archive]:
    """Decrypt `path` with the operator's identity and verify it (`verify` on the manifest
    first, then every member against it); yield it extracted in a private directory under
    `work_parent` (removed afterwards). Raises `BackupInvalid`."""
    work_parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BackupInvalid(f"cannot read {path}: {exc.strerror}") from None
    if size > max_bytes:
        raise BackupInvalid(f"{path} is larger than the cap of {max_bytes} bytes")
    # The decrypted tar is about as large as the archive (age does not compress).
    _check_free(work_parent, size)
    with tempfile.TemporaryDirectory(dir=work_parent, prefix=".restore-") as work:
        os.chmod(work, 0o700)
        plain = Path(work) / "plain.tar"
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with path.open("rb") as source, os.fdopen(fd, "wb") as target:
                age.decrypt_stream(source, target, identity_file)
        except OSError as exc:
            raise BackupInvalid(f"cannot read {path}: {exc.strerror}") from None
        except age.AgeError as exc:
            raise BackupInvalid(str(exc)) from None
        root = Path(work) / "members"
        root.mkdir(mode=0o700)
        manifest, digest = _extract_verified(plain, root, verify, max_bytes)
        plain.unlink()
        yield Archive(manifest, root, digest)


def _extract_verified(
    plain: Path, root: Path, verify: Verify | None, max_bytes: int
) -> tuple[dict[str, Any], str]:
    try:
        # "r:": a plain tar only. "r" is "r:*", which decompresses gzip, bzip2 and xz on the
        # fly: a few hundred bytes of xz would expand to gigabytes (red-team finding M3).
        with tarfile.open(plain, "r:") as tar:
            members = tar.getmembers()
            if not members or members[0].name != MANIFEST:
                raise BackupInvalid("not an appliance backup: no manifest first")
            raw_manifest = _read_small(tar, members[0], "the manifest")
            manifest = _manifest(raw_manifest)
            rest = members[1:]
            signature = None
            if rest and rest[0].name == SIGNATURE:
                signature = _read_small(tar, rest[0], "the signature").decode("ascii", "replace")
                rest = rest[1:]
            if verify is not None:
                verify(raw_manifest, signature)
            listed = manifest["members"]
            names = [m.name for m in rest]
            if sorted(names) != sorted(listed) or len(set(names)) != len(names):
                raise BackupInvalid("the archive's members are not those its manifest lists")
            total = sum(m.size for m in rest)
            if total > max_bytes:
                raise BackupInvalid(f"the archive's members exceed the cap of {max_bytes} bytes")
            _check_free(root, total)
            for member in rest:
                _extract_one(tar, member, root, listed[member.name])
    except (tarfile.TarError, OSError) as exc:
        raise BackupInvalid(f"the archive does not read as a tar: {exc}") from None
    return manifest, hashlib.sha256(raw_manifest).hexdigest()


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, what: str) -> bytes:
    if not member.isreg() or member.issparse() or member.size > 1 << 20:
        raise BackupInvalid(f"{what} is not a small plain file")
    handle = tar.extractfile(member)
    if handle is None:
        raise BackupInvalid(f"{what} is not a file")
    return handle.read(member.size)


def _check_free(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed + _FREE_MARGIN > free:
        raise BackupInvalid(
            f"not enough free space in {directory}: {needed} bytes needed (plus a margin of "
            f"{_FREE_MARGIN}), {free} free"
        )


def _manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise BackupInvalid("the manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupInvalid(f"unknown backup format (this appliance reads format {FORMAT})")
    members = manifest.get("members")
    if not isinstance(members, dict) or not all(
        isinstance(v, dict)
        and isinstance(v.get("sha256"), str)
        and isinstance(v.get("size"), int)
        and not isinstance(v.get("size"), bool)
        for v in members.values()
    ):
        raise BackupInvalid("the manifest lists no members with their size and SHA-256")
    return manifest


def _extract_one(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, expected: Mapping[str, Any]
) -> None:
    name = PurePosixPath(member.name)
    # `isfile()` is true of a sparse member too (GNU sparse maps expand to any size).
    if not member.isreg() or member.issparse() or name.is_absolute() or ".." in name.parts:
        raise BackupInvalid(f"member {member.name!r} is not a plain file inside the archive")
    if member.size != expected["size"]:
        raise BackupInvalid(f"member {member.name!r} does not have the size its manifest says")
    source = tar.extractfile(member)
    if source is None:
        raise BackupInvalid(f"member {member.name!r} has no content")
    target = root.joinpath(*name.parts)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(1 << 16):
            written += len(chunk)
            if written > member.size:
                raise BackupInvalid(f"member {member.name!r} is longer than it says")
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected["sha256"]:
        raise BackupInvalid(f"member {member.name!r} does not match its SHA-256 in the manifest")


def _digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    tar.addfile(info, io.BytesIO(data))


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # No owner names or ids of this host in the archive; restored files are root's 0600.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o600
    return info


def offline_members(state_dir: Path) -> dict[str, Path]:
    """The files of an offline backup (see the module docstring for what is left out)."""
    members: dict[str, Path] = {}
    for path in sorted(state_dir.rglob("*")):
        relative = path.relative_to(state_dir)
        top = relative.parts[0]
        if top in ("secrets", "run", "backups") or not path.is_file() or path.is_symlink():
            continue
        if top == "tls" and path.suffix == ".key":
            continue
        members[relative.as_posix()] = path
    return members
