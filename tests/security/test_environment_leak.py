"""The parent's environment (credentials, tokens) must never reach a child or an outcome."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import Policy
from sandbox._request import prepare
from sandbox._testing import UnsafeRawSupervisor

from .conftest import CANARY_NAME, CANARY_VALUE, assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(60)

READ_ENVIRONMENT = (
    "import os\n"
    "def f():\n"
    "    found = {'environ': dict(os.environ)}\n"
    "    for path in ('/proc/self/environ', '/proc/1/environ'):\n"
    "        try:\n"
    "            found[path] = open(path, 'rb').read().decode('latin-1')\n"
    "        except OSError as exc:\n"
    "            found[path] = type(exc).__name__\n"
    "    return found\n"
)


def test_restricted_code_has_no_route_to_the_environment(sb):
    outcome = attempt(sb, "def f():\n    import os\n    return dict(os.environ)\n")
    assert_status(outcome, "denied", "PolicyViolation")


def test_raw_child_of_the_fork_server_sees_an_empty_environment(raw):
    outcome = attempt_raw(raw, READ_ENVIRONMENT)
    assert_status(outcome, "ok")
    assert outcome.value == {
        "environ": {},
        "/proc/self/environ": "FileNotFoundError",
        "/proc/1/environ": "FileNotFoundError",
    }


def test_raw_child_forked_straight_from_a_process_holding_the_canary(monkeypatch):
    # The `sandbox run` path: the child is forked from the very process that holds the secret.
    assert os.environ[CANARY_NAME] == CANARY_VALUE
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_VALUE)
    policy = Policy.load()
    supervisor = UnsafeRawSupervisor(policy)
    try:
        outcome = supervisor.run(prepare(policy, READ_ENVIRONMENT, "f"))
    finally:
        supervisor.close()
    assert_status(outcome, "ok")
    assert outcome.value["environ"] == {}
    assert CANARY_VALUE not in json.dumps(outcome.to_dict())


def test_cli_outcome_never_carries_the_callers_environment(tmp_path: Path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    return [str(x) for x in (1, 2)]\n")
    env = {**os.environ, CANARY_NAME: CANARY_VALUE}
    done = subprocess.run(
        [sys.executable, "-m", "sandbox", "run", "--source", str(source), "--entry", "f"],
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "ok"
    assert CANARY_VALUE.encode() not in done.stdout + done.stderr


# Reads the strings the kernel put on the initial stack, which every forked child inherits:
# from argv[0] (program_invocation_name) up to the executable's path (AT_EXECFN), that is the
# command line and the environment the process was started with. os.environ.clear() leaves them.
READ_INITIAL_STACK = """
import ctypes
def f():
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    start = ctypes.c_void_p.in_dll(libc, "program_invocation_name").value
    end = libc.getauxval(31)
    return ctypes.string_at(start, end - start + 1).decode("latin-1")
"""


def _unsafe_cli_run(source: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """`sandbox run --unsafe-raw-code` of `source`'s `f`, in a fresh process with `env`."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sandbox",
            "run",
            "--unsafe-raw-code",
            "--source",
            str(source),
            "--entry",
            "f",
        ],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_children_carry_no_environment_or_host_path_on_their_stack(tmp_path: Path):
    # Through the CLI's unsafe hook: the compile layer is off, every OS layer on, as an
    # attacker who has beaten RestrictedPython on the `sandbox run` path would be.
    source = tmp_path / "stack_probe.py"
    source.write_text(READ_INITIAL_STACK)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "SANDBOX_UNSAFE_TESTING": "1",
        CANARY_NAME: CANARY_VALUE,
        "AWS_SECRET_ACCESS_KEY": CANARY_VALUE,
    }
    done = _unsafe_cli_run(source, env)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["status"] == "ok", outcome
    stack = outcome["value"]
    assert len(stack) > 0
    assert CANARY_VALUE not in stack
    for host_path in (str(tmp_path), str(Path(sys.executable).parent), "PATH="):
        assert host_path not in stack, host_path


def test_the_cli_unsafe_hook_is_refused_without_the_test_switch(tmp_path: Path):
    source = tmp_path / "f.py"
    source.write_text("def f():\n    return 1\n")
    env = {k: v for k, v in os.environ.items() if k != "SANDBOX_UNSAFE_TESTING"}
    done = _unsafe_cli_run(source, env)
    assert done.returncode == 2
    assert done.stdout == b"" and b"test suite only" in done.stderr
