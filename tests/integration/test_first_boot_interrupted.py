"""A first boot stopped half-way (red team M4, issue 15): `up --shares-to` gets a SIGTERM (a
unit's start timeout) right after OpenBao was initialised. The unseal shares must not be lost
and the initial root token must not outlive the process. Real Redis, OpenBao and stack; the
operator's age identity is made by the test and never given to the stack.

That no root token is left is checked the way a recovery operator would: OpenBao is restarted
with the unauthenticated generate-root endpoints on, a root token is made from the decrypted
shares, and every token's accessor is looked up.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import pyrage
import pytest
from pyrage import x25519

from appliance import stack
from appliance._stack import (
    Shares,
    openbao_addr,
    openbao_argv,
    openbao_env,
    seal_status,
    start_detached,
    stop_openbao,
    submit_shares,
)
from appliance._stack.openbao import _wait_unsealed as wait_unsealed
from appliance._stack.openbao import bao_dir
from appliance._stack.seal import BEGIN_MARK, END_MARK

FREE = ("--redis-port", "0", "--bao-port", "0", "--api-port", "0", "--flower-port", "0")
SEALED = "OpenBao is sealed: run `appliance unseal`"


@dataclass
class Interrupted:
    """A state whose first `up --shares-to` was stopped by SIGTERM after the initialisation."""

    state: Path
    identity: Any
    killed: subprocess.CompletedProcess[str]

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", "--state", str(self.state), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
        )

    @property
    def kept(self) -> Path:
        return self.state / "unseal-shares.age"

    def shares(self) -> dict[str, Any]:
        return _decrypt_block(self.kept.read_text(), self.identity)


def _decrypt_block(text: str, identity: Any) -> dict[str, Any]:
    start, end = text.index(BEGIN_MARK), text.index(END_MARK)
    armored = text[start + len(BEGIN_MARK) : end].strip()
    assert armored.startswith("-----BEGIN AGE ENCRYPTED FILE-----")
    shares: dict[str, Any] = json.loads(pyrage.decrypt(armored.encode(), [identity]))
    return shares


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "up ended before it initialised OpenBao"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Interrupted]:
    base = tmp_path_factory.mktemp("interrupted")
    base.chmod(0o711)
    identity = x25519.Identity.generate()
    recipient_file = base / "operator.pub"
    recipient_file.write_text(f"{identity.to_public()}\n")
    state = base / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "--state", str(state), "up", *FREE]
        + ["--metrics-port", "0", "--shares-to", str(recipient_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # `operator-recipient` is written once OpenBao is initialised: stop `up` right there.
        _wait_for(state / "operator-recipient", proc, 180)
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=120)
        killed = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        yield Interrupted(state, identity, killed)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stack.down(state)
        stop_openbao(state)


def _forensic_root_token(state: Path, shares: Shares) -> str:
    """Restart OpenBao with the unauthenticated generate-root endpoints on, unseal it and make
    a root token from the shares alone (no other token is needed, none may exist)."""
    stop_openbao(state)
    config = bao_dir(state) / "config.hcl"
    listener = "  tls_disable = true\n"
    text = config.read_text()
    assert listener in text
    # A listener's setting; `up` writes the stack's own configuration back.
    config.write_text(
        text.replace(listener, listener + "  disable_unauthed_generate_root_endpoints = false\n")
    )
    addr = openbao_addr(state)
    port = int(addr.rsplit(":", 1)[1])
    pid = start_detached(
        openbao_argv(state),
        log_file=bao_dir(state) / "bao.log",
        pid_file=bao_dir(state) / "bao.pid",
        env=openbao_env(state),
        cwd=bao_dir(state),
    )
    stack._stack.wait_for_port("127.0.0.1", port, pid=pid, timeout=60)
    submit_shares(addr, shares)
    wait_unsealed(addr, 60)
    client = hvac.Client(url=addr, timeout=10)
    attempt = client.adapter.put("/v1/sys/generate-root/attempt", json={})
    answer: dict[str, Any] = {}
    for key in shares.quorum():
        answer = client.adapter.put(
            "/v1/sys/generate-root/update", json={"key": key, "nonce": attempt["nonce"]}
        )
    assert answer["complete"], answer
    encoded = answer["encoded_token"]
    raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4))
    return bytes(a ^ b for a, b in zip(raw, attempt["otp"].encode(), strict=True)).decode()


def test_sigterm_prints_the_block_and_keeps_it_encrypted(interrupted: Interrupted) -> None:
    killed = interrupted.killed
    assert killed.returncode == 143, killed.stderr
    assert interrupted.kept.is_file()
    assert interrupted.kept.stat().st_mode & 0o777 == 0o600
    block = interrupted.kept.read_text()
    assert block.startswith(BEGIN_MARK) and block.rstrip().endswith(END_MARK)
    # The block went to stdout on the way out, though `up` never finished.
    assert block in killed.stdout
    shares = interrupted.shares()
    assert shares["threshold"] == 3 and len(shares["keys"]) == 5
    # Ciphertext only: no share, in base64 or raw, in any file of the state.
    needles = [k.encode() for k in shares["keys"]]
    needles += [base64.b64decode(k) for k in shares["keys"]]
    for path in interrupted.state.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert not any(needle in data for needle in needles), path


def test_shares_show_prints_the_kept_block(interrupted: Interrupted) -> None:
    shown = interrupted.cli("shares", "show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == interrupted.kept.read_text()


def test_no_root_token_outlives_the_stopped_up(interrupted: Interrupted) -> None:
    shares = interrupted.shares()
    ours = _forensic_root_token(interrupted.state, Shares(tuple(shares["keys"]), 3))
    client = hvac.Client(url=openbao_addr(interrupted.state), token=ours, timeout=10)
    accessors = client.adapter.list("/v1/auth/token/accessors")["data"]["keys"]
    roots = []
    for accessor in accessors:
        found = client.adapter.post("/v1/auth/token/lookup-accessor", json={"accessor": accessor})[
            "data"
        ]
        if "root" in found["policies"]:
            roots.append(found)
    own = client.auth.token.lookup_self()["data"]["accessor"]
    assert [found["accessor"] for found in roots] == [own], roots
    client.auth.token.revoke_self()
    stop_openbao(interrupted.state)  # Sealed again at its next start.


def test_init_and_up_on_a_sealed_state_print_the_kept_block(interrupted: Interrupted) -> None:
    block = interrupted.kept.read_text()
    started = interrupted.cli("up")  # Restarts OpenBao with its own configuration: sealed.
    assert started.returncode == 1 and SEALED in started.stderr, started.stderr
    assert seal_status(openbao_addr(interrupted.state)).sealed
    assert block in started.stdout
    again = interrupted.cli("init", "--timeout", "20")
    assert again.returncode == 1 and SEALED in again.stderr, again.stderr
    assert block in again.stdout


def test_shares_ack_deletes_the_block_once_confirmed(interrupted: Interrupted) -> None:
    declined = interrupted.cli("shares", "ack", stdin="n\n")
    assert declined.returncode == 1, declined.stderr
    assert interrupted.kept.is_file()
    acked = interrupted.cli("shares", "ack", stdin="y\n")
    assert acked.returncode == 0, acked.stderr
    assert not interrupted.kept.exists()
    nothing = interrupted.cli("shares", "ack", "--yes")
    assert nothing.returncode == 2 and "nothing to acknowledge" in nothing.stderr
    shown = interrupted.cli("shares", "show")
    assert shown.returncode == 2 and "no unseal shares are kept" in shown.stderr
    assert BEGIN_MARK not in interrupted.cli("init", "--timeout", "20").stdout
