"""Names planted by a service's user where root later works (issue 15, red team H1).

`audit/` is writable by the group of the API and the worker; `run/<service>/`, `redis/` and
`bao/` belong to the services' users. Each test plants, as the service's real user (through
`RunAs.confine`, the way the stack starts it), a symlink, a hard link or a FIFO where root's
`prepare` (or a start, or `export_audit_keys`) then works, and checks that root's file is
untouched and that `prepare` still succeeds.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from appliance import stack
from appliance._stack import (
    BaoHandle,
    Bootstrap,
    NotRegularFile,
    RunAs,
    StackError,
    read_pid_file,
)
from appliance._stack.procs import start_detached, stop_by_pid_file

from .conftest import FREE_PORTS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the services' users need root")


def _as(user: RunAs, *argv: str) -> None:
    subprocess.run(user.confine(list(argv)), check=True, capture_output=True)  # noqa: S603


def _victim(state: Path, name: str = "victim.token") -> Path:
    """A file of root's only, like `secrets/backup.token`."""
    path = state / "secrets" / name
    path.write_bytes(b"root's secret\n")
    path.chmod(0o600)
    return path


def _unchanged(path: Path) -> None:
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert path.read_bytes() == b"root's secret\n"


@pytest.fixture
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Mapping[str, RunAs]]:
    state = tmp_path_factory.mktemp("planted")
    users = stack.prepare(state, FREE_PORTS).users
    assert users is not None, stack.status(state)["service_users"]
    return state, users


def test_a_symlink_in_the_audit_directory_never_shares_its_target(
    prepared: tuple[Path, Mapping[str, RunAs]],
) -> None:
    state, users = prepared
    victim = _victim(state)
    audit = state / "audit"
    _as(users["api"], "ln", "-s", str(victim), str(audit / "zz"))
    _as(users["worker"], "ln", "-s", "/nonexistent/gone", str(audit / "dangling"))
    _as(users["worker"], "mkfifo", str(audit / "fifo"))
    os.link(victim, audit / "hard")  # What protected_hardlinks stops a service from making.
    fifo_mode = (audit / "fifo").lstat().st_mode
    stack.prepare(state)  # Neither follows, nor crashes on the dangling link, nor blocks.
    _unchanged(victim)
    assert (audit / "fifo").lstat().st_mode == fifo_mode
    assert audit.stat().st_mode & 0o777 == 0o770
    assert audit.stat().st_mode & (stat.S_ISGID | stat.S_ISVTX) == stat.S_ISGID | stat.S_ISVTX


def test_a_writer_cannot_remove_the_other_writers_files(
    prepared: tuple[Path, Mapping[str, RunAs]],
) -> None:
    state, users = prepared
    log = state / "audit" / "audit.jsonl"
    _as(users["api"], "touch", str(log))
    with pytest.raises(subprocess.CalledProcessError):
        _as(users["worker"], "mv", "-f", str(log), str(log.with_name("gone")))
    assert log.exists()


def test_a_swapped_tree_in_a_service_directory_gives_nothing_of_roots(
    prepared: tuple[Path, Mapping[str, RunAs]],
) -> None:
    state, users = prepared
    victim = _victim(state)
    run_api = state / "run" / "api"
    _as(users["api"], "ln", "-s", str(victim), str(run_api / "link"))
    _as(users["api"], "ln", "-s", str(victim.parent), str(run_api / "dir"))
    os.link(victim, run_api / "hard")
    for planted in ("endpoint.json", "config.hcl"):
        _as(users["openbao"], "ln", "-sf", str(victim), str(state / "bao" / planted))
    _as(users["redis"], "ln", "-sf", str(victim), str(state / "redis" / "endpoint.json"))
    stack.prepare(state)
    _unchanged(victim)
    # A planted record of a port is refused by name, never read through.
    (state / "bao" / "cluster.json").unlink()
    _as(users["openbao"], "ln", "-s", str(victim), str(state / "bao" / "cluster.json"))
    with pytest.raises(StackError, match="cluster.json is a symlink"):
        stack.prepare(state)
    _unchanged(victim)
    assert (state / "bao" / "config.hcl").is_file()
    assert not (state / "bao" / "config.hcl").is_symlink()


def test_a_planted_log_is_refused_and_a_foreign_pid_file_not_believed(
    prepared: tuple[Path, Mapping[str, RunAs]],
) -> None:
    state, users = prepared
    victim = _victim(state)
    run_api = state / "run" / "api"
    _as(users["api"], "ln", "-s", str(victim), str(run_api / "api.log"))
    with pytest.raises(NotRegularFile):
        start_detached(
            [sys.executable, "-c", "pass"],
            log_file=run_api / "api.log",
            pid_file=run_api / "api.pid",
            env={},
        )
    _unchanged(victim)
    # The API's user names root's own process (this test) in its pid file: not believed, so
    # `down` signals nothing of root's.
    ticks = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    pid_file = run_api / "api.pid"
    _as(users["api"], "sh", "-c", f"echo '{os.getpid()} {ticks}' > {pid_file}")
    assert read_pid_file(pid_file) is None
    # Its own process, though, it may name.
    sleeper = subprocess.Popen(users["api"].confine(["sleep", "60"]), start_new_session=True)  # noqa: S603
    try:
        ticks = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        _as(users["api"], "sh", "-c", f"echo '{sleeper.pid} {ticks}' > {pid_file}")
        assert read_pid_file(pid_file) == sleeper.pid
        assert stop_by_pid_file(pid_file)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_export_audit_keys_never_writes_through_a_planted_temporary_file(
    prepared: tuple[Path, Mapping[str, RunAs]], openbao: BaoHandle, bao_bootstrap: Bootstrap
) -> None:
    state, users = prepared
    victim = _victim(state)
    tmp = state / "audit" / "audit-pubkeys.json.tmp"
    _as(users["api"], "ln", "-s", str(victim), str(tmp))
    stack.export_audit_keys(state, openbao.addr, str(openbao.root_token))
    _unchanged(victim)
    assert b'"ed25519"' in (state / "audit" / "audit-pubkeys.json").read_bytes()
