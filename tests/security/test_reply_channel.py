"""Abusing the reply channel: closing it early to outlive the run, or to forge a finished run.

A child that closes its reply channel is taken at its word: its reply is whole. The parent then
reads the child's usage from the kernel and kills it. Code that closes the channel on purpose
(only possible after a RestrictedPython escape) must gain nothing: no process outlives its run,
the usage is the kernel's, and garbage is still a `crashed` outcome.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .conftest import assert_status, attempt_raw

pytestmark = pytest.mark.timeout(60)

_CLOSE_THEN_SPIN = """
import os
from sandbox._reply import encode
def f():
    pid = os.getpid()
    os.write(3, encode("ok", None, str(pid), ""))
    os.close(3)
    while True:
        pass
"""

_CLOSE_THEN_SLEEP_UNDER_SIGNALS = """
import os, signal, time
from sandbox._reply import encode
def f():
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    pid = os.getpid()
    os.write(3, encode("ok", None, str(pid), ""))
    os.close(3)
    time.sleep(30)
"""

_CLOSE_WITH_GARBAGE = """
import os
from sandbox._reply import encode
def f():
    os.write(3, encode("ok", None, "12345", "")[:-3])
    os.close(3)
    while True:
        pass
"""


def _wait_until_gone(pid: int) -> None:
    # A liveness bound, not a speed check: a killed child is normally gone within milliseconds.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in "ZX":
            return
        time.sleep(0.01)
    raise AssertionError(f"child {pid} outlived its run")


def _spares(box) -> list[int]:
    """The fork server's spares: the children of its one child, the zygote."""
    server = box._proc.pid
    (zygote,) = Path(f"/proc/{server}/task/{server}/children").read_text().split()
    return [int(pid) for pid in Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()]


@pytest.mark.parametrize("source", [_CLOSE_THEN_SPIN, _CLOSE_THEN_SLEEP_UNDER_SIGNALS])
def test_raw_child_that_closes_its_channel_does_not_outlive_its_run(raw, source):
    attempt_raw(raw, "def f():\n    return 0\n")  # the server has its spares ready now
    next_spare = _spares(raw)[0]
    outcome = attempt_raw(raw, source)
    # The forged reply is the child's own outcome to give; what it cannot do is keep running.
    assert_status(outcome, "ok")
    assert outcome.value == 1  # pid 1 of a PID namespace of its own
    _wait_until_gone(next_spare)
    assert outcome.usage.max_rss_kb > 0


def test_raw_child_that_closes_its_channel_mid_reply_has_crashed(raw):
    outcome = attempt_raw(raw, _CLOSE_WITH_GARBAGE)
    assert_status(outcome, "crashed", "Crashed")
