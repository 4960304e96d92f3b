"""`appliance unseal` waits for OpenBao to answer before it submits a share (at the VM's boot the
unseal unit may start while OpenBao is still starting: six minutes were seen under emulation),
and says so when it never does. That it then unseals a real OpenBao is tests/integration/
test_day2.py's and the VM test's."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pyrage
import pytest

from appliance import maintenance
from appliance._stack import StackError
from appliance._stack.seal import parse_shares


def _state(tmp_path: Path, port: int) -> Path:
    """A state whose OpenBao (as `prepare` records it) is at `port`, where nothing listens."""
    (tmp_path / "stack.json").write_text(json.dumps({"ports": {"bao": port}, "unseal": "operator"}))
    (tmp_path / "operator-recipient").write_text(str(pyrage.x25519.Identity.generate().to_public()))
    (tmp_path / "bao").mkdir()
    (tmp_path / "bao" / "endpoint.json").write_text(
        json.dumps({"addr": f"http://127.0.0.1:{port}"})
    )
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unseal_gives_up_after_its_timeout_when_openbao_never_answers(tmp_path: Path) -> None:
    state = _state(tmp_path, _free_port())
    shares = parse_shares(b"c2hhcmUtb25l\nc2hhcmUtdHdv\n")
    started = time.monotonic()
    with pytest.raises(StackError, match="OpenBao"):
        maintenance.unseal(state, shares, reenrol=False, report=lambda _: None, timeout=2)
    # It waited for OpenBao to answer (a unit at boot may start before OpenBao listens), and
    # did not stop at the first refused connection.
    assert time.monotonic() - started >= 2
