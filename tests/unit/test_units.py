"""The VM image's systemd units (packer/units/, issue 15): their hardening gates, their
commands, and no secret in them.

The gates run `packer/check-units.sh` (systemd-analyze security --offline and verify); the
commands are checked against the `appliance` command tree itself, so a unit cannot name a
subcommand or an option that does not exist.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from appliance.cli import main

_PACKER = Path(__file__).resolve().parents[2] / "packer"
_UNITS = _PACKER / "units"
_CHECK = _PACKER / "check-units.sh"
_APPLIANCE = "/usr/local/bin/appliance"
_SERVICES = sorted(_UNITS.glob("*.service"))
#: The image's own units (packer/guest/ holds their scripts): they run no `appliance` command and
#: hang off multi-user.target, not appliance.target. Every other check holds for them too.
_IMAGE_OWN = {"appliance-seed.service": "seed.sh", "appliance-selftest.service": "selftest.py"}
_APPLIANCE_SERVICES = [unit for unit in _SERVICES if unit.name not in _IMAGE_OWN]

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing (Debian's `systemd` package): the units' gates need it",
)


def _entries(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment in a unit file."""
    section, found = "", []
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


def _values(unit: Path, key: str) -> list[str]:
    return [value for _, k, value in _entries(unit) if k == key]


def _run_gate(units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own script
        ["bash", str(_CHECK), str(units)], capture_output=True, text=True, timeout=120, check=False
    )


@needs_systemd_analyze
def test_every_unit_is_within_its_gate_and_verifies_cleanly():
    result = _run_gate(_UNITS)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()[1:]
        if ".service" in line
    }
    assert sorted(rows) == sorted(unit.name for unit in _SERVICES)
    for name, (_, score, gate, verdict) in rows.items():
        assert verdict == "ok" and float(score) <= float(gate), rows[name]
    assert "systemd-analyze verify: ok" in result.stdout


@needs_systemd_analyze
def test_the_gate_fails_a_unit_over_its_gate_and_a_unit_that_does_not_verify(tmp_path):
    units = tmp_path / "units"
    shutil.copytree(_UNITS, units)
    api = units / "appliance-api.service"
    # The API without its user namespace, capability and system-call limits scores ~3, not ~1.1.
    weakened = [
        line
        for line in api.read_text().splitlines()
        if not line.startswith(("PrivateUsers=", "CapabilityBoundingSet=", "SystemCallFilter="))
    ]
    api.write_text("\n".join(weakened) + "\n")
    flower = units / "appliance-flower.service"
    flower.write_text(flower.read_text().replace("ProtectProc=invisible", "ProtectProc=invisibl"))
    result = _run_gate(units)
    assert result.returncode == 1
    api_row = next(line for line in result.stdout.splitlines() if line.startswith(api.name))
    assert api_row.endswith("FAIL: over its gate"), api_row
    assert "systemd-analyze verify: FAIL" in result.stdout
    assert "Failed to parse /proc/ protection mode" in result.stdout


def _appliance_argv(command: str) -> list[str] | None:
    """What follows /usr/local/bin/appliance in an Exec line, or None if it does not run it."""
    words = shlex.split(command)
    if _APPLIANCE not in words:
        return None
    rest = words[words.index(_APPLIANCE) + 1 :]
    # systemd's "$$" is a literal "$"; none may be left in the appliance's own arguments.
    assert not any("$" in word for word in rest), command
    return rest


def _resolve(argv: list[str]) -> list[str]:
    """The command path `argv` names in the `appliance` tree, parsed as click parses it (a
    subcommand or an option that does not exist raises click.UsageError)."""
    command: click.Command = main
    path: list[str] = []
    args = list(argv)
    while isinstance(command, click.Group):
        while args and args[0].startswith("-"):
            option, value = args.pop(0), args.pop(0)
            assert option == "--state" and value == "/var/lib/appliance", argv
        name = args.pop(0)
        sub = command.get_command(click.Context(command), name)
        if sub is None:
            raise click.UsageError(f"no command {' '.join([*path, name])!r} in `appliance`")
        command, path = sub, [*path, name]
    try:
        command.make_context(" ".join(path), args)
    except click.BadParameter as exc:
        # A path that exists on the VM only (the seed files): not for this machine to check.
        if not (exc.param is not None and isinstance(exc.param.type, click.Path)):
            raise
    return path


@pytest.mark.parametrize("unit", _APPLIANCE_SERVICES, ids=lambda unit: unit.name)
def test_each_unit_runs_a_real_appliance_command(unit):
    commands = [
        argv
        for key in ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop")
        for value in _values(unit, key)
        if (argv := _appliance_argv(value)) is not None
    ]
    assert len(commands) == 1, f"{unit.name}: one `appliance` command, found {commands}"
    path = _resolve(commands[0])
    expected = unit.stem.removeprefix("appliance-")
    if expected in {"redis", "relay", "openbao", "worker", "api", "flower"}:
        assert path == ["serve"] and commands[0][-1] == expected, commands[0]
    else:
        assert path == [expected], commands[0]


_SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|PASS|SECRET|KEY|SHARE|CREDENTIAL)", re.IGNORECASE)
_SECRET_TEXT = re.compile(
    r"-----BEGIN|\bhvs\.|\bs\.[A-Za-z0-9]{20,}|AGE-SECRET-KEY|\b[A-Za-z0-9+/=_-]{32,}\b"
)


@pytest.mark.parametrize("unit", [*_SERVICES, _UNITS / "appliance.target"], ids=lambda u: u.name)
def test_no_unit_holds_a_secret_or_an_inline_credential(unit):
    for _, key, value in _entries(unit):
        # Credentials reach the services as files under the state directory, never inline.
        assert key not in {"SetCredential", "SetCredentialEncrypted", "PassEnvironment"}, key
        if key == "Environment":
            for assignment in shlex.split(value):
                name, _, setting = assignment.partition("=")
                assert not _SECRET_NAME.search(name), f"{unit.name}: {name} set inline"
                assert not _SECRET_TEXT.search(setting), f"{unit.name}: {assignment}"
        elif key == "EnvironmentFile":
            assert value == "-/etc/appliance/appliance.env", value
        else:
            assert not _SECRET_TEXT.search(value.replace("/", " ")), f"{unit.name}: {key}={value}"


@pytest.mark.parametrize("unit", sorted(_IMAGE_OWN), ids=str)
def test_the_images_own_units_run_the_script_the_image_installs(unit):
    script = _IMAGE_OWN[unit]
    (command,) = _values(_UNITS / unit, "ExecStart")
    assert f"/usr/local/lib/appliance/{script}" in command.split()
    assert (_PACKER / "guest" / script).is_file()
    assert (
        f'"$g/{script}" /usr/local/lib/appliance/{script}' in (_PACKER / "provision.sh").read_text()
    )
    assert _values(_UNITS / unit, "RequiresMountsFor") == ["/var/lib/appliance"]
    assert _values(_UNITS / unit, "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize("unit", _APPLIANCE_SERVICES, ids=lambda unit: unit.name)
def test_each_unit_needs_the_data_disk_and_belongs_to_the_target(unit):
    assert _values(unit, "RequiresMountsFor") == ["/var/lib/appliance"]
    assert _values(unit, "WantedBy") == ["appliance.target"]
    wanted = " ".join(_values(_UNITS / "appliance.target", "Wants")).split()
    assert unit.name in wanted
    assert _values(unit, "UMask") in (["0077"], ["0022"])
    if _values(unit, "User"):
        assert _values(unit, "CapabilityBoundingSet") == [""], unit.name
