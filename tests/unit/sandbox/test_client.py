"""`Sandbox`, the caller's handle on its fork server: refusals, restarts, interruptions.

The fork server checks every request against its own policy, whatever the caller's copy says,
and a caller that is interrupted half-way never reads one call's answer as another's.
"""

from __future__ import annotations

import dataclasses

import pytest

from sandbox import InvalidRequest, LimitNotAllowed, Sandbox
from sandbox._framing import MAX_FRAME

pytestmark = pytest.mark.timeout(60)

TRIVIAL = "def f(x):\n    return x * 2\n"


@pytest.fixture
def box():
    with Sandbox() as sandbox:
        yield sandbox


def test_the_server_refuses_an_import_its_policy_never_allows_whatever_the_caller_says(box):
    # A caller with an out-of-date copy of the policy (the operator changed the file and the
    # server was restarted with it), or a wrong one, cannot have a child import `os`.
    box.policy = dataclasses.replace(
        box.policy, importable=box.policy.importable | {"os"}, never=box.policy.never - {"os"}
    )
    with pytest.raises(InvalidRequest, match="os"):
        box.run("import os\ndef f():\n    return os.getpid()\n", "f", allow_imports=["os"])
    assert box.run(TRIVIAL, "f", [4]).value == 8


def test_the_server_refuses_limits_above_its_own_maxima(box):
    maxima = dataclasses.replace(box.policy.maxima, cpu_seconds=10_000)
    box.policy = dataclasses.replace(box.policy, maxima=maxima)
    with pytest.raises(LimitNotAllowed, match="cpu_seconds"):
        box.run(TRIVIAL, "f", [1], limits={"cpu_seconds": 5_000})
    assert box.run(TRIVIAL, "f", [4]).value == 8


def test_a_request_too_large_for_the_server_is_refused_before_anything_runs(box):
    with pytest.raises(InvalidRequest, match="larger than"):
        box.run(TRIVIAL, "f", ["x" * (MAX_FRAME + 1)])
    assert box.run(TRIVIAL, "f", [2]).value == 4


def test_a_server_that_died_between_runs_is_started_again(box):
    assert box.run(TRIVIAL, "f", [1]).value == 2
    assert box._proc is not None
    old = box._proc
    old.kill()
    old.wait()
    outcome = box.run(TRIVIAL, "f", [21])
    assert outcome.status == "ok" and outcome.value == 42
    assert box._proc is not None and box._proc.pid != old.pid


def test_an_interrupted_call_never_hands_its_answer_to_the_next_one(box, monkeypatch):
    import sandbox._client as client_module

    real = client_module.read_frame
    calls = {"n": 0}

    def interrupted(fd: int) -> bytes | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(fd)

    monkeypatch.setattr(client_module, "read_frame", interrupted)
    with pytest.raises(KeyboardInterrupt):
        box.run(TRIVIAL, "f", [1])
    assert box.run(TRIVIAL, "f", [2]).value == 4  # not the first call's answer (2)
    assert box.run(TRIVIAL, "f", [3]).value == 6
