"""`sandbox doctor` with the worker container's five capabilities (issue 14): without
CAP_SYS_PTRACE the parent cannot read a non-dumpable child's namespaces, so each namespace layer
is checked from inside the child, against the parent's namespace inodes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from sandbox import _isolation


@pytest.mark.skipif(os.geteuid() != 0, reason="the namespace layers as root need root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv is missing")
def test_doctor_is_green_without_sys_ptrace() -> None:
    done = subprocess.run(
        # As a container's cap_drop: SYS_PTRACE leaves the bounding set, so no exec regains it.
        ["setpriv", "--bounding-set=-sys_ptrace", sys.executable, "-m", "sandbox", "doctor"]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = json.loads(done.stdout)
    inactive = {name: layer for name, layer in report["layers"].items() if not layer["active"]}
    assert done.returncode == 0 and report["ok"], inactive
    assert inactive == {}


def test_the_child_refuses_the_parents_network_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if unshare had quietly left the child where its parent is: the layer must fail.
    monkeypatch.setattr(_isolation, "_unshare", lambda flags: None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    setup = _isolation.ChildSetup(
        policy=None,  # type: ignore[arg-type]
        workdir="/nonexistent",
        seccomp=None,
        baseline_as=0,
        parent_pid=os.getpid(),
        parent_ns=_isolation.namespace_ids(),
    )
    assert setup.parent_ns["net"] != 0
    with pytest.raises(_isolation.LayerFailed, match="network namespace"):
        _isolation._netns(setup)
