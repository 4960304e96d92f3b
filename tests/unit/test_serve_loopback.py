"""`appliance serve` never puts a plaintext channel on the network (red team L2, issue 15): the
API off loopback only over TLS, OpenBao and Redis on loopback only, whatever the site's
APPLIANCE_* settings say. Bad settings are usage errors (exit 2) and nothing runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import stack
from appliance._stack import StackError

PORTS = {"redis": 0, "bao": 0, "api": 0, "flower": 0, "metrics": 0}


@pytest.fixture
def plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A prepared state whose API has no TLS."""
    monkeypatch.delenv("APPLIANCE_API_TLS", raising=False)
    state = tmp_path / "plain"
    stack.prepare(state, PORTS)
    assert not stack.load_api_tls(state).enabled
    return state


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A prepared state whose API serves HTTPS."""
    monkeypatch.setenv("APPLIANCE_API_TLS", "1")
    state = tmp_path / "tls"
    stack.prepare(state, PORTS)
    assert stack.load_api_tls(state).enabled
    return state


def _host_of(command: stack.Command) -> str:
    return command.argv[command.argv.index("--host") + 1]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::", "api.example", "localhost"])
def test_api_off_loopback_without_tls_is_refused(plain: Path, host: str) -> None:
    with pytest.raises(StackError, match="no TLS"):
        stack.serve_command(plain, "api", {"APPLIANCE_API_HOST": host})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1"])
def test_api_on_loopback_without_tls_is_served(plain: Path, host: str) -> None:
    command = stack.serve_command(plain, "api", {"APPLIANCE_API_HOST": host})
    assert _host_of(command) == host
    assert "--tls-cert" not in command.argv


def test_api_off_loopback_with_tls_is_served(tls: Path) -> None:
    command = stack.serve_command(tls, "api", {"APPLIANCE_API_HOST": "0.0.0.0"})
    assert _host_of(command) == "0.0.0.0"
    assert "--tls-cert" in command.argv and "--tls-key" in command.argv


def test_the_compose_pod_says_plain_http_on_its_own_interface(plain: Path) -> None:
    # docker-compose.yml: the API on the pod's interface, published on the host's loopback.
    overrides = {"APPLIANCE_API_HOST": "0.0.0.0", "APPLIANCE_API_PLAINTEXT_IN_POD": "1"}
    command = stack.serve_command(plain, "api", overrides)
    assert _host_of(command) == "0.0.0.0"
    for other in ("0", "yes", "true", ""):
        with pytest.raises(StackError, match="off loopback"):
            stack.serve_command(
                plain,
                "api",
                {"APPLIANCE_API_HOST": "0.0.0.0", "APPLIANCE_API_PLAINTEXT_IN_POD": other},
            )


@pytest.mark.parametrize("service", stack.SERVABLE)
@pytest.mark.parametrize(
    "addr", ["http://192.0.2.7:8200", "http://bao.example:8200", "http://0.0.0.0:8200", "junk"]
)
def test_openbao_off_loopback_is_refused_for_every_service(
    tls: Path, service: str, addr: str
) -> None:
    with pytest.raises(StackError, match="APPLIANCE_VAULT_ADDR.*not on loopback"):
        stack.serve_command(tls, service, {"APPLIANCE_VAULT_ADDR": addr})


@pytest.mark.parametrize("service", stack.SERVABLE)
@pytest.mark.parametrize("host", ["192.0.2.7", "redis.example", "0.0.0.0", ""])
def test_redis_off_loopback_is_refused_for_every_service(
    tls: Path, service: str, host: str
) -> None:
    with pytest.raises(StackError, match="APPLIANCE_REDIS_HOST.*not on loopback"):
        stack.serve_command(tls, service, {"APPLIANCE_REDIS_HOST": host})


def test_loopback_addresses_of_openbao_and_redis_are_served(plain: Path) -> None:
    overrides = {"APPLIANCE_VAULT_ADDR": "http://127.0.0.1:18299", "APPLIANCE_REDIS_HOST": "::1"}
    command = stack.serve_command(plain, "api", overrides)
    assert command.env["APPLIANCE_VAULT_ADDR"] == "http://127.0.0.1:18299"
    assert command.env["APPLIANCE_REDIS_HOST"] == "::1"


def test_the_cli_exits_2_and_runs_nothing(plain: Path) -> None:
    # In a child process: were the check gone, `serve` would exec the API (on loopback here)
    # in place of the test; the timeout ends it then.
    env = {**os.environ, "APPLIANCE_REDIS_HOST": "192.0.2.7"}
    refused = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "--state", str(plain), "serve", "api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "APPLIANCE_REDIS_HOST='192.0.2.7' is not on loopback" in refused.stderr
