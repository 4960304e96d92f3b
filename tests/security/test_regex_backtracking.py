"""Catastrophic regular-expression backtracking: C code that never checks for signals."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "call",
    [
        "re.match(r'(a+)+$', 'a' * 64 + 'b')",
        "re.fullmatch(r'(x|x|x)*y', 'x' * 64)",
    ],
)
def test_catastrophic_backtracking_ends_in_timeout(sb, call):
    outcome = attempt(
        sb,
        f"import re\ndef f():\n    return bool({call})\n",
        imports=("re",),
        limits={"cpu_seconds": 1, "wall_seconds": 5},
    )
    assert_status(outcome, "timeout", "Timeout")


def test_backtracking_under_a_short_wall_clock_limit(sb):
    source = "import re\ndef f():\n    return bool(re.match(r'(a*)*$', 'a' * 64 + 'b'))\n"
    outcome = attempt(sb, source, imports=("re",), limits={"cpu_seconds": 10, "wall_seconds": 0.3})
    assert_status(outcome, "timeout", "Timeout")
