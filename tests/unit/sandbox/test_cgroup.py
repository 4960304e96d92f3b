"""The memory-cgroup backends, on a fake cgroupfs (the kernel's side is in tests/security).

cgroup v1 is what this project's CI hosts have and is tested against the real kernel in
`tests/security/test_memory_accounting.py`; cgroup v2 (the VM image's Debian 12 guest) and the
"no backend" case (a container with a read-only cgroupfs) are checked here for the paths and
files the fork server would write.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import sandbox._cgroup as cgroup
from sandbox._cgroup import MemoryCgroup


def _layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mountinfo: str, membership: str):
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text(membership)
    monkeypatch.setattr(cgroup, "_MOUNTINFO", str(tmp_path / "mountinfo"))
    monkeypatch.setattr(cgroup, "_CGROUP", str(tmp_path / "cgroup"))


def _v2_tree(tmp_path: Path, subtree: str) -> Path:
    service = tmp_path / "fs" / "system.slice" / "appliance-worker.service"
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("cpu memory pids\n")
    (service / "cgroup.subtree_control").write_text(subtree)
    return service


def test_cgroup_v2_makes_run_cgroups_under_a_delegated_cgroup(tmp_path, monkeypatch):
    service = _v2_tree(tmp_path, "memory pids\n")
    _layout(
        tmp_path,
        monkeypatch,
        f"30 1 0:26 / {tmp_path / 'fs'} rw,nosuid - cgroup2 cgroup2 rw\n",
        "0::/system.slice/appliance-worker.service\n",
    )
    # A fake cgroupfs makes no control files in a new directory: the test lays them out.
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        for name in ("cgroup.subtree_control", "memory.max", "memory.swap.max", "cgroup.procs"):
            Path(path, name).write_text("")
        Path(path, "memory.current").write_text("4096\n")
        Path(path, "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")

    monkeypatch.setattr(cgroup.os, "mkdir", mkdir)
    handle = MemoryCgroup.find(4242, maxima_mb=1024)
    assert handle.available, handle.reason
    assert handle.backend == "cgroup-v2"
    assert handle.root is not None and Path(handle.root).parent == service
    assert Path(handle.root, "cgroup.subtree_control").read_text() == "+memory"
    run = handle.new_run()
    assert Path(run, "memory.max").read_text() == str(1024 * 1024 * 1024 + 64 * 1024 * 1024)
    assert Path(run, "memory.swap.max").read_text() == "0"
    handle.limit_run(run, 64 * 1024 * 1024)
    assert Path(run, "memory.max").read_text() == str(4096 + 64 * 1024 * 1024)
    assert handle.oom_killed(run)


def test_cgroup_v2_runs_go_beside_the_workers_leaf_in_the_delegated_unit_cgroup(
    tmp_path, monkeypatch
):
    # The VM's worker unit: its cgroup is delegated and holds no process; the worker runs in the
    # leaf `main` below it, which cgroup v2 lets pass no controller down (it has processes).
    service = _v2_tree(tmp_path, "")
    (service / "cgroup.procs").write_text("")
    leaf = service / "main"
    leaf.mkdir()
    (leaf / "cgroup.controllers").write_text("cpu memory pids\n")
    (leaf / "cgroup.subtree_control").write_text("")
    (leaf / "cgroup.procs").write_text("812\n813\n")
    _layout(
        tmp_path,
        monkeypatch,
        f"30 1 0:26 / {tmp_path / 'fs'} rw,nosuid - cgroup2 cgroup2 rw\n",
        "0::/system.slice/appliance-worker.service/main\n",
    )
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        for name in ("cgroup.subtree_control", "memory.max", "memory.swap.max", "cgroup.procs"):
            Path(path, name).write_text("")

    monkeypatch.setattr(cgroup.os, "mkdir", mkdir)
    handle = MemoryCgroup.find(4242, maxima_mb=1024)
    assert handle.available, handle.reason
    assert handle.root is not None and Path(handle.root).parent == service
    assert (service / "cgroup.subtree_control").read_text() == "+memory"
    assert (leaf / "cgroup.subtree_control").read_text() == ""
    assert Path(handle.new_run()).parent == Path(handle.root)


def test_cgroup_v2_leaf_under_a_cgroup_with_processes_is_not_used_as_the_base(
    tmp_path, monkeypatch
):
    service = _v2_tree(tmp_path, "")
    (service / "cgroup.procs").write_text("700\n")  # not delegated to us alone: processes there
    leaf = service / "main"
    leaf.mkdir()
    (leaf / "cgroup.subtree_control").write_text("")
    (leaf / "cgroup.procs").write_text("812\n")
    _layout(
        tmp_path,
        monkeypatch,
        f"30 1 0:26 / {tmp_path / 'fs'} rw,nosuid - cgroup2 cgroup2 rw\n",
        "0::/system.slice/appliance-worker.service/main\n",
    )

    def busy(path: str, data: bytes) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(cgroup, "_write", busy)
    handle = MemoryCgroup.find(4242, maxima_mb=1024)
    assert not handle.available
    assert str(leaf) in handle.reason


def test_cgroup_v2_with_processes_in_the_cgroup_says_what_the_unit_needs(tmp_path, monkeypatch):
    _v2_tree(tmp_path, "")  # the memory controller is not passed down
    _layout(
        tmp_path,
        monkeypatch,
        f"30 1 0:26 / {tmp_path / 'fs'} rw,nosuid - cgroup2 cgroup2 rw\n",
        "0::/system.slice/appliance-worker.service\n",
    )

    def busy(path: str, data: bytes) -> None:
        raise OSError(16, "Device or resource busy")  # EBUSY: the cgroup has processes

    monkeypatch.setattr(cgroup, "_write", busy)
    handle = MemoryCgroup.find(4242, maxima_mb=1024)
    assert not handle.available
    assert "delegated" in handle.reason and "leaf" in handle.reason
    assert handle.describe().startswith("no memory cgroup: cgroup-v2")


def test_no_writable_memory_controller_is_reported_not_fatal(tmp_path, monkeypatch):
    # A container: cgroup v2 mounted read-only, nothing to make directories in.
    root = tmp_path / "fs"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("memory\n")
    root.chmod(0o555)
    _layout(tmp_path, monkeypatch, f"30 1 0:26 / {root} ro,nosuid - cgroup2 cgroup2 ro\n", "0::/\n")
    monkeypatch.setattr(
        cgroup.os,
        "mkdir",
        lambda path, mode=0o777: (_ for _ in ()).throw(OSError(30, "Read-only file system")),
    )
    handle = MemoryCgroup.find(4242, maxima_mb=1024)
    assert not handle.available
    assert "Read-only file system" in handle.reason
    handle.close()  # nothing to remove, nothing raised


def test_a_v1_memory_hierarchy_mounted_read_only_is_not_used(tmp_path, monkeypatch):
    _layout(
        tmp_path,
        monkeypatch,
        f"35 1 0:31 / {tmp_path} ro,nosuid - cgroup cgroup ro,memory\n",
        "4:memory:/\n",
    )
    handle = MemoryCgroup.find(4242, maxima_mb=64)
    assert not handle.available
    assert handle.reason == "no memory controller is mounted for this process"


def test_stale_cgroups_of_dead_fork_servers_are_removed(tmp_path):
    dead = tmp_path / "sandbox-999999999-abcd"
    (dead / "run-3").mkdir(parents=True)
    alive = tmp_path / f"sandbox-{os.getpid()}-abcd"
    (alive / "run-1").mkdir(parents=True)
    cgroup._remove_stale(str(tmp_path))
    assert not dead.exists()
    assert (alive / "run-1").exists()
