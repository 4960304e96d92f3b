"""`appliance serve redis` with APPLIANCE_REDIS_APPENDONLY (issue 14: Redis on a volume): what
Redis accepted survives its restart; without the setting, nothing does (the single-host stack)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import stack
from appliance._stack import Pki, RedisHandle, wait_for_port


def _serve_redis(state: Path, appendonly: bool) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    if appendonly:
        env["APPLIANCE_REDIS_APPENDONLY"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "--state", str(state), "serve", "redis"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", stack.load_ports(state).redis, pid=proc.pid, timeout=30)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


@pytest.mark.parametrize("appendonly", [True, False])
def test_an_accepted_write_survives_a_restart_only_with_appendonly(
    tmp_path: Path, appendonly: bool
) -> None:
    tmp_path.chmod(0o711)
    state = tmp_path / "state"
    stack.prepare(state, {"redis": 0, "bao": 0, "api": 0, "flower": 0, "metrics": 0})
    redis = RedisHandle("127.0.0.1", stack.load_ports(state).redis, 0, state, Pki(state / "tls"))
    proc = _serve_redis(state, appendonly)
    try:
        with redis.client("admin") as admin:
            admin.set("job:persisted", "accepted")
        _stop(proc)
        proc = _serve_redis(state, appendonly)
        with redis.client("admin") as admin:
            found = admin.get("job:persisted")
    finally:
        _stop(proc)
    assert found == (b"accepted" if appendonly else None)
