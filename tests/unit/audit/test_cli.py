"""`appliance audit verify` and `show` through click: exit codes, messages, filters."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from appliance.audit import UnsafeInMemorySigner, audit_cli, export_public_keys

from .helpers import paths, read_lines, write_lines, write_sample


@pytest.fixture
def state(tmp_path: Path) -> Path:
    log = tmp_path / "state" / "audit" / "audit.jsonl"
    signer = UnsafeInMemorySigner()
    export_public_keys(signer, paths(log).public_keys)
    write_sample(log, signer, 25)
    return tmp_path / "state"


def run(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(audit_cli, list(args), env=env)


def test_verify_exit_0_on_an_intact_log(state: Path) -> None:
    result = run("verify", "--state", str(state))
    assert result.exit_code == 0, result.output
    assert "27 entries, chain intact" in result.stdout
    assert "2 signed checkpoints verified, through seq 21" in result.stdout


def test_verify_exit_1_names_the_entry(state: Path) -> None:
    log = state / "audit" / "audit.jsonl"
    lines = read_lines(log)
    del lines[6]
    write_lines(log, lines)
    result = run("verify", "--log", str(log))
    assert result.exit_code == 1
    assert "removed: entry seq 7 is missing" in result.stderr


def test_verify_json(state: Path) -> None:
    log = state / "audit" / "audit.jsonl"
    ok = json.loads(run("verify", "--log", str(log), "--json").stdout)
    assert ok["ok"] is True and ok["entries"] == 27 and ok["unsigned"] == 5
    write_lines(log, read_lines(log)[:15])
    result = run("verify", "--log", str(log), "--json")
    failed = json.loads(result.stdout)
    assert result.exit_code == 1 and failed["ok"] is False and failed["kind"] == "truncated"


def test_verify_exit_2_on_usage_errors(state: Path, tmp_path: Path) -> None:
    assert run("verify", "--log", str(tmp_path / "nothing.jsonl")).exit_code == 2
    assert run("verify", "--state", str(state), "--bogus").exit_code == 2
    bad_keys = tmp_path / "keys.json"
    bad_keys.write_text("{not json")
    result = run("verify", "--state", str(state), "--public-keys", str(bad_keys))
    assert result.exit_code == 2 and "public keys" in result.stderr
    (state / "audit" / "audit-pubkeys.json").unlink()
    result = run("verify", "--state", str(state))
    assert result.exit_code == 2 and "--public-keys" in result.stderr


def test_state_from_the_environment_and_from_the_parent_group(state: Path) -> None:
    assert run("verify", env={"APPLIANCE_STATE": str(state)}).exit_code == 0

    @click.group()
    @click.option("--state")
    @click.pass_context
    def main(ctx: click.Context, state: str | None) -> None:
        ctx.ensure_object(dict)["state"] = state

    main.add_command(audit_cli)
    result = CliRunner().invoke(main, ["--state", str(state), "audit", "verify"])
    assert result.exit_code == 0, result.output


def test_show_json_filters(state: Path) -> None:
    result = run("show", "--state", str(state), "--json", "--client", "client1")
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and entries and {e["client"] for e in entries} == {"client1"}
    result = run("show", "--state", str(state), "--json", "--type", "checkpoint", "--since", "1h")
    assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == [11, 22]
    result = run("show", "--state", str(state), "--json", "--status", "rejected")
    assert result.stdout == ""
    result = run("show", "--state", str(state), "--function", "add", "--limit", "3")
    assert len(result.stdout.splitlines()) == 4


def test_show_usage_errors(state: Path, tmp_path: Path) -> None:
    assert run("show", "--state", str(state), "--since", "soon").exit_code == 2
    assert run("show", "--log", str(tmp_path / "none.jsonl")).exit_code == 2
    (tmp_path / "dir.jsonl").mkdir()
    assert run("show", "--log", str(tmp_path / "dir.jsonl")).exit_code == 2
    assert run("verify", "--log", str(tmp_path / "dir.jsonl")).exit_code == 2
