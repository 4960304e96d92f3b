"""Degraded mode: a layer the policy lets go shows in every outcome; a required one stops all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sandbox._cli as cli
import sandbox._isolation as isolation
from sandbox import IsolationUnavailable, Policy, Sandbox
from sandbox._cli import EXIT_NO_ISOLATION, main
from sandbox._client import _BOOT
from sandbox._request import prepare
from sandbox._supervisor import Supervisor

pytestmark = pytest.mark.timeout(120)

BUNDLED = Path(__file__).resolve().parents[3] / "policies" / "sandbox.json"


def _policy_file(tmp_path: Path, degraded: list[str]) -> Path:
    raw = json.loads(BUNDLED.read_text())
    iso = raw["isolation"]
    iso["required_layers"] = [layer for layer in iso["required_layers"] if layer not in degraded]
    iso["degraded_layers"] = degraded
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(raw))
    return path


_REFUSE_NETNS = """
import sandbox._isolation as isolation
def _refuse(setup):
    raise OSError(1, "forced failure for the test")
isolation._netns = _refuse
"""


class _NetnsFailsSandbox(Sandbox):
    """A fork server in which the network-namespace layer fails in every child."""

    _boot = _BOOT + _REFUSE_NETNS + "from sandbox._server import main; main(policy)"


@pytest.fixture
def netns_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the network-namespace layer fail in every child forked here or by the CLI's server."""

    def refuse(setup: isolation.ChildSetup) -> None:
        raise OSError(1, "forced failure for the test")

    monkeypatch.setattr(isolation, "_netns", refuse)
    monkeypatch.setattr(cli, "Sandbox", _NetnsFailsSandbox)


@pytest.fixture
def runs_started(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records every request handed to a child in this process."""
    started: list[bool] = []
    dispatch = Supervisor._dispatch

    def spy(self: Supervisor, child, run):  # type: ignore[no-untyped-def]
        started.append(True)
        return dispatch(self, child, run)

    monkeypatch.setattr(Supervisor, "_dispatch", spy)
    return started


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text("def f():\n    return 'ran'\n")
    return path


def test_degraded_layer_is_listed_in_every_outcome(tmp_path, netns_fails, job, capsys):
    policy = _policy_file(tmp_path, ["netns"])
    assert main(["--policy", str(policy), "run", "--source", str(job), "--entry", "f"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["status"] == "ok" and outcome["value"] == "ran"
    assert outcome["degraded"] == ["netns"]


def test_degraded_supervisor_reports_the_reason(tmp_path, netns_fails):
    policy = Policy.load(_policy_file(tmp_path, ["netns"]))
    supervisor = Supervisor(policy)
    try:
        assert supervisor.layers["netns"]  # a reason, not ""
        assert supervisor.unavailable == []
        outcome = supervisor.run(prepare(policy, "def f():\n    return 1\n", "f"))
    finally:
        supervisor.close()
    assert outcome.status == "ok" and outcome.degraded == ("netns",)


def test_missing_required_layer_exits_3_and_runs_nothing(netns_fails, job, capsys):
    code = main(["--policy", str(BUNDLED), "run", "--source", str(job), "--entry", "f"])
    assert code == EXIT_NO_ISOLATION
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "netns" in captured.err and "nothing was run" in captured.err


def test_missing_required_layer_fails_every_run_of_a_supervisor(netns_fails, runs_started):
    policy = Policy.load(BUNDLED)
    supervisor = Supervisor(policy)
    try:
        assert supervisor.unavailable == ["netns"]
        with pytest.raises(IsolationUnavailable, match="netns"):
            supervisor.run(prepare(policy, "def f():\n    return 1\n", "f"))
        supervisor.prepare_next()
    finally:
        supervisor.close()
    assert runs_started == []


def test_doctor_exits_non_zero_when_a_required_layer_is_missing(netns_fails, capsys):
    assert main(["--policy", str(BUNDLED), "doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["layers"]["netns"]["active"] is False
    assert report["layers"]["seccomp"]["active"] is True


def test_a_layer_failing_after_the_probe_stops_the_run(tmp_path, monkeypatch):
    # The probe passed, but the layer fails in the child that was to run the code: nothing runs.
    policy = Policy.load(BUNDLED)
    supervisor = Supervisor(policy)
    try:
        monkeypatch.setattr(
            isolation, "_workdir", lambda setup: (_ for _ in ()).throw(OSError(1, "forced"))
        )
        with pytest.raises(IsolationUnavailable, match="workdir"):
            supervisor.run(prepare(policy, "def f():\n    return 1\n", "f"))
    finally:
        supervisor.close()
