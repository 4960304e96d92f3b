"""The VM image's day-2 commands (issue 15) on a real stack whose seal is the operator's:
`up --shares-to` (as `init --shares-to` on the image), a restart that leaves OpenBao sealed,
`unseal` (malformed, wrong, right shares), `backup` and `restore`, `upgrade`. Real Redis,
OpenBao, Celery worker and API; the operator's age identity is made by the test and never
given to the stack.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import io
import json
import os
import pwd
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import pyrage
import pytest
from pyrage import x25519

from appliance import __version__, maintenance, stack
from appliance._stack import StackError, seal_status, snapshot
from appliance._stack.seal import BEGIN_MARK, END_MARK
from appliance.errors import NotFound

from .conftest import Stack, submit

ADD = "def add(a, b):\n    return a + b\n"
FREE = ("--redis-port", "0", "--bao-port", "0", "--api-port", "0", "--flower-port", "0")
SEALED = "OpenBao is sealed: run `appliance unseal`"


@dataclass
class Operated:
    """A stack whose unseal shares only the operator (this test) holds."""

    state: Path
    identity: Any
    identity_file: Path
    recipient_file: Path
    shares: dict[str, Any]
    block: str

    def cli(
        self, *args: str, stdin: str = "", timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", "--state", str(self.state), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def as_stack(self) -> Stack:
        return Stack(self.state, stack.status(self.state))

    def shares_json(self) -> str:
        return json.dumps(self.shares)


def _decrypt_block(stdout: str, identity: Any) -> dict[str, Any]:
    start, end = stdout.index(BEGIN_MARK), stdout.index(END_MARK)
    armored = stdout[start + len(BEGIN_MARK) : end].strip()
    assert armored.startswith("-----BEGIN AGE ENCRYPTED FILE-----")
    shares: dict[str, Any] = json.loads(pyrage.decrypt(armored.encode(), [identity]))
    return shares


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operated]:
    base = tmp_path_factory.mktemp("day2")
    base.chmod(0o711)
    identity = x25519.Identity.generate()
    identity_file = base / "operator.key"
    identity_file.write_text(str(identity) + "\n")
    recipient_file = base / "operator.pub"
    recipient_file.write_text(f"# the operator's age recipient\n{identity.to_public()}\n")
    state = base / "state"
    done = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "--state", str(state), "up", *FREE]
        + ["--metrics-port", "0", "--shares-to", str(recipient_file)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert done.returncode == 0, done.stderr
        block = done.stdout[done.stdout.index(BEGIN_MARK) :]
        shares = _decrypt_block(done.stdout, identity)
        # The block is kept (ciphertext only) in <state>/unseal-shares.age and printed by every
        # init/up until the operator acknowledges it; this test has saved it, so it does.
        kept = state / "unseal-shares.age"
        assert kept.is_file() and kept.read_text() in done.stdout
        operated = Operated(state, identity, identity_file, recipient_file, shares, block)
        acked = operated.cli("shares", "ack", "--yes")
        assert acked.returncode == 0, acked.stderr
        assert not kept.exists()
        yield operated
    finally:
        stack.down(state)


def _files_under(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def _run_add(s: Stack, a: int, b: int, keyid: str = "local", key: Path | None = None) -> Any:
    client = s.client(keyid, key)
    accepted = submit(client, ADD, "add", args=[a, b])
    assert accepted.status_code == 202, accepted.text
    resp = s.wait_result(client, accepted.json()["result_key"], timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["result"]


def test_shares_are_printed_encrypted_and_stored_nowhere(operated: Operated) -> None:
    shares = operated.shares
    assert shares["threshold"] == 3 and len(shares["keys"]) == 5
    assert not (operated.state / "secrets" / "bao-unseal.json").exists()
    config = json.loads((operated.state / "stack.json").read_text())
    assert config["unseal"] == "operator"
    kept = (operated.state / "operator-recipient").read_text().strip()
    assert kept == str(operated.identity.to_public())
    # Canary: no share, in base64 or raw, in any file of the state (logs included).
    needles = [k.encode() for k in shares["keys"]] + [base64.b64decode(k) for k in shares["keys"]]
    for path in _files_under(operated.state):
        data = path.read_bytes()
        assert not any(needle in data for needle in needles), path
    assert not (operated.state / "secrets" / "bao-root.token").exists()
    assert _run_add(operated.as_stack(), 2, 40) == 42


def test_restart_leaves_openbao_sealed_and_up_and_init_refuse(operated: Operated) -> None:
    stopped = operated.cli("down")
    assert stopped.returncode == 0, stopped.stderr
    refused = operated.cli("up")
    assert refused.returncode == 1 and SEALED in refused.stderr, refused.stderr
    addr = stack.status(operated.state)["vault_addr"]
    assert seal_status(addr).sealed
    refused = operated.cli("init", "--timeout", "20")
    assert refused.returncode == 1 and SEALED in refused.stderr, refused.stderr
    assert seal_status(addr).sealed


def test_unseal_refuses_malformed_and_wrong_shares(operated: Operated) -> None:
    addr = stack.status(operated.state)["vault_addr"]
    for junk in ("not base64 !!\n", "", '{"keys": [1, 2]}', operated.block):
        malformed = operated.cli("unseal", stdin=junk)
        assert malformed.returncode == 2, (junk, malformed.stderr)
        assert seal_status(addr).progress == 0
    assert "decrypt it first" in operated.cli("unseal", stdin=operated.block).stderr
    wrong = "\n".join(base64.b64encode(os.urandom(33)).decode() for _ in range(3))
    refused = operated.cli("unseal", stdin=wrong)
    assert refused.returncode == 1 and "refused the shares" in refused.stderr, refused.stderr
    too_few = operated.cli("unseal", stdin="\n".join(operated.shares["keys"][:2]))
    assert too_few.returncode == 1 and "too few shares: 2 of 3" in too_few.stderr, too_few.stderr
    assert seal_status(addr).sealed
    # Never a share in what the command printed.
    assert operated.shares["keys"][0] not in too_few.stdout + too_few.stderr


def test_unseal_from_stdin_then_services_come_back(operated: Operated) -> None:
    opened = operated.cli("unseal", "--reset", stdin=operated.shares_json())
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["sealed"] is False
    assert "share accepted: 1 of 3" in opened.stderr
    assert not any(k in opened.stdout + opened.stderr for k in operated.shares["keys"])
    started = operated.cli("up")
    assert started.returncode == 0, started.stderr
    assert BEGIN_MARK not in started.stdout
    assert _run_add(operated.as_stack(), 20, 22) == 42
    # The bootstrap with the same shares: it re-runs and revokes its root token.
    reenrolled = operated.cli("unseal", "--reenrol", stdin="\n".join(operated.shares["keys"]))
    assert reenrolled.returncode == 0, reenrolled.stderr
    assert json.loads(reenrolled.stdout)["reenrolled"] is True


def test_backup_then_restore_serves_the_earlier_state(operated: Operated, tmp_path: Path) -> None:
    s = operated.as_stack()
    kept_key = s.add_client("kept", ("add",))
    assert _run_add(s, 1, 2, "kept", kept_key) == 3
    out = tmp_path / "appliance.backup.age"
    done = operated.cli("backup", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "not included" in done.stderr and "unseal shares" in done.stderr
    members = json.loads(done.stdout)["members"]
    assert "openbao.snap" in members and "audit/audit.jsonl" in members
    assert not any(name.startswith(("secrets/", "tls/")) for name in members)
    # After the backup: a new client, more audit entries.
    later_key = s.add_client("later", ("add",))
    assert _run_add(s, 3, 4, "later", later_key) == 7
    wrong = tmp_path / "other.key"
    wrong.write_text(str(x25519.Identity.generate()) + "\n")
    refused = operated.cli(
        "restore", str(out), "--identity", str(wrong), stdin=operated.shares_json()
    )
    assert refused.returncode == 1 and "decrypt" in refused.stderr, refused.stderr
    restored = operated.cli(
        "restore", str(out), "--identity", str(operated.identity_file), stdin=operated.shares_json()
    )
    assert restored.returncode == 0, restored.stderr
    s = operated.as_stack()
    stack._wait_ready(operated.state, stack.load_ports(operated.state), 60)
    with pytest.raises(NotFound):
        s.registry().read("later")
    assert _run_add(s, 5, 6, "kept", kept_key) == 11
    verified = operated.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_backup_archive_is_refused_when_altered(operated: Operated, tmp_path: Path) -> None:
    out = tmp_path / "b.age"
    assert operated.cli("backup", "--out", str(out)).returncode == 0
    plain = pyrage.decrypt(out.read_bytes(), [operated.identity])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        names = tar.getnames()
        assert names[0] == "manifest.json"
        rebuilt = io.BytesIO()
        with tarfile.open(fileobj=rebuilt, mode="w") as altered:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if member.name == "stack.json":
                    data = data.replace(b"ports", b"PORTS")
                altered.addfile(member, io.BytesIO(data))
    forged = tmp_path / "forged.age"
    forged.write_bytes(pyrage.encrypt(rebuilt.getvalue(), [operated.identity.to_public()]))
    refused = operated.cli(
        "restore",
        str(forged),
        "--identity",
        str(operated.identity_file),
        stdin=operated.shares_json(),
    )
    assert refused.returncode == 1 and "SHA-256" in refused.stderr, refused.stderr
    # Nothing was stopped.
    assert all(v["state"] == "running" for v in stack.status(operated.state)["services"].values())


def _audit_entries(state: Path) -> list[dict[str, Any]]:
    lines = (state / "audit" / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def test_restore_is_recorded_and_keeps_the_replaced_log(operated: Operated, tmp_path: Path) -> None:
    """Finding M1: the restored log says who restored which backup over which log; the
    replaced log is kept, root-only; the backup token can no longer force a snapshot."""
    out = tmp_path / "m1.age"
    assert operated.cli("backup", "--out", str(out)).returncode == 0
    s = operated.as_stack()
    assert _run_add(s, 8, 9) == 17
    head = _audit_entries(operated.state)[-1]
    restored = operated.cli(
        "restore", str(out), "--identity", str(operated.identity_file), stdin=operated.shares_json()
    )
    assert restored.returncode == 0, restored.stderr
    done = json.loads(restored.stdout)
    kept = Path(done["replaced_audit"])
    assert kept.parent == operated.state / "audit-replaced"
    assert (kept.parent.stat().st_mode & 0o777) == 0o700 and kept.parent.stat().st_uid == 0
    kept_entries = [json.loads(x) for x in (kept / "audit.jsonl").read_text().splitlines() if x]
    assert kept_entries[-1]["seq"] >= head["seq"]
    entry = [e for e in _audit_entries(operated.state) if e["type"] == "appliance.restored"][-1]
    plain = pyrage.decrypt(out.read_bytes(), [operated.identity])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        raw_manifest = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
    assert entry["manifest_sha256"] == hashlib.sha256(raw_manifest).hexdigest()
    assert entry["replaced_to_seq"] == kept_entries[-1]["seq"]
    assert entry["replaced_head_hash"] == kept_entries[-1]["hash"]
    assert entry["replaced_log"] == kept.name and entry["actor"].startswith("root")
    assert entry["seq"] == done["audit_seq"]
    verified = operated.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    addr = stack.status(operated.state)["vault_addr"]
    token = (operated.state / "secrets" / "backup.token").read_text().strip()
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=addr, token=token).adapter.post(
            "/v1/sys/storage/raft/snapshot-force", data=b"x"
        )


def test_backup_never_follows_a_link_and_restore_sets_owners_from_its_table(
    operated: Operated, tmp_path: Path
) -> None:
    """Finding H2: a service user's link in the audit directory to the operator token is not
    followed by the backup; a file a service user put in place of a log file does not lend its
    owner and mode to the restored one."""
    audit = operated.state / "audit"
    token = operated.state / "secrets" / "bao-operator.token"
    (audit / "evil").symlink_to(token)
    api_user = pwd.getpwnam("appliance-api")
    try:
        out = tmp_path / "h2.age"
        done = operated.cli("backup", "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert "audit/evil" not in json.loads(done.stdout)["members"]
        assert "evil" in done.stderr and "skipped" in done.stderr
        plain = pyrage.decrypt(out.read_bytes(), [operated.identity])
        assert token.read_bytes().strip() not in plain
        # The service user swaps a file of its own in (it may: the directory is its group's).
        (audit / "evil").unlink()
        digest_key = audit / "audit.digest.key"
        os.chown(digest_key, api_user.pw_uid, api_user.pw_gid)
        os.chmod(digest_key, 0o666)
        restored = operated.cli(
            "restore",
            str(out),
            "--identity",
            str(operated.identity_file),
            stdin=operated.shares_json(),
        )
        assert restored.returncode == 0, restored.stderr
    finally:
        (audit / "evil").unlink(missing_ok=True)
    shared = stack._recorded_users(operated.state) is not None
    group = grp.getgrnam("appliance").gr_gid if shared else os.getegid()
    expected = {
        "audit.jsonl": (0, group, 0o660 if shared else 0o600),
        "audit.digest.key": (0, group, 0o640 if shared else 0o600),
        "audit-pubkeys.json": (0, 0 if shared else group, 0o644),
    }
    for name, (uid, gid, mode) in expected.items():
        st = (audit / name).lstat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, mode), name
    assert (audit.stat().st_mode & 0o7777) == (0o3770 if shared else 0o700)
    assert not (audit / "evil").exists()


def test_restore_refuses_unsigned_and_other_cluster_archives(
    operated: Operated, tmp_path: Path
) -> None:
    """Finding M2: an archive anyone with the operator's recipient could build (valid hashes,
    no or a wrong signature), and a signed one of another cluster, are refused before anything
    is stopped."""
    out = tmp_path / "m2.age"
    assert operated.cli("backup", "--out", str(out)).returncode == 0
    plain = pyrage.decrypt(out.read_bytes(), [operated.identity])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(contents["manifest.json"])
    assert manifest["cluster_id"] and contents["manifest.sig"].startswith(b"vault:v")
    addr = stack.status(operated.state)["vault_addr"]
    backup_token = (operated.state / "secrets" / "backup.token").read_text().strip()

    members = {n: d for n, d in contents.items() if n not in ("manifest.json", "manifest.sig")}

    def rebuilt(raw: bytes, signature: bytes | None, files: dict[str, bytes]) -> Path:
        entries = [("manifest.json", raw)]
        entries += [("manifest.sig", signature)] if signature is not None else []
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in entries + sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        path = tmp_path / f"forged-{len(list(tmp_path.iterdir()))}.age"
        path.write_bytes(pyrage.encrypt(buffer.getvalue(), [operated.identity.to_public()]))
        return path

    altered = dict(members, **{"stack.json": members["stack.json"].replace(b"ports", b"PORTS")})
    forged = dict(manifest, members=dict(manifest["members"]))
    forged["members"]["stack.json"] = {
        "sha256": hashlib.sha256(altered["stack.json"]).hexdigest(),
        "size": len(altered["stack.json"]),
    }
    forged_raw = json.dumps(forged).encode()
    other_raw = json.dumps(dict(manifest, cluster_id="00000000-another-cluster")).encode()
    other_sig = snapshot.sign_manifest(addr, backup_token, other_raw).encode()
    cases = [
        (rebuilt(forged_raw, None, altered), "not signed"),
        (rebuilt(forged_raw, contents["manifest.sig"], altered), "not signed by this appliance"),
        (rebuilt(other_raw, other_sig, members), "another OpenBao cluster"),
    ]
    for path, why in cases:
        refused = operated.cli(
            "restore",
            str(path),
            "--identity",
            str(operated.identity_file),
            stdin=operated.shares_json(),
        )
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    assert all(v["state"] == "running" for v in stack.status(operated.state)["services"].values())


def test_restore_aborts_when_a_service_is_not_down(operated: Operated, tmp_path: Path) -> None:
    """Finding H3: a process still holding the audit log when the services should be down
    (as under a service manager the restore did not know) stops the restore before any
    change; the services run again."""
    out = tmp_path / "h3.age"
    assert operated.cli("backup", "--out", str(out)).returncode == 0
    s = operated.as_stack()
    later = s.add_client("after-h3", ("add",))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'a'); sys.stdin.read()",
            str(operated.state / "audit" / "audit.jsonl"),
        ],
        stdin=subprocess.PIPE,
    )
    try:
        refused = operated.cli(
            "restore",
            str(out),
            "--identity",
            str(operated.identity_file),
            stdin=operated.shares_json(),
        )
    finally:
        holder.communicate(b"", timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert f"{holder.pid}" in refused.stderr and "nothing was changed" in refused.stderr
    s = operated.as_stack()
    stack._wait_ready(operated.state, stack.load_ports(operated.state), 60)
    assert s.registry().read("after-h3")
    assert _run_add(s, 2, 2, "after-h3", later) == 4
    assert not (operated.state / "audit-replaced").exists() or all(
        p.stat().st_mtime < out.stat().st_mtime
        for p in (operated.state / "audit-replaced").iterdir()
    )


def test_service_manager_is_asked_of_the_host(
    operated: Operated, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("APPLIANCE_SERVICE_MANAGER", raising=False)
    expected = "systemd" if Path("/run/systemd/system").is_dir() else "pid-files"
    if expected == "systemd":
        expected = maintenance.service_manager(operated.state)
    assert maintenance.service_manager(operated.state) == expected
    monkeypatch.setenv("APPLIANCE_SERVICE_MANAGER", "systemd")
    assert maintenance.service_manager(operated.state) == "systemd"
    monkeypatch.setenv("APPLIANCE_SERVICE_MANAGER", "bogus")
    with pytest.raises(StackError):
        maintenance.service_manager(operated.state)


def test_upgrade_records_refuses_downgrade_and_backs_up_first(
    operated: Operated, tmp_path: Path
) -> None:
    # A new (empty) state is stamped with this code's version.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    first = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "--state", str(fresh), "upgrade"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0 and json.loads(first.stdout)["action"] == "new", first.stderr
    assert json.loads((fresh / "version.json").read_text())["version"] == __version__
    # A state holding OpenBao data but no version.json is of unknown version: refused, and not
    # stamped (red team L3: stamping it with this code's version let any downgrade pass).
    version_file = operated.state / "version.json"
    version_file.unlink(missing_ok=True)
    unknown = operated.cli("upgrade")
    assert unknown.returncode == 1 and "version is unknown" in unknown.stderr, unknown.stderr
    assert not version_file.exists()
    version_file.write_text(json.dumps({"version": __version__}))  # What the refusal asks for.
    assert json.loads(operated.cli("upgrade").stdout)["action"] == "same"
    version_file.write_text(json.dumps({"version": "999.0.0"}))
    refused = operated.cli("upgrade")
    assert refused.returncode == 1 and "downgrade is refused" in refused.stderr, refused.stderr
    version_file.write_text(json.dumps({"version": "0.0.1"}))
    # While OpenBao serves the state, an upgrade (and so its --check) is refused.
    for args in (("upgrade", "--check"), ("upgrade",)):
        running = operated.cli(*args)
        assert running.returncode == 1 and "appliance down" in running.stderr, running.stderr
        assert not list(operated.state.glob("backups/pre-upgrade-*"))
    assert operated.cli("down").returncode == 0
    assert json.loads(operated.cli("upgrade", "--check").stdout)["action"] == "upgrade"
    done = operated.cli("upgrade")
    assert done.returncode == 0, done.stderr
    backup = Path(json.loads(done.stdout)["backup"])
    assert backup.parent == operated.state / "backups" and "pre-upgrade-0.0.1-" in backup.name
    plain = pyrage.decrypt(backup.read_bytes(), [operated.identity])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest["kind"] == "offline" and manifest["appliance_version"] == "0.0.1"
    assert any(n.startswith("bao/data/") for n in names) and "audit/audit.jsonl" in names
    assert not any(
        n.startswith(("secrets/", "run/")) or n.endswith(".key") and n.startswith("tls/")
        for n in names
    )
    assert json.loads(version_file.read_text())["version"] == __version__
    # The operator-held seal holds after all of it: still no share on disk.
    needles = [k.encode() for k in operated.shares["keys"]]
    for path in _files_under(operated.state):
        assert not any(n in path.read_bytes() for n in needles), path
