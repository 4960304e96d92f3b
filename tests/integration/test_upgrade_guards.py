"""`appliance upgrade`'s guards (issue 15, red team L3): a state of unknown version is never
stamped with this image's, and no upgrade copies the raft files of a running OpenBao, however
it was started (systemd writes no pid file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance._stack import BaoHandle, StackError, free_port, upgrade


def test_a_state_with_openbao_data_but_no_version_is_refused(tmp_path: Path) -> None:
    assert upgrade.plan(tmp_path, "0.3.0").action == upgrade.NEW
    (tmp_path / "bao" / "data" / "raft").mkdir(parents=True)
    with pytest.raises(StackError, match="version is unknown"):
        upgrade.plan(tmp_path, "0.1.0")
    assert not upgrade.version_file(tmp_path).exists()  # Not stamped: no downgrade slips by.


def test_an_upgrade_is_refused_while_openbao_runs(
    stack_state: Path, openbao: BaoHandle, tmp_path: Path
) -> None:
    assert upgrade.openbao_running(stack_state)
    upgrade.record_version(stack_state, "0.0.1")
    try:
        with pytest.raises(StackError, match="OpenBao runs"):
            upgrade.plan(stack_state, "0.0.2")
    finally:
        upgrade.version_file(stack_state).unlink()
    # Its raft lock alone tells: the address recorded elsewhere answers nothing.
    copy = tmp_path / "copy"
    (copy / "bao").mkdir(parents=True)
    (copy / "bao" / "data").symlink_to(stack_state / "bao" / "data")
    (copy / "bao" / "endpoint.json").write_text(
        json.dumps({"addr": f"http://127.0.0.1:{free_port()}"})
    )
    assert upgrade.openbao_running(copy)
    (copy / "bao" / "data").unlink()
    assert not upgrade.openbao_running(copy)
