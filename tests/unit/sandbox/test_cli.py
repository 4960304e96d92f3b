"""`sandbox run` and `sandbox doctor` exit codes: 0 outcome, 2 usage, 3 no isolation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox._cli import EXIT_USAGE, main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text("def f(x, y=1):\n    return x * y\ndef boom():\n    raise ValueError('no')\n")
    return path


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


def test_run_prints_one_outcome_and_exits_0(source):
    done = _cli(
        "run",
        "--source",
        str(source),
        "--entry",
        "f",
        "--args",
        "[21]",
        "--kwargs",
        '{"y": 2}',
        "--limits",
        '{"cpu_seconds": 2}',
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["status"] == "ok" and outcome["value"] == 42
    assert set(outcome) == {"status", "value", "stdout", "error", "usage"}
    assert done.stdout.count("\n") == 1


def test_source_from_stdin(source):
    done = _cli("run", "--source", "-", "--entry", "f", "--args", "[2]", stdin=source.read_text())
    assert done.returncode == 0 and json.loads(done.stdout)["value"] == 2


def test_user_code_failure_is_still_exit_0(source, capsys):
    assert main(["run", "--source", str(source), "--entry", "boom"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["status"] == "runtime_error"
    assert outcome["error"] == {"type": "ValueError", "message": "no"}


def test_allow_import_of_a_never_module_is_a_usage_error_naming_it(source):
    done = _cli(
        "run", "--source", str(source), "--entry", "f", "--args", "[1]", "--allow-import", "os"
    )
    assert done.returncode == EXIT_USAGE
    assert "os" in done.stderr and "never allowed" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--allow-import", "csv"], "csv"),
        (["--allow-import", "math", "--allow-import", "subprocess"], "subprocess"),
        (["--args", "[1,"], "--args is not valid JSON"),
        (["--args", '{"x": 1}'], "args must be a JSON list"),
        (["--args", "[NaN]"], "not JSON"),
        (["--kwargs", "{nope}"], "--kwargs is not valid JSON"),
        (["--kwargs", "[1]"], "kwargs must be"),
        (["--limits", "{"], "--limits is not valid JSON"),
        (["--limits", "[1]"], "limits must be a JSON object"),
        (["--limits", '{"cpu_seconds": 999}'], "exceeds the policy maximum"),
        (["--limits", '{"memory_mb": -1}'], "positive"),
        (["--limits", '{"gpu": 1}'], "unknown limit gpu"),
    ],
)
def test_usage_errors_exit_2_and_run_nothing(source, capsys, extra, needle):
    argv = ["run", "--source", str(source), "--entry", "f", "--args", "[1]", *extra]
    with pytest.raises(SystemExit) as exited:
        code = main(argv)
        raise SystemExit(code)
    assert exited.value.code == EXIT_USAGE
    captured = capsys.readouterr()
    assert needle in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--entry", "f"],
        ["run", "--source", "x.py"],
        ["fly"],
        [],
        ["run", "--source", "/nonexistent/job.py", "--entry", "f"],
        ["run", "--source", "{source}", "--entry", "not a name"],
    ],
)
def test_malformed_command_lines_exit_2(source, capsys, argv):
    argv = [a.replace("{source}", str(source)) for a in argv]
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(main(argv))
    assert exited.value.code == EXIT_USAGE
    assert capsys.readouterr().out == ""


def test_doctor_reports_every_layer_active_and_exits_0():
    done = _cli("doctor", "--json")
    assert done.returncode == 0, done.stdout
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert all(layer["active"] and layer["required"] for layer in report["layers"].values())
    text = _cli("doctor")
    assert text.returncode == 0 and "seccomp" in text.stdout
