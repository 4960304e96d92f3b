"""CPU limits hold to the millisecond, not to the next whole second.

RLIMIT_CPU counts whole seconds (0.1 s allowed 0.96 s, or 1.98 s with SIGXCPU ignored); the
supervisor now reads the child's CPU clock and kills it at its limit. The bound asserted is the
issue's: within 50 ms of the limit. It measures the child's own CPU time, which a loaded machine
does not inflate; only the supervisor's wake-up can be late, by a scheduling slice.
"""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(60)

SPIN = "def f():\n    while True:\n        pass\n"
SPIN_IGNORING_SIGXCPU = (
    "import signal\n"
    "def f():\n"
    "    signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
    "    while True:\n"
    "        pass\n"
)


@pytest.mark.parametrize("cpu_seconds", [0.1, 0.25, 1.3])
def test_restricted_spin_stops_within_50_ms_of_its_cpu_limit(sb, cpu_seconds):
    limits = {"cpu_seconds": cpu_seconds, "wall_seconds": 10, "memory_mb": 64}
    outcome = attempt(sb, SPIN, limits=limits)
    assert_status(outcome, "timeout", "Timeout")
    assert outcome.error is not None and "CPU" in outcome.error["message"]
    assert cpu_seconds * 1000 <= outcome.usage.cpu_ms <= cpu_seconds * 1000 + 50, outcome.usage


def test_raw_spin_ignoring_sigxcpu_stops_within_50_ms(raw):
    limits = {"cpu_seconds": 0.2, "wall_seconds": 10, "memory_mb": 64}
    outcome = attempt_raw(raw, SPIN_IGNORING_SIGXCPU, limits=limits)
    assert_status(outcome, "timeout", "Timeout")
    assert 200 <= outcome.usage.cpu_ms <= 250, outcome.usage
