"""`appliance prepare|init --export`: each service's tree holds its own files and nothing else
(the compose stack mounts it instead of the whole `tls/` and `secrets/`, issue 14)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import _stack, stack
from appliance.cli import main

#: Root's alone: never in any service's export.
ROOT_ONLY = {
    "ca.key",
    "client-admin.crt",
    "client-admin.key",
    "bao-unseal.json",
    "bao-operator.token",
    "redis-admin.pass",
    "redis-vault.pass",
}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state with every file `prepare` and `init` leave in `tls/` and `secrets/`."""
    state = tmp_path / "state"
    (state / "tls").mkdir(parents=True, mode=0o711)
    (state / "secrets").mkdir(mode=0o711)
    _stack.ensure_pki(state / "tls")
    os.chmod(state / "tls", 0o711)
    for name in ("bao-unseal.json", "bao-operator.token", "metrics.token", "enrol-worker.json"):
        _stack.write_private(state / "secrets" / name, name.encode())
    for role in ("admin", "vault", "flower", "worker", "api"):
        _stack.write_private(_stack.password_file(state, role), role.encode())
    (state / "stack.json").write_text(json.dumps({"ports": stack.DEFAULT_PORTS}))
    return state


def _tree(root: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in root.iterdir()}


def test_each_service_gets_only_its_own_files(state: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    stack.export_service_files(state, ("redis", *stack.SERVICES), export)
    tls_common = {"ca.crt"}
    assert _tree(export / "redis") == {
        "tls": tls_common | {"server.crt", "server.key", "client-vault.crt", "client-vault.key"}
    }
    assert _tree(export / "api") == {
        "tls": tls_common | {"client-api.crt", "client-api.key"},
        "secrets": {"metrics.token"},
    }
    assert _tree(export / "worker") == {
        "tls": tls_common | {"client-worker.crt", "client-worker.key"},
        "secrets": {"metrics.token", "enrol-worker.json"},
    }
    assert _tree(export / "flower") == {
        "tls": tls_common | {"client-flower.crt", "client-flower.key"},
        "secrets": {"redis-flower.pass"},
    }
    for service in export.iterdir():
        for directory in service.iterdir():
            assert not {f.name for f in directory.iterdir()} & ROOT_ONLY
            assert directory.stat().st_mode & 0o777 == 0o711
            for copy in directory.iterdir():
                original = state / directory.name / copy.name
                assert copy.read_bytes() == original.read_bytes()
                assert copy.stat().st_mode == original.stat().st_mode
                assert copy.stat().st_uid == original.stat().st_uid


def test_a_second_export_removes_what_is_no_longer_the_services(
    state: Path, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    stale = export / "api" / "secrets" / "bao-operator.token"
    stale.parent.mkdir(parents=True)
    stale.write_text("left by hand")
    (export / "api" / "secrets" / "old").mkdir()
    stack.export_service_files(state, ("api",), export)
    assert _tree(export / "api")["secrets"] == {"metrics.token"}


def test_the_cli_exports_through_prepare(tmp_path: Path) -> None:
    state, export = tmp_path / "state", tmp_path / "export"
    result = CliRunner().invoke(
        main, ["prepare", "--state", str(state), "--export", str(export), "--redis-port", "0"]
    )
    assert result.exit_code == 0, result.output
    assert set(_tree(export)) == {"redis"}
    assert "ca.key" not in _tree(export / "redis")["tls"]


def test_an_unknown_service_is_refused(state: Path, tmp_path: Path) -> None:
    with pytest.raises(_stack.StackError):
        stack.export_service_files(state, ("openbao",), tmp_path / "export")


def test_each_worker_replica_is_a_celery_node_of_its_own(state: Path) -> None:
    ports = stack.load_ports(state)
    argv = stack._argv("worker", ports, state, {}, replica="worker-abc123")
    assert argv[argv.index("-n") + 1] == "worker-abc123@%h"
    argv = stack._argv("worker", ports, state, {})
    assert argv[argv.index("-n") + 1] == f"worker-{ports.api}@%h"
