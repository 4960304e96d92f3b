"""The worker's drop from root to its own user (issue 12, finding 23)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from appliance.settings import ConfigurationError
from appliance.worker.privileges import drop_to, must_drop

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def _in_child(program: str, **popen: object) -> dict[str, object]:
    done = subprocess.run(  # noqa: S603 - the test's own program
        [sys.executable, "-c", textwrap.dedent(program)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **popen,  # type: ignore[arg-type]
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_nothing_to_drop_without_a_user() -> None:
    assert must_drop(None) is False


@root_only
def test_root_must_drop() -> None:
    assert must_drop("nobody") is True


@root_only
def test_another_user_than_the_configured_one_is_refused() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, then ask to become root
        os.close(read)
        verdict = b"accepted"
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            must_drop("root")
        except ConfigurationError:
            verdict = b"refused"
        finally:
            os.write(write, verdict)
            os._exit(0)
    os.close(write)
    verdict = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    assert verdict == b"refused"


@root_only
def test_drop_to_leaves_nothing_of_root() -> None:
    seen = _in_child(
        """
        import json, os, threading, time
        from appliance.worker.privileges import drop_to
        # A thread started before the drop changes with the process (glibc's setxid).
        box = {}
        started = threading.Event()
        def other():
            started.set()
            time.sleep(0.5)
            box["uid"] = os.getresuid()
        t = threading.Thread(target=other)
        t.start()
        started.wait()
        drop_to("nobody")
        t.join()
        lines = open("/proc/self/status").read().splitlines()
        caps = {l.split(":")[0]: l.split()[1] for l in lines if l.startswith("Cap")}
        nnp = [l.split()[1] for l in lines if l.startswith("NoNewPrivs")][0]
        try:
            os.setuid(0)
            regained = True
        except PermissionError:
            regained = False
        print(json.dumps({"me": os.getresuid(), "thread": box["uid"], "caps": caps,
                          "groups": os.getgroups(), "regained": regained,
                          "no_new_privs": nnp}))
        """
    )
    nobody = 65534
    assert seen["me"] == [nobody] * 3
    assert seen["thread"] == [nobody] * 3
    assert all(int(v, 16) == 0 for v in seen["caps"].values())  # type: ignore[union-attr]
    assert seen["no_new_privs"] == "1"
    assert seen["regained"] is False
    assert 0 not in seen["groups"]  # type: ignore[operator]


def test_an_unknown_user_is_a_configuration_error() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root)")
    with pytest.raises(ConfigurationError):
        drop_to("no-such-user-appliance-test")


#: A worker container's bounding set (issue 14): cap_drop ALL, then these five back.
CONTAINER_CAPS = "-all,+sys_admin,+setuid,+setgid,+sys_chroot,+kill"


@root_only
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv is missing")
def test_drop_to_in_a_worker_container_without_cap_setpcap() -> None:
    # Without CAP_SETPCAP the bounding set cannot be emptied: the drop still leaves no
    # capability to use or regain (no_new_privs: an execve grants none of the bounding set).
    done = subprocess.run(  # noqa: S603 - the test's own program
        ["setpriv", f"--bounding-set={CONTAINER_CAPS}", sys.executable, "-c"]
        + [
            "import json, os\n"
            "from appliance.worker.privileges import drop_to\n"
            "drop_to('nobody')\n"
            "lines = open('/proc/self/status').read().splitlines()\n"
            "print(json.dumps({l.split(':')[0]: l.split()[1] for l in lines"
            " if l.startswith(('Cap', 'NoNewPrivs'))} | {'uid': os.getresuid()}))\n"
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["uid"] == [65534] * 3
    assert all(int(seen[s], 16) == 0 for s in ("CapInh", "CapPrm", "CapEff", "CapAmb"))
    assert seen["NoNewPrivs"] == "1"
    # What the container left, and no more.
    assert int(seen["CapBnd"], 16) == sum(1 << c for c in (5, 6, 7, 18, 21))
