"""CPU loops, including ones that swallow BaseException, and wall-clock stalls."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "body",
    [
        "while True:\n        pass",
        "while True:\n        try:\n            while True:\n                pass\n"
        "        except BaseException:\n            pass",
        "x = 0\n    while True:\n        try:\n            x = 2 ** 10000 % 7\n"
        "        except BaseException:\n            continue\n        finally:\n            x = 0",
    ],
)
def test_cpu_loop_ends_in_timeout(sb, body):
    outcome = attempt(sb, f"def f():\n    {body}\n", limits={"cpu_seconds": 1, "wall_seconds": 10})
    assert_status(outcome, "timeout", "Timeout")
    assert 900 <= outcome.usage.cpu_ms <= 3000


def test_wall_clock_limit_ends_a_loop_before_the_cpu_limit(sb):
    outcome = attempt(
        sb,
        "def f():\n    while True:\n        pass\n",
        limits={"cpu_seconds": 10, "wall_seconds": 0.5},
    )
    assert_status(outcome, "timeout", "Timeout")
    assert outcome.usage.wall_ms < 2000


def test_raw_signal_handlers_cannot_outlive_the_cpu_limit(raw):
    # Raw code can catch SIGXCPU; the hard limit one second later is a SIGKILL.
    source = (
        "import signal\n"
        "def f():\n"
        "    signal.signal(signal.SIGXCPU, lambda *a: None)\n"
        "    while True:\n"
        "        pass\n"
    )
    outcome = attempt_raw(raw, source, limits={"cpu_seconds": 1, "wall_seconds": 10})
    assert_status(outcome, "timeout", "Timeout")


def test_raw_blocking_call_ends_in_wall_clock_timeout(raw):
    source = "import time\ndef f():\n    time.sleep(60)\n"
    outcome = attempt_raw(raw, source, limits={"cpu_seconds": 5, "wall_seconds": 0.5})
    assert_status(outcome, "timeout", "Timeout")
