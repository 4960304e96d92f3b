"""The VM image's day-2 commands (issue 15) on a real stack whose seal is the operator's:
`up --shares-to` (as `init --shares-to` on the image), a restart that leaves OpenBao sealed,
`unseal` (malformed, wrong, right shares), `backup` and `restore`, `upgrade`. Real Redis,
OpenBao, Celery worker and API; the operator's age identity is made by the test and never
given to the stack.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage
import pytest
from pyrage import x25519

from appliance import __version__, stack
from appliance._stack import seal_status
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
        yield Operated(state, identity, identity_file, recipient_file, shares, block)
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


def test_upgrade_records_refuses_downgrade_and_backs_up_first(operated: Operated) -> None:
    version_file = operated.state / "version.json"
    version_file.unlink(missing_ok=True)
    first = operated.cli("upgrade")
    assert first.returncode == 0 and json.loads(first.stdout)["action"] == "new", first.stderr
    assert json.loads(version_file.read_text())["version"] == __version__
    assert json.loads(operated.cli("upgrade").stdout)["action"] == "same"
    version_file.write_text(json.dumps({"version": "999.0.0"}))
    refused = operated.cli("upgrade")
    assert refused.returncode == 1 and "downgrade is refused" in refused.stderr, refused.stderr
    version_file.write_text(json.dumps({"version": "0.0.1"}))
    assert json.loads(operated.cli("upgrade", "--check").stdout)["action"] == "upgrade"
    running = operated.cli("upgrade")
    assert running.returncode == 1 and "appliance down" in running.stderr
    assert operated.cli("down").returncode == 0
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
