"""`appliance serve`'s last step: the service replaces the process, as its own user when root."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

import pytest

from appliance._stack import RunAs, exec_service


def _run_in_child(argv: list[str], cwd: Path, run_as: RunAs | None) -> tuple[int, str]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child becomes `argv`
        try:
            os.dup2(write, 1)
            exec_service(
                argv, env={"PATH": "/usr/bin:/bin", "ONLY": "this"}, cwd=cwd, run_as=run_as
            )
        finally:
            os._exit(127)
    os.close(write)
    with os.fdopen(read) as out:
        text = out.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def test_the_service_replaces_the_process_with_exactly_its_environment(tmp_path: Path) -> None:
    code, out = _run_in_child(["/bin/sh", "-c", "echo $$; pwd; env | sort"], tmp_path, None)
    assert code == 0
    lines = out.split("\n")
    assert lines[1] == str(tmp_path)
    assert sorted(
        line for line in lines[2:] if line and not line.startswith(("PWD=", "SHLVL=", "_="))
    ) == [
        "ONLY=this",
        "PATH=/usr/bin:/bin",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv is missing")
def test_as_root_the_service_runs_as_its_user_with_its_groups_only(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    run_as = RunAs("nobody", nobody.pw_uid, nobody.pw_gid, (nobody.pw_gid,))
    code, out = _run_in_child(
        [
            "/bin/sh",
            "-c",
            "id -u; id -g; id -G; umask; grep -E '^(Uid|CapBnd|NoNewPrivs):' /proc/self/status",
        ],
        tmp_path,
        run_as,
    )
    assert code == 0, out
    uid, gid, groups, umask, status, bounding, no_new_privs = out.strip().split("\n")
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    assert groups.split() == [str(nobody.pw_gid)]
    assert umask == "0077"
    # Real, effective, saved and filesystem uid: no way back to root.
    assert status.split()[1:] == [str(nobody.pw_uid)] * 4
    # No capability left to regain, even through a setuid binary.
    assert int(bounding.split()[1], 16) == 0
    assert no_new_privs.split()[1] == "1"
